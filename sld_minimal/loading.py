"""Loading SD 1.x, one entry point for both layouts: `load_model(path)` → a `Model`: tokenizer, three models,
scheduler config, by name.

    weights.py           strict reading: WeightsError, configs, state dicts, modules built on `meta`
    tokenizer.py         a tokenizer folder, or CLIP's derived from a packaged file                (imports weights)
    diffusers_folder.py  the published diffusers folder                                            (imports weights)
    single_file.py       one CompVis `.safetensors` file; `convert`  (imports weights, diffusers_folder, tokenizer)
    loading.py           this: picks the layout                            (imports all four; pipeline imports it)

Safetensors only, strictly: every key present and of the right shape, or a one-line `WeightsError` naming the
file and the key. Pickled `.bin`/`.ckpt` files are refused, always.
"""
from pathlib import Path
from typing import NamedTuple

import torch

from .diffusers_folder import check_folder, load_component, load_scheduler_config
from .single_file import is_single_file, load_single_file, single_file_configs
from .noise_schedule import SchedulerConfig
from .tokenizer import clip_tokenizer, load_tokenizer
from .weights import MODELS, WeightsError, read_config


class Model(NamedTuple):
    """The parts of an SD 1.x model as loaded: plain modules, in eval mode, frozen."""
    tokenizer: object       # transformers' CLIPTokenizer
    text_encoder: object    # clip.CLIPTextModel
    unet: object            # unet.UNet2DConditionModel
    vae: object             # vae.AutoencoderKLDecoder
    scheduler_config: dict  # the model's scheduler_config.json (checked)


def load_model(path, device="cpu", dtype=torch.float32, configs=None, tokenizer=None, ema=False) -> Model:
    """The `Model` (tokenizer, text encoder, UNet, VAE decoder, scheduler config) from a model folder in the published diffusers layout
    or one `.safetensors` file in the original CompVis layout (`layouts.py`: SD 1.4's configs unless the file carries
    them, CLIP's tokenizer from `tokenizer.py`). `configs` ({"unet": UNetConfig(…), …}) and `tokenizer` (a folder
    with vocab.json + merges.txt) replace the model's; `ema` takes a single file's EMA UNet (`model_ema.*`)."""
    order = ("text_encoder", "unet", "vae")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise WeightsError(f"tokenizer folder {tokenizer} does not exist")
    if ema and not is_single_file(path):
        raise WeightsError(f"{path}: ema=True (--ema) applies to single-file checkpoints only")
    found, scheduler_config = read_configs(path)  # every config checked before any weight is read
    configs = {c: (configs or {}).get(c) or found[c] for c in order}
    if is_single_file(path):
        tok = load_tokenizer(tokenizer) if tokenizer else clip_tokenizer()
        models, _ = load_single_file(path, device, dtype, configs, ema)
        parts = [models[c] for c in order]
    else:
        tok = load_tokenizer(tokenizer or path)
        parts = [load_component(path, c, device, dtype, configs[c]) for c in order]
    if len(tok) > parts[0].config.vocab_size:  # ids past the embedding table would fail deep inside the model
        raise WeightsError(f"the tokenizer has {len(tok)} tokens but the text encoder of {path} embeds only "
                           f"{parts[0].config.vocab_size}; pass this model's tokenizer (tokenizer= / --tokenizer DIR)")
    return Model(tok, *parts, scheduler_config)


def read_configs(path) -> tuple[dict, dict]:
    """({component: config}, scheduler config dict) of a model folder or single file, every value type-checked,
    without reading a weight: what the command line validates a request against before loading."""
    if not is_single_file(path):
        folder = check_folder(path)
        for c in MODELS:
            if not (folder / c).is_dir():
                raise WeightsError(f"{folder / c} is missing; the model folder is incomplete — download it again "
                                   f"(`sld-minimal download`)")
        configs = {c: read_config(MODELS[c][1], folder / c / "config.json") for c in MODELS}
        return configs, load_scheduler_config(folder)  # which checks the scheduler config
    configs, scheduler_config = single_file_configs(path)
    try:
        SchedulerConfig.from_dict(scheduler_config)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    return configs, scheduler_config
