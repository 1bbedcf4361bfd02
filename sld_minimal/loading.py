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
    if raw.get("use_linear_projection") or isinstance(raw.get("attention_head_dim"), list):
        raise WeightsError(f"{path} describes an SD 2.x-style UNet; only SD 1.x models are supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: {e}") from None


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


def canonical_key(component: str, key: str):
    """The module attribute path for a file key, or None for a tensor that is skipped."""
    for comp, pattern, replacement in LEGACY_ALIASES:
        if comp == component:
            key = re.sub(pattern, replacement, key, count=1)
    skipped = SKIPPED.get(component)
    return None if skipped and skipped.search(key) else key


def read_state_dict(path: Path, component: str, expected: dict, device, dtype) -> dict:
    """Read exactly the tensors a module expects (name -> shape), checked one by one, cast to dtype on device."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = {canonical_key(component, k): k for k in f.keys()}
            keys.pop(None, None)
            unexpected, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
            if unexpected:
                raise WeightsError(f"{path}: unexpected key {keys[unexpected[0]]!r}; this is not an SD 1.x "
                                   f"{component} (or its config.json does not match the weights)")
            if missing:
                raise WeightsError(f"{path}: key {missing[0]!r} is missing; the file is incomplete or not an "
                                   f"SD 1.x {component}")
            state = {}
            for k, shape in expected.items():
                found = tuple(f.get_slice(keys[k]).get_shape())
                if found != tuple(shape):
                    raise WeightsError(f"{path}: key {keys[k]!r} has shape {list(found)}, expected {list(shape)} "
                                       f"(does {component}/config.json match the weights?)")
                state[k] = f.get_tensor(keys[k]).to(device=device, dtype=dtype)
            return state
    except SafetensorError as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated — "
                           f"delete it and download again") from None
    except OSError as e:
        raise WeightsError(f"{path} cannot be read ({e})") from None


def load_component(folder, component: str, device="cpu", dtype=torch.float32, config=None):
    """Build one model (`text_encoder`, `unet` or `vae`) from `folder/<component>/` strictly, in `dtype` on `device`.
    `config` overrides the folder's config.json (tests use this to shrink nothing but check everything)."""
    stem, module_cls, config_cls = COMPONENTS[component]
    sub = Path(folder) / component
    if not sub.is_dir():
        raise WeightsError(f"{sub} is missing; the model folder is incomplete — download it again (`sld-minimal download`)")
    path = weights_file(sub, stem)
    config = config or read_config(config_cls, sub / "config.json")
    with torch.device("meta"):
        model = module_cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(read_state_dict(path, component, expected, device, dtype), strict=True, assign=True)
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
    """transformers' CLIPTokenizer from `folder/tokenizer` (vocab.json + merges.txt): the only part not written here."""
    from transformers import CLIPTokenizer

    sub = Path(folder) / "tokenizer"
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
