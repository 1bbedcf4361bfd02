"""CPU speed-ups laid over the plain models where the pipeline is built: the same weights and keys, only faster.

`unet.py`, `vae.py` and `clip.py` are the architecture with plain `nn` modules, and the loader returns them as they
are; `StableDiffusion.from_pretrained` hands the UNet and the VAE to `apply(model)`, as `StableDiffusion.compile()`
wraps the UNet on request. Neither changes a parameter or a key; the outputs differ from the plain modules' by
float rounding only (`tests/test_speedups.py`), and `tests/benchmarks/bench.py --only unet` measures the gain.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .unet import Block, ResnetBlock2D


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that computes small outputs on CPU (≤ 64 positions: the 8×8 and 4×4 levels at 256–512 px) as
    im2col and one matmul with the weight as stored. oneDNN's convolution copies the weight into its own layout on
    every call (up to 118 MB here, in freshly mapped pages) and is slow at these sizes (one thread, 1280 channels,
    4×4: 22 GFLOP/s against 74 for the matmul; 8×8: 52 against 72); from 16×16 up it is the faster one. These
    levels hold most of the UNet's weights. Same keys; the result differs only by float rounding."""

    def forward(self, x):
        B, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if x.device.type != "cpu" or ho * wo > 64:
            return super().forward(x)
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
