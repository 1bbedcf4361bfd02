"""The VAE decoder (vae.py) against diffusers' AutoencoderKL.decode, on the tiny and the small checkpoint."""
import pytest
import torch

from sld_minimal.diffusers_folder import load_component
from sld_minimal.testing import rel_err

TOL = 1e-5  # fp32 module parity: max|ours − ref| / max|ref|


@pytest.fixture(scope="module", params=["tiny_ckpt", "small_ckpt"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_vae_decoder_matches_diffusers(ckpt):
    diffusers = pytest.importorskip("diffusers")
    ours = load_component(ckpt, "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(ckpt, subfolder="vae").eval()
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = ours(z)
        ref_img = (ref.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    f = 2 ** (len(ours.config.block_out_channels) - 1)  # 8 for SD 1.4's four levels
    assert img.shape == (2, 3, 8 * f, 6 * f)
    assert rel_err(img, ref_img) <= TOL
    assert torch.equal(z, torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1)))  # input untouched
