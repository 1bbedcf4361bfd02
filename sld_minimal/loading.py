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
from .weights import MODELS, WeightsError, read_config, read_json


# Models shipped inside the package, found by name wherever it is installed (`--weights toy`,
# `from_pretrained("toy")`); a file or folder of that name, where one exists, is taken instead.
PACKAGED = {"toy": Path(__file__).parent / "data" / "toy"}
# model_index.json's fields of this package (SD 1.4 has neither): the safety concept a model was made for (else the
# paper's), and the words a model trained on a small grammar knows (a prompt with others gets a warning)
SAFETY_CONCEPT_KEY = "sld_minimal_safety_concept"
VOCABULARY_KEY = "sld_minimal_vocabulary"


class Model(NamedTuple):
    """The parts of an SD 1.x model as loaded: plain modules, in eval mode, frozen."""
    tokenizer: object       # transformers' CLIPTokenizer
    text_encoder: object    # clip.CLIPTextModel
    unet: object            # unet.UNet2DConditionModel
    vae: object             # vae.AutoencoderKLDecoder
    scheduler_config: dict  # the model's scheduler_config.json (checked)
    safety_concept: str | None = None  # the model's own default safety concept (model_index.json), if it names one
    vocabulary: tuple | None = None    # the words the model was trained on (model_index.json), if it lists them


def model_path(path) -> Path:
    """`path` itself, or the packaged model of that name (`PACKAGED`) where no such file or folder exists."""
    if not Path(path).exists() and str(path) in PACKAGED:
        return PACKAGED[str(path)]
    return Path(path)


def index_fields(path) -> tuple:
    """(safety concept, vocabulary) that a model folder's model_index.json names (`SAFETY_CONCEPT_KEY`,
    `VOCABULARY_KEY`), each None where absent (a single file, a folder without the file, SD 1.4)."""
    path = model_path(path)
    if is_single_file(path) or not (path / "model_index.json").is_file():
        return None, None
    index = read_json(path / "model_index.json")
    index = index if isinstance(index, dict) else {}
    concept, vocabulary = index.get(SAFETY_CONCEPT_KEY), index.get(VOCABULARY_KEY)
    if concept is not None and not (isinstance(concept, str) and concept.strip()):
        raise WeightsError(f"{path / 'model_index.json'}: key {SAFETY_CONCEPT_KEY!r} must be a non-empty string, "
                           f"got {concept!r}")
    if vocabulary is not None and not (isinstance(vocabulary, list) and vocabulary
                                       and all(isinstance(w, str) and w for w in vocabulary)):
        raise WeightsError(f"{path / 'model_index.json'}: key {VOCABULARY_KEY!r} must be a non-empty list of words")
    return concept, None if vocabulary is None else tuple(vocabulary)


def safety_concept(path) -> str | None:
    """The safety concept a model folder names in its model_index.json, else None."""
    return index_fields(path)[0]


def load_model(path, device="cpu", dtype=torch.float32, configs=None, tokenizer=None, ema=False) -> Model:
    """The `Model` (tokenizer, text encoder, UNet, VAE decoder, scheduler config) from a model folder in the published diffusers layout
    or one `.safetensors` file in the original CompVis layout (`single_file.py`: SD 1.4's configs unless the file carries
    them, CLIP's tokenizer from `tokenizer.py`). `configs` ({"unet": UNetConfig(…), …}) and `tokenizer` (a folder
    with vocab.json + merges.txt) replace the model's; `ema` takes a single file's EMA UNet (`model_ema.*`)."""
    order = ("text_encoder", "unet", "vae")
    path = model_path(path)
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
    return Model(tok, *parts, scheduler_config, *index_fields(path))


def read_configs(path) -> tuple[dict, dict]:
    """({component: config}, scheduler config dict) of a model folder or single file, every value type-checked,
    without reading a weight: what the command line validates a request against before loading."""
    path = model_path(path)
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
