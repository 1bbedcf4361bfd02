"""The UNet (unet.py): its timestep embedding in closed form, parity with diffusers' UNet2DConditionModel on the
tiny and the small checkpoint, and its resnet block's in-place operations against the plain formula."""
import pytest
import torch
import torch.nn.functional as F

from sld_minimal.diffusers_folder import load_component
from sld_minimal.testing import rel_err
from sld_minimal.unet import ResnetBlock2D, timestep_embedding

TOL = 1e-5  # fp32 module parity: max|ours − ref| / max|ref|


def test_timestep_embedding_closed_form():
    """e = [cos(t·ω_k), sin(t·ω_k)], ω_k = 10000^(−k/half)."""
    t = torch.tensor([0, 1, 500])
    e = timestep_embedding(t, 8)
    k = torch.arange(4, dtype=torch.float64)
    omega = 10000.0 ** (-k / 4)
    ref = torch.cat([torch.cos(t[:, None] * omega), torch.sin(t[:, None] * omega)], dim=-1)
    assert torch.allclose(e.double(), ref, atol=1e-4)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@pytest.fixture(scope="module", params=["tiny_ckpt", "small_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("size", [(8, 8), (9, 13)])  # (9, 13): not a multiple of 8: upsamplers resize to the skips
def test_unet_matches_diffusers(ckpt, size):
    diffusers = pytest.importorskip("diffusers")
    ours = load_component(ckpt, "unet")
    ref = diffusers.UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 77, ours.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for t in (981, 1, torch.tensor([500, 20])):
            assert rel_err(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample) <= TOL


def _resnet_out_of_place(block, x, temb):
    """ResnetBlock2D's formula written without in-place operations."""
    h = block.conv1(F.silu(block.norm1(x)))
    if temb is not None:
        h = h + block.time_emb_proj(F.silu(temb))[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    return (block.conv_shortcut(x) if hasattr(block, "conv_shortcut") else x) + h


@pytest.mark.parametrize("cin, cout, temb", [(32, 64, 16), (32, 32, 16), (32, 32, 0)])
def test_resnet_block_in_place_equals_the_formula_and_leaves_its_input(cin, cout, temb):
    """The block's in-place SiLU and adds (on tensors it made) give the out-of-place formula's output and
    gradients bit for bit, and the caller's x and temb are unchanged; with and without the 1×1 shortcut."""
    torch.manual_seed(0)
    block = ResnetBlock2D(cin, cout, temb, 8, 1e-5)
    x, t = torch.randn(2, cin, 6, 5, requires_grad=True), torch.randn(2, temb, requires_grad=True) if temb else None
    x0, t0 = x.detach().clone(), None if t is None else t.detach().clone()
    outputs, grads = [], []
    for forward in (block, lambda a, b: _resnet_out_of_place(block, a, b)):
        block.zero_grad()
        x.grad = None
        y = forward(x, t)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    assert torch.equal(*outputs)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(x.detach(), x0) and (t is None or torch.equal(t.detach(), t0))
