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
