"""Loading SD 1.x, one entry point for both layouts: `load_model(path)` → a `Model`: tokenizer, three models,
scheduler config, by name.

    weights.py           strict reading: WeightsError, configs, state dicts, modules built on `meta`
    tokenizer.py         a tokenizer folder, or CLIP's derived from a packaged file                (imports weights)
    diffusers_folder.py  the published diffusers folder                                            (imports weights)
    single_file.py       one CompVis `.safetensors` file; `convert`  (imports weights, diffusers_folder, tokenizer)
    loading.py           this: picks the layout                            (imports all four; pipeline imports it)

Safetensors only, strictly: every key present and of the right shape, or a one-line `WeightsError` naming the
file and the key. Pickled `.bin`/`.ckpt` files are refused, always. Before any weight is read, every file is
checked by value too: model_index.json (`read_index`), each config (its class's own checks: `unet.UNetConfig`, …,
`noise_schedule.SchedulerConfig`), the tokenizer's files, and its size against the text encoder's embedding.
"""
from pathlib import Path
from typing import NamedTuple

import torch

from .diffusers_folder import check_folder, load_component, load_scheduler_config
from .single_file import is_single_file, load_single_file, single_file_configs
from .checks import kind
from .tokenizer import check_vocab_size, clip_tokenizer, load_tokenizer, size
from .weights import MODELS, WeightsError, read_config, read_json


# Models shipped inside the package, found by name wherever it is installed (`--weights toy`,
# `from_pretrained("toy")`); a file or folder of that name, where one exists, is taken instead.
PACKAGED = {"toy": Path(__file__).parent / "data" / "toy"}
# model_index.json's fields of this package (SD 1.4 has neither): the safety concept a model was made for (else the
# paper's), and the words a model trained on a small grammar knows (a prompt with others gets a warning)
SAFETY_CONCEPT_KEY = "sld_minimal_safety_concept"
VOCABULARY_KEY = "sld_minimal_vocabulary"
# model_index.json's `_class_name` of an SD 1.x folder: diffusers' pipeline (which this package writes too) and its
# safe variant; any other (SDXL, SD 2.x upscalers, video, …) has other parts and is refused before anything is read
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionPipelineSafe")


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


def read_index(path) -> dict:
    """A model folder's model_index.json, checked: an SD 1.x pipeline (`PIPELINES`), and this package's fields
    well-formed; {} for a single file or a folder without the file (which loads as its parts say)."""
    path = model_path(path)
    file = path / "model_index.json"
    if is_single_file(path) or not file.is_file():
        return {}
    try:
        index = read_json(file)
    except OSError as e:
        raise WeightsError(f"{file} cannot be read ({e.strerror or e})") from None
    if not isinstance(index, dict):
        raise WeightsError(f"{file}: expected a JSON object, got {kind(index)}")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise WeightsError(f"{file}: key '_class_name' is {name!r}, not an SD 1.x pipeline ({' or '.join(PIPELINES)}); "
                           f"only SD 1.x models are supported")
    concept, vocabulary = index.get(SAFETY_CONCEPT_KEY), index.get(VOCABULARY_KEY)
    if concept is not None and not (isinstance(concept, str) and concept.strip()):
        raise WeightsError(f"{file}: key {SAFETY_CONCEPT_KEY!r} must be a non-empty string, got {concept!r}")
    if vocabulary is not None and not (isinstance(vocabulary, list) and vocabulary
                                       and all(isinstance(w, str) and w for w in vocabulary)):
        raise WeightsError(f"{file}: key {VOCABULARY_KEY!r} must be a non-empty list of words")
    return index


def index_fields(path) -> tuple:
    """(safety concept, vocabulary) that a model folder's model_index.json names (`SAFETY_CONCEPT_KEY`,
    `VOCABULARY_KEY`), each None where absent (a single file, a folder without the file, SD 1.4)."""
    index = read_index(path)
    vocabulary = index.get(VOCABULARY_KEY)
    return index.get(SAFETY_CONCEPT_KEY), None if vocabulary is None else tuple(vocabulary)


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
    single = is_single_file(path)
    tok = load_tokenizer(tokenizer or path) if tokenizer or not single else clip_tokenizer()
    check_vocab_size(size(tok), configs["text_encoder"].vocab_size, path)  # the tokenizer too, before any weight
    if single:
        models, _ = load_single_file(path, device, dtype, configs, ema)
        parts = [models[c] for c in order]
    else:
        parts = [load_component(path, c, device, dtype, configs[c]) for c in order]
    return Model(tok, *parts, scheduler_config, *index_fields(path))


def read_configs(path) -> tuple[dict, dict]:
    """({component: config}, scheduler config dict) of a model folder (its model_index.json checked too) or single
    file, every value checked, without reading a weight: what the command line validates a request against before
    loading."""
    path = model_path(path)
    if not is_single_file(path):
        folder = check_folder(path)
        read_index(folder)  # an SDXL or video pipeline's folder is refused by name, before its parts
        for c in MODELS:
            if not (folder / c).is_dir():
                raise WeightsError(f"{folder / c} is missing; the model folder is incomplete — download it again "
                                   f"(`sld-minimal download`)")
        configs = {c: read_config(MODELS[c][1], folder / c / "config.json") for c in MODELS}
        return configs, load_scheduler_config(folder)  # which checks the scheduler config
    return single_file_configs(path)  # which checks the scheduler config
