"""Strict weight reading, the primitives both checkpoint layouts share: configs, state dicts, modules built on `meta`.

Modules are built on the `meta` device (no memory, no init) and receive the file's tensors with
`load_state_dict(strict=True, assign=True)`, so loading costs about one read of the files. Every problem is a
`WeightsError` whose one-line message names the file and what to do. Which file and which key names: `diffusers_folder.py`
(the published diffusers folder) and `single_file.py` (one CompVis file) say; `loading.py` picks between them.
"""
import contextlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checks import config_values
from .clip import CLIPTextConfig, CLIPTextModel
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKLDecoder, VAEConfig


class WeightsError(Exception):
    """A model folder or file that cannot be loaded; the message says which file and how to fix it."""


# component -> (module, config)
MODELS = {
    "text_encoder": (CLIPTextModel, CLIPTextConfig),
    "unet": (UNet2DConditionModel, UNetConfig),
    "vae": (AutoencoderKLDecoder, VAEConfig),
}

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # refused by name, never opened: a pickle can run code


def read_config(cls, path: Path):
    """A frozen config dataclass from a `config.json`: known keys are read, missing ones keep the SD 1.4
    defaults, unknown ones are ignored; keys that change the architecture beyond SD 1.x are refused."""
    return config_from_dict(cls, read_json(path), path)


def read_json(path: Path):
    """A model folder's JSON file, parsed; a WeightsError naming it if it is missing or not JSON."""
    if not path.is_file():
        raise WeightsError(f"{path} is missing; the model folder is incomplete — download it again")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); download it again") from None


def config_from_dict(cls, raw: dict, source):
    """`read_config` for a dict already parsed (`source` names where it came from in errors)."""
    if isinstance(raw, dict) and (raw.get("use_linear_projection") or isinstance(raw.get("attention_head_dim"), list)):
        raise WeightsError(f"{source} describes an SD 2.x-style UNet; only SD 1.x models are supported")
    try:
        values = config_values(cls, raw, source)
    except ValueError as e:  # names the source and the key already
        raise WeightsError(str(e)) from None
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}: {e}") from None


# safetensors' dtype names -> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_state_dict(path: Path, component: str, expected: dict, device, dtype, rename) -> dict:
    """Read exactly the tensors a module expects (name -> shape), checked one by one, cast to dtype on device
    (`dtype=None` keeps the file's). `rename(file key)` gives the module name, None to skip: the folder layout's
    `diffusers_folder.canonical_key`, or the single-file layout's map (`single_file.py`)."""
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
    allocator (64-byte aligned on the CPU), and results depend on the weights' values only. Plain reads: one copy,
    and no file mapping left in RSS. Most of the time goes to the kernel handing out and zeroing fresh pages (about
    2 µs per 4 KiB page on a 2-core EPYC: 2 s for SD 1.4), which it does in parallel for parallel readers, so the
    tensors are read in batches of about `BATCH` bytes, each in `CHUNK`-byte pieces by torch's number of threads;
    a batch is cast (if `dtype` or `device` asks for it) before the next is read (docs/performance.md)."""
    with open(path, "rb", buffering=0) as fh:
        n = int.from_bytes(fh.read(8), "little")  # safetensors: u64 header size, JSON header, then the data
        header, base = json.loads(fh.read(n)), 8 + n
        infos = {name: header[key] for name, key in names.items()}  # dtype, shape, data_offsets
        for name, info in infos.items():
            if info["dtype"] not in DTYPES:
                raise WeightsError(f"{path}: key {names[name]!r} has dtype {info['dtype']}, which is not supported")
            if not DTYPES[info["dtype"]].is_floating_point:  # a cast would silently turn wrong data into weights
                raise WeightsError(f"{path}: key {names[name]!r} holds {info['dtype']} integers; SD 1.x weights are "
                                   f"floating point — this is not an SD 1.x checkpoint (or a quantized one, not "
                                   f"supported)")
        state = {}
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            for batch in _batches(sorted(infos, key=lambda name: _begin(infos[name])), lambda name: _size(infos[name])):
                raws = {name: torch.empty(_size(infos[name]), dtype=torch.uint8) for name in batch}
                pieces = [(fh, base + _begin(infos[name]) + i, memoryview(raw.numpy())[i:i + CHUNK])
                          for name, raw in raws.items() for i in range(0, len(raw), CHUNK)]
                if not all(pool.map(lambda piece: _read_exactly(*piece), pieces)):
                    raise WeightsError(f"{path} ends before its tensors do; it is truncated — delete it and "
                                       f"download again")
                for name, raw in raws.items():
                    tensor = raw.view(DTYPES[infos[name]["dtype"]]).reshape(infos[name]["shape"])
                    # any NaN/inf makes the sum non-finite (a fast pass); only then is the exact, slower test
                    # needed, as a sum of finite values may overflow too
                    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                        raise WeightsError(f"{path}: key {names[name]!r} contains NaN or infinite values; the file "
                                           f"is damaged — download it again")
                    # .to() returns the tensor itself when nothing changes, else a fresh (aligned) copy
                    state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        return state


CHUNK, BATCH = 16 << 20, 256 << 20  # bytes per read; bytes read before they are cast


def _begin(info: dict) -> int:
    """Where a tensor's bytes start in the data section (a header entry's `data_offsets`)."""
    return info["data_offsets"][0]


def _size(info: dict) -> int:
    """How many bytes a tensor has in the file."""
    begin, end = info["data_offsets"]
    return end - begin


def _batches(names: list, size) -> list:
    """`names` in runs of consecutive entries of about `BATCH` bytes together (`size(name)` each)."""
    batches, total = [[]], 0
    for name in names:
        if batches[-1] and total + size(name) > BATCH:
            batches.append([])
            total = 0
        batches[-1].append(name)
        total += size(name)
    return [batch for batch in batches if batch]


_SEEK = threading.Lock()  # where the OS has no positional read (Windows), one reader at a time: seek, then read


def _read_exactly(fh, offset: int, into: memoryview) -> bool:
    """Fill `into` with the file's bytes from `offset` on; False if the file ends first."""
    done = 0
    while done < len(into):  # one read may return less
        if hasattr(os, "preadv"):
            got = os.preadv(fh.fileno(), [into[done:]], offset + done)
        else:
            with _SEEK:
                fh.seek(offset + done)
                got = fh.readinto(into[done:])
        if not got:
            return False
        done += got
    return True


def build(component: str, config, read):
    """The module built on `meta` (no memory, no init), then given `read(expected)`: the tensors for exactly the
    expected names and shapes (`read_state_dict` checks each one), assigned strictly; in eval mode, frozen."""
    with torch.device("meta"), no_init_on_meta():
        model = MODELS[component][0](config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(read(expected), strict=True, assign=True)
    return model.eval().requires_grad_(False)


# the modules whose random init `no_init_on_meta` skips on `meta` (`reset_parameters` of each)
NO_INIT = (nn.Embedding, nn.Linear, nn.modules.conv._ConvNd)


@contextlib.contextmanager
def no_init_on_meta():
    """Build modules on the `meta` device without the random init of `NO_INIT`'s modules, which the loader
    overwrites with the file's weights anyway: torch's meta `normal_` imports torch._dynamo (about 2 s), and the
    Linear and Conv inits through meta tensors take a tenth of a second for SD 1.4's UNet, in a load of about 2 s.
    On a real device the modules are initialised as usual."""
    resets = {cls: cls.__dict__["reset_parameters"] for cls in NO_INIT}

    def unless_meta(reset):
        def reset_unless_meta(self):
            if not self.weight.is_meta:
                reset(self)
        return reset_unless_meta

    for cls, reset in resets.items():
        cls.reset_parameters = unless_meta(reset)
    try:
        yield
    finally:
        for cls, reset in resets.items():
            cls.reset_parameters = reset
