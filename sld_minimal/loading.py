"""Loading SD 1.x from its published safetensors files: strictly, without random initialisation, safetensors only.

Modules are built on the `meta` device (no memory, no init) and receive the file's tensors with
`load_state_dict(strict=True, assign=True)`, so loading costs about one read of the files. Every problem is a
`WeightsError` whose one-line message names the file and what to do.
"""
import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKLDecoder, VAEConfig


class WeightsError(Exception):
    """A model folder or file that cannot be loaded; the message says which file and how to fix it."""


# component folder -> (weights file stem, module, config)
COMPONENTS = {
    "text_encoder": ("model", CLIPTextModel, CLIPTextConfig),
    "unet": ("diffusion_pytorch_model", UNet2DConditionModel, UNetConfig),
    "vae": ("diffusion_pytorch_model", AutoencoderKLDecoder, VAEConfig),
}

# The one list of names that differ between files and modules: (component, regex on the file's key, replacement).
# The modules use the names of the published SD 1.4 files; these cover the other saves of the same weights.
LEGACY_ALIASES = [
    ("text_encoder", r"^(?!text_model\.)", "text_model."),  # recent transformers saves drop the prefix
    ("vae", r"\.attentions\.0\.to_q\.", ".attentions.0.query."),  # recent diffusers saves: new attention names
    ("vae", r"\.attentions\.0\.to_k\.", ".attentions.0.key."),
    ("vae", r"\.attentions\.0\.to_v\.", ".attentions.0.value."),
    ("vae", r"\.attentions\.0\.to_out\.0\.", ".attentions.0.proj_attn."),
]
# Tensors in the files that no module needs, skipped by name (never read): CLIP's position-id buffer (the module
# recomputes it) and the VAE encoder, which sampling does not use.
SKIPPED = {
    "text_encoder": re.compile(r"^text_model\.embeddings\.position_ids$"),
    "vae": re.compile(r"^(encoder|quant_conv)\."),
}

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def read_config(cls, path: Path):
    """A frozen config dataclass from a `config.json`: known keys are read, missing ones keep the SD 1.4
    defaults, unknown ones are ignored; keys that change the architecture beyond SD 1.x are refused."""
    if not path.is_file():
        raise WeightsError(f"{path} is missing; the model folder is incomplete — download it again")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); download it again") from None
    return config_from_dict(cls, raw, path)


def config_from_dict(cls, raw: dict, source):
    """`read_config` for a dict already parsed (`source` names where it came from in errors)."""
    if raw.get("use_linear_projection") or isinstance(raw.get("attention_head_dim"), list):
        raise WeightsError(f"{source} describes an SD 2.x-style UNet; only SD 1.x models are supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: {e}") from None


def weights_file(folder: Path, stem: str) -> Path:
    """`<stem>.safetensors`, else `<stem>.fp16.safetensors`; pickles are refused, always."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise WeightsError(f"{folder / pickles[0]} is a pickle; pickled weights can run code and are never loaded — "
                           f"get the .safetensors release of these weights (`sld-minimal download`)")
    raise WeightsError(f"{folder} has no {stem}.safetensors (nor {stem}.fp16.safetensors); "
                       f"the model folder is incomplete — download it again (`sld-minimal download`)")


def canonical_key(component: str, key: str, skip: bool = True):
    """The module attribute path for a file key, or None for a tensor that is skipped (`skip=False`: the aliased
    key even for those, so that `convert` can carry them over)."""
    for comp, pattern, replacement in LEGACY_ALIASES:
        if comp == component:
            key = re.sub(pattern, replacement, key, count=1)
    skipped = SKIPPED.get(component)
    return None if skip and skipped and skipped.search(key) else key


# safetensors' dtype names -> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_state_dict(path: Path, component: str, expected: dict, device, dtype, rename=None) -> dict:
    """Read exactly the tensors a module expects (name -> shape), checked one by one, cast to dtype on device
    (`dtype=None` keeps the file's). `rename(file key)` gives the module name, None to skip: by default the folder
    layout's `canonical_key`; `layouts.py` passes the single-file layout's."""
    rename = rename or (lambda k: canonical_key(component, k))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # checks the header; reads no tensor
            keys = {rename(k): k for k in f.keys()}
            keys.pop(None, None)
            unexpected, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
            if unexpected:
                raise WeightsError(f"{path}: unexpected key {keys[unexpected[0]]!r}; this is not an SD 1.x "
                                   f"{component} (or its config.json does not match the weights)")
            if missing:
                raise WeightsError(f"{path}: key {missing[0]!r} is missing; the file is incomplete or not an "
                                   f"SD 1.x {component}")
            for k, shape in expected.items():
                found = tuple(f.get_slice(keys[k]).get_shape())
                if found != tuple(shape):
                    raise WeightsError(f"{path}: key {keys[k]!r} has shape {list(found)}, expected {list(shape)} "
                                       f"(does {component}/config.json match the weights?)")
        return read_tensors(path, {k: keys[k] for k in expected}, device, dtype)
    except SafetensorError as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated — "
                           f"delete it and download again") from None
    except OSError as e:
        raise WeightsError(f"{path} cannot be read ({e})") from None


def read_tensors(path: Path, names: dict, device, dtype=None) -> dict:
    """{name: tensor} for {name: key in the file}, each read into memory of its own, cast to `dtype` on `device`.

    Why not use the file's bytes where they lie (a memory map, zero-copy)? A tensor in a safetensors file starts
    wherever the file put it — `conv_in.weight` at 52 mod 64 bytes in a model folder, at 8 mod 64 in a single file
    — and oneDNN picks its kernels, and so its summation order, by the alignment of the weights: the same weights at
    two offsets gave outputs 7e-7 apart on some CPUs. So every tensor is read into fresh memory from torch's
    allocator (64-byte aligned on the CPU), and results depend on the weights' values only. Plain reads, in file
    order: one copy, and no file mapping left in RSS."""
    with open(path, "rb", buffering=0) as fh:
        n = int.from_bytes(fh.read(8), "little")  # safetensors: u64 header size, JSON header, then the data
        header, base = json.loads(fh.read(n)), 8 + n
        state = {}
        for name, key in sorted(names.items(), key=lambda kv: header[kv[1]]["data_offsets"][0]):
            info = header[key]
            if info["dtype"] not in DTYPES:
                raise WeightsError(f"{path}: key {key!r} has dtype {info['dtype']}, which is not supported")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            _read_exactly(fh, base + begin, raw, path)
            file_dtype = DTYPES[info["dtype"]]
            # .to() returns the tensor itself when nothing changes, else a fresh (aligned) copy
            state[name] = raw.view(file_dtype).reshape(info["shape"]).to(device=device, dtype=dtype or file_dtype)
        return state


def _read_exactly(fh, offset: int, into: torch.Tensor, path):
    """Fill the uint8 tensor `into` with the file's bytes from `offset` on."""
    view, done = memoryview(into.numpy()).cast("B"), 0
    fh.seek(offset)
    while done < len(view):  # one read may return less (Linux caps a read near 2 GiB)
        got = fh.readinto(view[done:])
        if not got:
            raise WeightsError(f"{path} ends before its tensors do; it is truncated — delete it and download again")
        done += got


def load_component(folder, component: str, device="cpu", dtype=torch.float32, config=None):
    """Build one model (`text_encoder`, `unet` or `vae`) from `folder/<component>/` strictly, in `dtype` on `device`.
    `config` overrides the folder's config.json (tests use this to shrink nothing but check everything)."""
    stem, _, config_cls = COMPONENTS[component]
    sub = Path(folder) / component
    if not sub.is_dir():
        raise WeightsError(f"{sub} is missing; the model folder is incomplete — download it again (`sld-minimal download`)")
    path = weights_file(sub, stem)
    config = config or read_config(config_cls, sub / "config.json")
    return build(component, config, lambda expected: read_state_dict(path, component, expected, device, dtype))


def build(component: str, config, read):
    """The module built on `meta` (no memory, no init), then given `read(expected)`: the tensors for exactly the
    expected names and shapes (`read_state_dict` checks each one), assigned strictly."""
    with torch.device("meta"):
        model = COMPONENTS[component][1](config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(read(expected), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise WeightsError(f"weights folder {folder} does not exist; run `sld-minimal download --to {folder}` "
                           f"or pass the folder of an SD 1.x model")
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder of an SD 1.x model in the diffusers layout")
    return folder


def load_tokenizer(folder):
    """transformers' CLIPTokenizer from `folder/tokenizer` or `folder` itself (vocab.json + merges.txt): the only part
    not written here."""
    from transformers import CLIPTokenizer

    sub = Path(folder) / "tokenizer"
    if not sub.is_dir() and (Path(folder) / "vocab.json").is_file():
        sub = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (sub / name).is_file():
            raise WeightsError(f"{sub / name} is missing; the model folder is incomplete — download it again")
    return CLIPTokenizer.from_pretrained(str(sub))


def load_scheduler_config(folder) -> dict:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise WeightsError(f"{path} is missing; the model folder is incomplete — download it again")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); download it again") from None


def load_model(path, device="cpu", dtype=torch.float32, configs=None, tokenizer=None, ema=False):
    """(tokenizer, [text_encoder, unet, vae], scheduler config) from a model folder in the published diffusers layout
    or one `.safetensors` file in the original CompVis layout (`layouts.py`: SD 1.4's configs unless the file carries
    them, CLIP's tokenizer from `tokenizer.py`). `configs` ({"unet": UNetConfig(…), …}) and `tokenizer` (a folder
    with vocab.json + merges.txt) replace the model's; `ema` takes a single file's EMA UNet (`model_ema.*`)."""
    from .layouts import is_single_file, load_single_file
    from .tokenizer import clip_tokenizer

    configs, order = configs or {}, ("text_encoder", "unet", "vae")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise WeightsError(f"tokenizer folder {tokenizer} does not exist")
    if is_single_file(path):
        models, scheduler_config = load_single_file(path, device, dtype, configs, ema)
        parts, tok = [models[c] for c in order], load_tokenizer(tokenizer) if tokenizer else clip_tokenizer()
    elif ema:
        raise WeightsError(f"{path}: ema=True (--ema) applies to single-file checkpoints only")
    else:
        folder = check_folder(path)
        parts = [load_component(folder, c, device, dtype, configs.get(c)) for c in order]
        tok, scheduler_config = load_tokenizer(tokenizer or folder), load_scheduler_config(folder)
    if len(tok) > parts[0].config.vocab_size:  # ids past the embedding table would fail deep inside the model
        raise WeightsError(f"the tokenizer has {len(tok)} tokens but the text encoder of {path} embeds only "
                           f"{parts[0].config.vocab_size}; pass this model's tokenizer (tokenizer= / --tokenizer DIR)")
    return tok, parts, scheduler_config
