"""The speed-related parts: the small-map convolution path, the VAE's own dtype, and the opt-in torch.compile.
(Timings are not tested here; `tests/benchmarks/bench.py` measures them.)"""
import pytest
import torch
from torch import nn

from conftest import rel_err
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.unet import Conv2d

TOL = 1e-5  # as the module parity tests


@pytest.mark.parametrize("cin, cout, k, stride, size", [
    (32, 48, 3, 1, (4, 4)),   # the im2col + matmul path (≤ 64 output positions)
    (32, 48, 3, 1, (5, 7)),   # odd, non-square
    (32, 32, 3, 2, (9, 13)),  # a downsampler: stride 2 on an odd map
    (64, 32, 1, 1, (8, 8)),   # a 1×1 shortcut, exactly 64 positions
    (32, 48, 3, 1, (16, 16)),  # above the threshold: nn.Conv2d itself
])
def test_small_map_conv_equals_conv2d(cin, cout, k, stride, size):
    torch.manual_seed(0)
    ours = Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, cin, *size)
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    assert y.shape == y_ref.shape and y.is_contiguous()
    assert rel_err(y, y_ref) <= TOL


def test_vae_dtype(tiny_ckpt):
    """fp16 pipeline with an fp32 VAE: the decode runs in fp32 and the image is close to the all-fp32 one."""
    pipe = StableDiffusion.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert pipe.dtype == torch.bfloat16 and pipe.vae.post_quant_conv.weight.dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    full = StableDiffusion.from_pretrained(tiny_ckpt)
    ref = full.decode(z)
    assert pipe.decode(z).dtype == torch.float32
    vae_ref = full.vae.to(torch.bfloat16).to(torch.float32)  # the same weights: rounded to bf16, cast back
    with torch.no_grad():
        assert rel_err(pipe.decode(z), vae_ref(z)) <= TOL
    assert rel_err(pipe.decode(z), ref) < 0.05  # only the bf16 rounding of the weights


def test_compile_is_opt_in(tiny_ckpt):
    """Eager by default; `compile()` wraps the UNet (here with dynamo's eager backend: no compiler needed) and
    the generation stays the same."""
    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    kw = dict(safety="strong", num_inference_steps=3, height=32, width=32, seed=0, progress=False)
    eager = pipe("a photo of the cat", **kw).images
    assert pipe.compile(backend="eager") is pipe
    assert type(pipe.unet).__name__ == "OptimizedModule" and pipe.device.type == "cpu"
    assert rel_err(pipe("a photo of the cat", **kw).images, eager) <= TOL
