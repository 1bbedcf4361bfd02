"""Argument checks the Python API and the applications share: what type was wanted, said in one line; the limits
of the command lines and the demo.

Numbers may be Python's or numpy's scalars (`np.int64(32)` is an integer); NaN and infinity are refused. The
functions return plain Python values.
"""
import dataclasses
import math
import os
import sys
import warnings

import numpy as np
import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn(message: str, category=UserWarning):
    """`warnings.warn` attributed to the caller's own code: the first frame outside this package and torch (whose
    `no_grad` wraps the pipeline's call), so a warning points at the line that asked for the work."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of warn()
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def kind(value) -> str:
    return "None" if value is None else type(value).__name__


def integer(name: str, value) -> int:
    """An int from an int or a numpy integer; a TypeError saying what was wanted otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {kind(value)} {value!r}")
    return int(value)


def number(name: str, value) -> float:
    """A finite float from an int, a float or a numpy number; TypeError/ValueError saying what was wanted."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {kind(value)} {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32,
               "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype(name: str, value) -> torch.dtype:
    """torch.float32/float16/bfloat16, or one of their names ("fp16", "bfloat16", …)."""
    if isinstance(value, str) and value in DTYPE_NAMES:
        return DTYPE_NAMES[value]
    if value not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16 (or 'fp32', 'fp16', "
                        f"'bf16'), got {value!r}")
    return value


def device(name: str, value):
    """`value` (a string or torch.device) where this machine has that device: 'cpu', 'cuda' / 'cuda:N' (N below its
    GPU count), 'mps'; a one-line ValueError otherwise, the command line's `--device` rule (app/common.pick_device),
    instead of an error deep inside torch after the files were read."""
    try:
        where = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={value!r} is not a device (try {name}='cpu')") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (where.index or 0) >= count:
            has = ("" if not count else "; it has one CUDA device, cuda:0" if count == 1
                   else f"; it has {count} CUDA devices, cuda:0 to cuda:{count - 1}")
            raise ValueError(f"{name}={str(value)!r}: no such device on this machine (try {name}='cpu'{has})")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={str(value)!r}: no such device on this machine (try {name}='cpu')")
    return value


def config_values(cls, raw, source) -> dict:
    """The values of the frozen config dataclass `cls` found in `raw` (a parsed config.json), each checked against
    the type of the field's default (an int field wants an int, a float field a finite number, a tuple field a list
    of the default's element type, a field defaulting to None a string or null); unknown keys are ignored.
    ValueError "<source>: key 'k' must be …" otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {kind(raw)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        v, default = raw[f.name], f.default
        try:
            if isinstance(default, tuple):
                if not isinstance(v, (list, tuple)) or not v:
                    raise TypeError(f"a non-empty list, got {kind(v)} {v!r}")
                v = tuple(_like(default[0], x) for x in v)
            else:
                v = _like(default, v)
        except TypeError as e:
            raise ValueError(f"{source}: key {f.name!r} must be {e}") from None
        values[f.name] = v
    return values


def _like(default, v):
    """`v` checked against the type of `default`; TypeError("an integer, got …") otherwise."""
    if default is None:
        if v is not None and not isinstance(v, str):
            raise TypeError(f"a string or null, got {kind(v)} {v!r}")
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise TypeError(f"true or false, got {kind(v)} {v!r}")
        return v
    if isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"an integer, got {kind(v)} {v!r}")
        return v
    if isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"a finite number, got {kind(v)} {v!r}")
        return float(v)
    if isinstance(default, str):
        if not isinstance(v, str):
            raise TypeError(f"a string, got {kind(v)} {v!r}")
        return v
    return v


# Upper bounds of the command line and the demo (the Python API sets none): past them a request would run for
# hours or die in the allocator after the work. `--no-limits` lifts them.
MAX_PIXELS = 2048 * 2048
MAX_IMAGES = 64


def memory_estimate_gib(width: int, height: int, num_images: int) -> float:
    """A rough lower bound of the working memory beyond the weights: the VAE decoder's three largest live
    activations (128 channels at full size, fp32), plus every finished image kept as float32 RGB."""
    return (3 * 128 * width * height * 4 + num_images * 3 * width * height * 4) / 2**30


def check_limits(width: int, height: int, num_images: int):
    """ValueError past MAX_PIXELS or MAX_IMAGES; the message gives the memory estimate."""
    need = f"(needs roughly {memory_estimate_gib(width, height, num_images):.1f} GiB beyond the weights)"
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is more than 2048x2048 pixels {need}")
    if num_images > MAX_IMAGES:
        raise ValueError(f"{num_images} images in one call is more than {MAX_IMAGES} {need}")


def check_positive(config, *names):
    """ValueError "key 'k' must be …, got v" unless each named field of `config` (a number, or a tuple of numbers
    such as `block_out_channels`) is positive and finite: a zero width, layer count or scale builds a model that
    fails deep inside torch or silently draws nothing. The model config classes call it."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if not all(0 < v < float("inf") for v in values):
            wanted = ("a list of positive integers" if isinstance(value, tuple)
                      else "a positive finite number" if isinstance(value, float) else "a positive integer")
            raise ValueError(f"key {name!r} must be {wanted}, got {list(value) if isinstance(value, tuple) else value}")


def check_divides(config, name, channels):
    """ValueError unless the count in field `name` (GroupNorm groups, attention heads) divides every width in
    `channels`: torch refuses such a GroupNorm, and heads of unequal size cannot be split."""
    n = getattr(config, name)
    if any(c % n for c in channels):
        raise ValueError(f"key {name!r} ({n}) must divide each of the channel counts {list(channels)}")

