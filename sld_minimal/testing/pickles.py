"""A pickle that leaves a mark when it is unpickled: for tests that prove a loader never opens pickled weights.

    write_trap(folder / "unet/diffusion_pytorch_model.bin", marker)   # torch.save's format, as .bin/.ckpt are

Unpickling the file (`torch.load(path, weights_only=False)`, or any loader that trusts pickles) creates the file
`marker`, as a malicious checkpoint would run its code; a test then asserts that `marker` does not exist.
"""
from pathlib import Path

import torch


class _Trap:
    """Pickled as a call of `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_trap(path, marker, tensors=None) -> Path:
    """Write `path` as torch.save writes weights: a state dict (`tensors`, default one small tensor) with a trap
    beside it whose unpickling creates `marker`. Returns the path."""
    path = Path(path)
    torch.save({"state_dict": tensors or {"weight": torch.zeros(2)}, "trap": _Trap(marker)}, path)
    return path
