"""Argument checks the Python API and the command lines share: what type was wanted, said in one line.

Numbers may be Python's or numpy's scalars (`np.int64(32)` is an integer); NaN and infinity are refused. The
functions return plain Python values.
"""
import dataclasses
import math

import numpy as np
import torch


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
