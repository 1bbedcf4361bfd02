"""The UNet (unet.py): its timestep embedding in closed form, and parity with diffusers' UNet2DConditionModel on the
tiny and the small checkpoint."""
import pytest
import torch

from sld_minimal.diffusers_folder import load_component
from sld_minimal.testing import rel_err
from sld_minimal.unet import timestep_embedding

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
