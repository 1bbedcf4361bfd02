"""The VAE (vae.py) against diffusers' AutoencoderKL: the decoder on the tiny and the small checkpoint; the encoder
(+ quant_conv) on small random configs, the same weights moved across by their published keys, the same posterior
mean and log-variance (fp32)."""
import pytest
import torch
from torch import nn

from sld_minimal.diffusers_folder import extra_tensors, load_component
from sld_minimal.testing import rel_err
from sld_minimal.testing.tiny import CONFIGS
from sld_minimal.vae import VAEConfig, VAEEncoder

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


# The published file keeps the old names of the mid-block attention; diffusers' module has the new ones.
NEW_NAMES = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]

CASES = {"tiny": CONFIGS["tiny"][2], "small": CONFIGS["small"][2],
         "toy": VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8)}


def reference(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         norm_num_groups=cfg.norm_num_groups, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n).eval()


@pytest.mark.parametrize("name", CASES)
def test_encoder_matches_diffusers(name):
    cfg = CASES[name]
    torch.manual_seed(0)
    ours = VAEEncoder(cfg).eval()
    quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    with torch.no_grad():  # perturb norms and biases so that a swapped or skipped parameter shows
        for k, v in [*ours.named_parameters(), *quant_conv.named_parameters()]:
            if k.endswith("bias") or "norm" in k:
                v.add_(0.1 * torch.randn_like(v))
    published = {f"encoder.{k}": v for k, v in ours.state_dict().items()}
    published |= {f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()}
    assert set(published) == set(extra_tensors(CONFIGS["tiny"][0], cfg)["vae"])  # the keys the writers use

    ref = reference(cfg)
    renamed = {}
    for k, v in published.items():
        for old, new in NEW_NAMES:
            k = k.replace(old, new) if ".attentions." in k else k
        renamed[k] = v
    missing, unexpected = ref.load_state_dict(renamed, strict=False)
    assert not unexpected
    assert not [k for k in missing if k.startswith(("encoder.", "quant_conv."))]

    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        mean, logvar = VAEEncoder.posterior(quant_conv(ours(x)))
        dist = ref.encode(x).latent_dist
    f = cfg.factor
    assert mean.shape == (2, cfg.latent_channels, 32 // f, 48 // f)
    assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL


def test_eps_of_the_output_norm():
    """SD's encoder normalises its output with eps 1e-6 (a difference visible only on near-constant maps)."""
    assert VAEEncoder(CASES["tiny"]).conv_norm_out.eps == 1e-6

