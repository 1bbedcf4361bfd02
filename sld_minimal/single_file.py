"""The single-file ("original CompVis") layout of SD 1.x: one `.safetensors` with all three models, in ldm's names.

    model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight     (unet)
        = down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight
    first_stage_model.decoder.up.3.block.0.nin_shortcut.weight                        (vae)
        = decoder.up_blocks.0.resnets.0.conv_shortcut.weight
    cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight           (text_encoder)
        = text_model.encoder.layers.0.mlp.fc1.weight

`compvis_name` maps a module (= published diffusers) key to its CompVis name: a few renames (`UNET_TOP`, `RESNET`,
`VAE`) plus the block numbering, derived from the config. Loading inverts it for exactly the keys the module expects
and reads through `weights.read_state_dict`: every tensor present, every shape right, nothing unexpected, or an
error naming the file's key. A single file has no configs, scheduler or tokenizer: SD 1.4's are used (the config
dataclasses' defaults, `folder.SCHEDULER_CONFIG`; files written by `convert` carry their configs in the safetensors
metadata), and `tokenizer.py` derives CLIP's tokenizer. `convert` writes either layout from the other.
"""
import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .clip import CLIPTextConfig
from .diffusers_folder import (SCHEDULER_CONFIG, STEMS, canonical_key, check_folder, extra_tensors, load_scheduler_config,
                               weights_file, write_folder)
from .files import remove_orphans, temp_name, usual_mode
from .noise_schedule import SchedulerConfig
from .tokenizer import CLIP_VOCAB_SIZE, check_vocab_size, load_tokenizer, size, write_clip_tokenizer
from .unet import UNetConfig
from .vae import VAEConfig
from .weights import MODELS, PICKLE_SUFFIXES, WeightsError, build, config_from_dict, read_config, read_state_dict

PREFIX = {"text_encoder": "cond_stage_model.transformer.", "unet": "model.diffusion_model.",
          "vae": "first_stage_model."}
DEFAULTS = {"text_encoder": CLIPTextConfig(), "unet": UNetConfig(), "vae": VAEConfig()}  # SD 1.4's
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut", "group_norm": "norm", "query": "q", "key": "k",
       "value": "v", "proj_attn": "proj_out"}  # any part of a VAE key with one of these names
BLOCK = re.compile(r"(?:(down|up)_blocks\.(\d+)|mid_block)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
CONV_1X1 = re.compile(r"mid_block\.attentions\.0\.(query|key|value|proj_attn)\.weight")  # VAE: [C, C] ↔ [C, C, 1, 1]
# What single files carry that no module needs: the training schedule, EMA bookkeeping, the VAE encoder (and its
# training loss), CLIP's position ids. The EMA weights (`model_ema.*`) are read with ema=True only.
SKIPPED = re.compile(r"(betas|alphas_cumprod(_prev)?|sqrt_\w+|posterior_\w+|log_one_minus_\w+|logvar"
                     r"|model_ema\.(decay|num_updates)|first_stage_model\.(encoder|quant_conv|loss)\..+"
                     r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids)")
REFUSED = {"conditioner.embedders.": "an SDXL checkpoint", "cond_stage_model.model.": "an SD 2.x checkpoint (OpenCLIP)"}
META_KEY = "sld_minimal.configs"  # safetensors metadata written by `convert`: the configs and scheduler config


def compvis_name(component: str, key: str, cfg) -> str:
    """The single file's name for a module key (`cfg`: that module's config)."""
    if component == "text_encoder":
        return PREFIX[component] + key
    return PREFIX[component] + (unet_name(key, cfg) if component == "unet" else vae_name(key, cfg))


def unet_name(key: str, cfg: UNetConfig) -> str:
    """ldm numbers the UNet's blocks flat: input block 0 is conv_in, then per level L resnets (each with its
    transformer as sub-block 1) and the downsampler `op` in a block of its own; output blocks hold L + 1 resnets per
    level, the upsampler sharing the last one's block; middle_block is resnet, transformer, resnet."""
    m = BLOCK.fullmatch(key)
    if not m:
        module, param = key.rsplit(".", 1)
        return f"{UNET_TOP[module]}.{param}"
    path, i, kind, j, rest = m[1] or "mid", int(m[2] or 0), m[3], int(m[4]), m[5]
    head, _, tail = rest.partition(".")
    rest = f"{RESNET[head]}.{tail}" if kind == "resnets" else rest
    L, sub = cfg.layers_per_block, int(kind == "attentions")
    if path == "mid":
        return f"middle_block.{1 if sub else 2 * j}.{rest}"
    if kind == "downsamplers":
        return f"input_blocks.{(i + 1) * (L + 1)}.0.op.{tail}"
    if kind == "upsamplers":
        return f"output_blocks.{i * (L + 1) + L}.{2 if cfg.up_block_types[i].startswith('CrossAttn') else 1}.{rest}"
    if path == "down":
        return f"input_blocks.{1 + i * (L + 1) + j}.{sub}.{rest}"
    return f"output_blocks.{i * (L + 1) + j}.{sub}.{rest}"


def vae_name(key: str, cfg: VAEConfig) -> str:
    """ldm's VAE: down.N.block.M (+ downsample), mid.block_1, mid.attn_1, mid.block_2, up.N.block.M (+ upsample),
    the decoder's levels numbered from the lowest resolution: ldm's up.3 is up_blocks.0."""
    part, _, rest = key.partition(".")  # encoder, decoder, post_quant_conv, quant_conv
    m = BLOCK.fullmatch(rest)
    if not m:
        return ".".join(VAE.get(p, p) for p in key.split("."))
    path, i, kind, j = m[1] or "mid", int(m[2] or 0), m[3], int(m[4])
    rest = ".".join(VAE.get(p, p) for p in m[5].split("."))
    if path == "mid":
        return f"{part}.mid.{'attn_1' if kind == 'attentions' else f'block_{j + 1}'}.{rest}"
    level = i if path == "down" else len(cfg.block_out_channels) - 1 - i
    where = {"downsamplers": "downsample", "upsamplers": "upsample"}.get(kind, f"block.{j}")
    return f"{part}.{path}.{level}.{where}.{rest}"


def compvis_shape(component: str, key: str, shape) -> tuple:
    """ldm stores the VAE attention's q, k, v and proj_out as 1×1 convolutions."""
    return (*shape, 1, 1) if component == "vae" and CONV_1X1.search(key) else tuple(shape)


def ema_name(name: str) -> str:
    """ldm's EMA copy: `model.diffusion_model.a.0.b` → `model_ema.diffusion_modela0b`."""
    return "model_ema." + name.removeprefix("model.").replace(".", "")


def is_single_file(path) -> bool:
    path = Path(path)
    return path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def inspect_file(path: Path) -> tuple[dict, dict]:
    """(key → shape, the configs its metadata stores) of a single file, after refusing anything that is not SD 1.x.
    Reads no tensor."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path} is a pickle; pickled weights can run code and are never loaded — use the "
                           f".safetensors release of the same weights (e.g. {path.stem}.safetensors)")
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes, meta = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    for prefix, what in REFUSED.items():
        if any(k.startswith(prefix) for k in shapes):
            raise WeightsError(f"{path} is {what} ({prefix}* keys); only SD 1.x models are supported")
    width = {s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2} & {1024, 2048}
    if width:
        raise WeightsError(f"{path} has {max(width)}-wide cross-attention (SD 2.x/SDXL); only SD 1.x is supported")
    for key in shapes:
        if not key.startswith((*PREFIX.values(), "model_ema.")) and not SKIPPED.fullmatch(key):
            raise WeightsError(f"{path}: unexpected key {key!r}; this is not an SD 1.x single-file checkpoint")
    for component, prefix in PREFIX.items():
        if not any(k.startswith(prefix) and not SKIPPED.fullmatch(k) for k in shapes):
            raise WeightsError(f"{path} has no {prefix}* tensors: the {component} is missing from this file")
    try:
        return shapes, json.loads(meta.get(META_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: its {META_KEY} metadata is not valid JSON ({e})") from None


def load_single_file(path, device="cpu", dtype=torch.float32, configs=None, ema=False) -> tuple[dict, dict]:
    """({component: module}, scheduler config) from one single-file checkpoint, strictly. Configs: the caller's,
    else the file's metadata, else SD 1.4's. `ema`: the UNet from the EMA copy (`model_ema.*`), which must be
    complete. `dtype=None` keeps the file's dtypes."""
    path, configs = Path(path), configs or {}
    shapes, stored = inspect_file(path)
    configs = {c: configs.get(c) or config_from_dict(type(DEFAULTS[c]), stored.get(c, {}), f"{path} ({c} config)")
               for c in DEFAULTS}
    scheduler_config = stored.get("scheduler", SCHEDULER_CONFIG)

    def reader(component):
        def read(expected):
            names = {compvis_name(component, k, configs[component]): k for k in expected}  # CompVis → module
            prefix = PREFIX[component]
            if component == "unet" and ema:
                names, prefix = {ema_name(n): k for n, k in names.items()}, "model_ema."
            assert len(names) == len(expected), "the CompVis names must be distinct"

            def rename(key):  # file key → module key; None: another component's, or skipped
                if key in names:
                    return names[key]
                if not key.startswith(prefix) or SKIPPED.fullmatch(key):
                    return None
                # text encoder: the folder loader's alias (keys without `text_model.`); else an unexpected key
                return canonical_key(component, key[len(prefix):]) if component == "text_encoder" else key

            found = {rename(k) for k in shapes}
            missing = [n for n, k in names.items() if k not in found]
            if missing and prefix == "model_ema.":
                raise WeightsError(f"{path}: ema=True (--ema) needs the EMA copy of the UNet, but {len(missing)} of "
                                   f"its {len(names)} tensors are missing (e.g. {missing[0]!r}); load without --ema")
            if missing:
                raise WeightsError(f"{path}: key {missing[0]!r} is missing; the file is incomplete or not SD 1.x")
            file_shapes = {k: compvis_shape(component, k, s) for k, s in expected.items()}
            state = read_state_dict(path, component, file_shapes, device, dtype, rename=rename)
            return {k: v.reshape(expected[k]) for k, v in state.items()}
        return read

    return {c: build(c, configs[c], reader(c)) for c in DEFAULTS}, scheduler_config


def single_file_configs(path) -> tuple[dict, dict]:
    """({component: config}, scheduler config) of a single file, from its header alone (no tensor is read), each
    checked as a folder's config files are."""
    _, stored = inspect_file(Path(path))
    configs = {c: config_from_dict(type(DEFAULTS[c]), stored.get(c, {}), f"{path} ({c} config)") for c in DEFAULTS}
    scheduler_config = stored.get("scheduler", SCHEDULER_CONFIG)
    try:
        SchedulerConfig.from_dict(scheduler_config)
    except ValueError as e:
        raise WeightsError(f"{path} (scheduler config): {str(e).removeprefix('scheduler config: ')}") from None
    return configs, scheduler_config


def convert(src, dst, ema=False, tokenizer=None) -> Path:
    """A model folder → one `.safetensors` file, or a single file → a folder in the published diffusers layout (with
    configs, scheduler, tokenizer: `tokenizer`'s, else CLIP's). Never overwrites `dst`; written under a temporary
    name, then renamed. A folder that would not load (a tokenizer larger than the text encoder's embedding, as CLIP's
    49408 tokens are for a small model converted without --tokenizer) is refused before anything is written."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; convert never overwrites — choose a new destination")
    if is_single_file(src) and dst.suffix.lower() == ".safetensors":
        raise WeightsError(f"{src} is a single file: it converts to a folder, not to {dst.name}")
    if not is_single_file(src) and (ema or dst.suffix.lower() != ".safetensors"):
        raise WeightsError(f"{src} is a folder: it converts to one file named *.safetensors (and --ema applies "
                           f"to single files only)")
    if is_single_file(src):  # refused before anything is written: a folder that would not load
        configs, _ = single_file_configs(src)
        tokens = CLIP_VOCAB_SIZE if tokenizer is None else size(load_tokenizer(tokenizer))
        check_vocab_size(tokens, configs["text_encoder"].vocab_size, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dst.parent, of=dst.name)  # what a killed convert to the same destination left
    tmp = temp_name(dst)  # the files' one temporary pattern, with this process's id
    tmp.mkdir()
    try:
        if is_single_file(src):
            out = file_to_folder(src, tmp / "out", ema, tokenizer)
        else:
            out = folder_to_file(src, tmp / "out.safetensors")
        os.rename(out, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def folder_to_file(folder, dst: Path) -> Path:
    folder, tensors, configs = check_folder(folder), {}, {}
    for c, (_, config_cls) in MODELS.items():
        path, configs[c] = weights_file(folder / c, STEMS[c]), read_config(config_cls, folder / c / "config.json")
        rename = lambda key: canonical_key(c, key)  # noqa: E731
        model = build(c, configs[c], lambda expected: read_state_dict(path, c, expected, "cpu", None, rename))  # strict
        with safe_open(str(path), framework="pt", device="cpu") as f:  # what the loader skips is carried over as is
            extras = {canonical_key(c, k, skip=False): f.get_tensor(k) for k in f.keys() if not canonical_key(c, k)}
        for k, v in {**model.state_dict(), **extras}.items():
            tensors[compvis_name(c, k, configs[c])] = v.reshape(compvis_shape(c, k, v.shape)).contiguous()
    meta = {c: dataclasses.asdict(cfg) for c, cfg in configs.items()}
    meta["scheduler"] = load_scheduler_config(folder)  # checked: the file's loader will check it again
    save_file(tensors, str(dst), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    usual_mode(dst)
    return dst


def file_to_folder(path, dst: Path, ema=False, tokenizer=None) -> Path:
    models, scheduler_config = load_single_file(path, "cpu", None, ema=ema)  # strict; the file's dtypes
    configs = {c: m.config for c, m in models.items()}
    dicts = {c: dict(m.state_dict()) for c, m in models.items()}
    extras = extra_tensors(configs["text_encoder"], configs["vae"], device="meta")  # names and shapes only
    with safe_open(str(path), framework="pt", device="cpu") as f:  # + what the loader skips: VAE encoder, position ids
        keys = set(f.keys())
        if not ema and sum(k.startswith("model_ema.") for k in keys) > 2:  # more than decay and num_updates
            warnings.warn(f"{path} also holds EMA UNet weights (model_ema.*), which are not converted; pass --ema "
                          f"(ema=True) to convert those instead of model.diffusion_model.*", stacklevel=3)
        for c, sd in extras.items():
            for k in sd:
                if (name := compvis_name(c, k, configs[c])) in keys:
                    v = f.get_tensor(name)
                    dicts[c][k] = v.flatten(1) if c == "vae" and CONV_1X1.search(k) else v  # [C, C, 1, 1] → [C, C]
    write_folder(dst, tuple(configs.values()), dicts, scheduler_config)
    if tokenizer is None:
        write_clip_tokenizer(dst / "tokenizer")
    else:
        src = Path(tokenizer) / "tokenizer" if (Path(tokenizer) / "tokenizer").is_dir() else Path(tokenizer)
        shutil.copytree(src, dst / "tokenizer")
    return dst
