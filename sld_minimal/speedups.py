"""CPU speed-ups laid over the plain models where the pipeline is built: the same weights and keys, only faster.

`unet.py`, `vae.py` and `clip.py` are the architecture with plain `nn` modules, and the loader returns them as they
are; `StableDiffusion.from_pretrained` hands the UNet and the VAE to `apply(model)`, as `StableDiffusion.compile()`
wraps the UNet on request. Neither changes a parameter or a key; the outputs differ from the plain modules' by
float rounding only (`tests/test_speedups.py`), and `tests/benchmarks/bench.py --only unet` measures the gain.
For a CPU pipeline it also calls `keep_freed_memory()`, which changes no result, only how memory is reused.
"""
import ctypes
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Block, ResnetBlock2D


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that computes small outputs on CPU as im2col and one matmul with the weight as stored, where the
    weight outweighs the activations: ≤ 64 output positions (the 8×8 and 4×4 levels at 256–512 px) and
    C_out ≥ 2·B·positions. oneDNN's convolution copies the weight into its own layout on every call (up to 118 MB
    for SD 1.4, in freshly mapped pages) and is slow at these sizes (one thread, 1280 channels, 4×4: 22 GFLOP/s
    against 74 for the matmul; 8×8: 52 against 72). Where the activations are the larger part — a large batch, or a
    narrow model such as the toy one (64 channels) — oneDNN is the faster one (2-core Zen 1: 64 channels at 8×8,
    batch 6: 0.63 against 1.22 ms), and from 16×16 up it always is. Same keys; the result differs by float rounding."""

    def uses_matmul(self, x) -> bool:
        """Whether `forward(x)` takes the im2col + matmul path."""
        B, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        positions = ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
        return x.device.type == "cpu" and positions <= 64 and self.out_channels >= 2 * B * positions

    def forward(self, x):
        if not self.uses_matmul(x):
            return super().forward(x)
        B, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C·kh·kw, ho·wo)
        cols = cols.transpose(0, 1).reshape(-1, B * ho * wo)  # the whole batch as one matrix
        y = torch.addmm(self.bias[:, None], self.weight.view(self.out_channels, -1), cols)  # (Cout, B·ho·wo)
        return y.view(-1, B, ho, wo).transpose(0, 1).contiguous()  # (B, Cout, ho, wo)


def apply(model: nn.Module) -> nn.Module:
    """Give the convolutions of every resnet (UNet and VAE) and of the UNet's down/upsamplers the small-map path
    of `SmallMapConv2d`, in place: each keeps its parameters, only its class (so its forward) changes. The
    spatial transformers' 1×1 projections and the models' first and last convolutions stay plain. Returns model."""
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            convs = [module.conv1, module.conv2, getattr(module, "conv_shortcut", None)]
        elif isinstance(module, Block):
            convs = [s.conv for kind in ("downsamplers", "upsamplers") for s in getattr(module, kind, [])]
        else:
            continue
        for conv in convs:
            if type(conv) is nn.Conv2d:
                conv.__class__ = SmallMapConv2d
    return model


# glibc's mallopt parameters (malloc.h) and the values set: blocks up to MMAP_THRESHOLD (the most glibc's own
# dynamic threshold reaches) come from the heap and are reused, up to TRIM_THRESHOLD of free memory stays with
# the process, one heap (arena) for all threads
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD, TRIM_THRESHOLD, ARENA_MAX = 32 << 20, 1 << 30, 1
# the user's own malloc settings, which are then left alone
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                    "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST")


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse instead of giving it back to the OS after every tensor: True
    where the setting was made (Linux with glibc, and the environment sets none of glibc's malloc options).

    By default glibc serves a block above a threshold (128 KiB, raised up to 32 MiB as such blocks are freed) with a
    fresh mapping that it returns at free, and trims free memory above twice the threshold from its heap; each
    thread that allocates may get a heap (arena) of its own. A UNet call or a VAE decode then takes much of its
    activations in freshly faulted pages, every time. Here the threshold is fixed at 32 MiB, free memory is kept up
    to 1 GiB, and all threads share one heap, so a block freed by one serves the next allocation of any. Call it
    before the threads that allocate start (`from_pretrained` does, before loading). SD 1.4, 256 px, 3 PNDM steps
    with SLD on a 2-core EPYC: 3.5 million page faults in the generation without it, 0.35 million with it; peak RSS
    4.36 and 4.47–4.54 GiB (docs/performance.md). It applies to the whole process and changes no result; where
    one of `MALLOC_VARIABLES` or `GLIBC_TUNABLES=glibc.malloc.…` is set, the environment decides."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(v in os.environ for v in MALLOC_VARIABLES) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                and mallopt(M_ARENA_MAX, ARENA_MAX))
