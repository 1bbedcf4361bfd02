"""The model-folder layout of SD 1.x, as `CompVis/stable-diffusion-v1-4` publishes it (diffusers'): read and write.

    model_index.json, scheduler/scheduler_config.json, tokenizer/ (vocab.json, merges.txt, …: `tokenizer.py`)
    text_encoder/config.json + model.safetensors
    unet/ and vae/: config.json + diffusion_pytorch_model.safetensors (or *.fp16.safetensors)

The modules' attribute paths are the published keys; other saves of the same weights differ in a few names, one
list here (`LEGACY_ALIASES`). The published VAE file also holds the encoder, which sampling never runs: it is
skipped when loading, and `vae.VAEEncoder` gives its key layout for writing (`convert`, `testing/tiny.py`).
"""
import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .files import usual_mode
from .noise_schedule import SchedulerConfig
from .vae import VAEConfig, VAEEncoder
from .weights import MODELS, PICKLE_SUFFIXES, WeightsError, build, read_config, read_json, read_state_dict

STEMS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}  # weights files
# SD 1.4's scheduler/scheduler_config.json (less `_diffusers_version`): its training noise schedule, and the default
# for a single file, which carries none
SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

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


def canonical_key(component: str, key: str, skip: bool = True):
    """The module attribute path for a file key, or None for a tensor that is skipped (`skip=False`: the aliased
    key even for those, so that `convert` can carry them over)."""
    for comp, pattern, replacement in LEGACY_ALIASES:
        if comp == component:
            key = re.sub(pattern, replacement, key, count=1)
    skipped = SKIPPED.get(component)
    return None if skip and skipped and skipped.search(key) else key


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


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise WeightsError(f"weights folder {folder} does not exist; run `sld-minimal download --to {folder}` "
                           f"or pass the folder of an SD 1.x model")
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder of an SD 1.x model in the diffusers layout")
    return folder


def load_component(folder, component: str, device="cpu", dtype=torch.float32, config=None):
    """Build one model (`text_encoder`, `unet` or `vae`) from `folder/<component>/` strictly, in `dtype` on `device`.
    `config` overrides the folder's config.json (tests use this to shrink nothing but check everything)."""
    sub = Path(folder) / component
    if not sub.is_dir():
        raise WeightsError(f"{sub} is missing; the model folder is incomplete — download it again (`sld-minimal download`)")
    path = weights_file(sub, STEMS[component])
    config = config or read_config(MODELS[component][1], sub / "config.json")
    rename = lambda key: canonical_key(component, key)  # noqa: E731
    return build(component, config, lambda expected: read_state_dict(path, component, expected, device, dtype, rename))


def load_scheduler_config(folder) -> dict:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    config = read_json(path)
    try:  # checked now, not at the first generation
        SchedulerConfig.from_dict(config)
    except ValueError as e:
        raise WeightsError(f"{path}: {str(e).removeprefix('scheduler config: ')}") from None
    return config


def extra_tensors(text_cfg, vae_cfg, device="meta") -> dict:
    """component -> {key: tensor} for what the published files hold beyond the modules (`SKIPPED`): the VAE encoder
    and its `quant_conv` (PyTorch's default init, drawn from the global generator; on `meta`, names and shapes
    only) and CLIP's `position_ids` buffer."""
    with torch.device(device):
        encoder, quant_conv = VAEEncoder(vae_cfg), nn.Conv2d(2 * vae_cfg.latent_channels, 2 * vae_cfg.latent_channels, 1)
    vae = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    vae |= {f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()}
    positions = torch.arange(text_cfg.max_position_embeddings, device=device)[None]
    return {"text_encoder": {"text_model.embeddings.position_ids": positions}, "vae": vae}


def write_folder(folder, model_configs, dicts, scheduler_config=SCHEDULER_CONFIG) -> Path:
    """The published layout's files but the tokenizer — config.json and weights per component, the scheduler config,
    model_index.json — for `model_configs` (text, unet, vae) and state dicts with the published keys."""
    folder, (text_cfg, unet_cfg, vae_cfg) = Path(folder), model_configs
    configs = {"text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
                                **dataclasses.asdict(text_cfg)},
               "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
                        "downsample_padding": 1, "mid_block_scale_factor": 1, "sample_size": 64,
                        **dataclasses.asdict(unet_cfg)},
               # old-style: no norm_num_groups, no scaling_factor (the published file omits both)
               "vae": {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3, "sample_size": 512,
                       "down_block_types": ["DownEncoderBlock2D"] * len(vae_cfg.block_out_channels),
                       "up_block_types": ["UpDecoderBlock2D"] * len(vae_cfg.block_out_channels),
                       **{k: v for k, v in dataclasses.asdict(vae_cfg).items()
                          if k not in ("norm_num_groups", "scaling_factor") or v != getattr(VAEConfig(), k)}}}
    for component, sd in dicts.items():
        sub = folder / component
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "config.json").write_text(json.dumps(configs[component], indent=2))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(sub / f"{STEMS[component]}.safetensors"),
                  metadata={"format": "pt"})
        usual_mode(sub / f"{STEMS[component]}.safetensors")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline",
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
