"""What both command lines share (`cli.py`, `i2p/commands.py`): the one-line usage error and device/dtype choice.

A bad command line raises `UsageError`; `cli.main` prints it as one line and exits with status 2.
"""
import argparse
from pathlib import Path

DEFAULT_WEIGHTS = Path("weights/stable-diffusion-v1-4")


class UsageError(Exception):
    """A bad command line, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message over two lines; one line is enough
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def pick_device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise UsageError(f"--device {name}: no such device on this machine (try --device cpu)")
    return name


def pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        name = "fp32" if device == "cpu" else "fp16"
    if name == "fp16" and str(device).split(":")[0] == "cpu":  # refused before any weights are read
        raise UsageError("fp16 is not accelerated on the CPU: use --dtype bf16 or fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
