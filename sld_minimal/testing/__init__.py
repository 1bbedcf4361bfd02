"""Test helpers for sld_minimal and for research code on top of it: a pytest plugin, `rel_err`, small tensors, runs.

Enable the fixtures in any test file (or conftest.py) with one line, then ask for them by name:

    pytest_plugins = ["sld_minimal.testing"]

    def test_my_variant(tiny_ckpt):  # a random SD 1.x folder in the published layout, written once per session
        pipe = StableDiffusion.from_pretrained(tiny_ckpt)
        ...

Fixtures: `tiny_ckpt` (2 levels, 32 channels: for fast tests) and `small_ckpt` (SD 1.4's
topology at small widths), both written by `tiny.py`. Helpers: `rel_err` (the parity measure of every tolerance
in this project), `bchw` (hand-made numbers as a (1, 1, 1, n) tensor), `generator`/`randn` (seeded, leaving the
global generator alone) and `trajectory` (a sampler run with a stand-in for the UNet, every latent kept).
The fixtures need pytest; the helpers and `tiny.py` (which `sld-minimal tiny` runs) do not, so a user's install
without pytest still writes random checkpoints. Nothing in the library imports this package. It asserts nothing
itself, so pytest need not rewrite it: PYTEST_DONT_REWRITE (no warning when a test file imports it before its plugin
line).
"""
import torch

from . import tiny

try:
    import pytest
except ModuleNotFoundError:  # no pytest: the helpers and tiny.py without the fixtures
    pytest = None


def rel_err(ours, ref) -> float:
    """The parity measure used throughout: max|ours − ref| / max|ref|."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def bchw(*values, dtype=torch.float64) -> torch.Tensor:
    """A (1, 1, 1, n) tensor of the given numbers: the smallest (B, C, h, w) that holds n of them (float64, so that
    decimal numbers worked out by hand compare exactly enough)."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with `seed`: draws that do not touch (or depend on) torch's global generator."""
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Standard normal numbers of `shape`, the same for the same seed, from a generator of their own."""
    return torch.randn(shape, generator=generator(seed), dtype=dtype)


def trajectory(sampler, eps, x_T: torch.Tensor, **step_options) -> list:
    """Every latent of one sampling run, [x_T·init_noise_sigma, x after step 1, …, x after the last step], with
    `eps(x_in, t)` in place of the UNet — the loop of `schedulers.py`:

        x = x_T · init_noise_sigma;  for t in timesteps: x = step(eps(scale_model_input(x, t), t), t, x)

    `step_options` go to every `step` (e.g. generator=…). A diffusers scheduler runs the same (set its timesteps
    first; its `step` returns an object whose `prev_sample` is taken), so one call on each side compares them."""
    x = x_T * sampler.init_noise_sigma
    xs = [x]
    for t in sampler.timesteps:
        out = sampler.step(eps(sampler.scale_model_input(x, t), t), t, x, **step_options)
        x = out if isinstance(out, torch.Tensor) else out.prev_sample
        xs.append(x)
    return xs


if pytest is not None:
    @pytest.fixture(scope="session")
    def tiny_ckpt(tmp_path_factory):
        """A random SD 1.x model folder (`tiny.CONFIGS["tiny"]`) in the published layout, with its tokenizer."""
        return tiny.write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")

    @pytest.fixture(scope="session")
    def small_ckpt(tmp_path_factory):
        """As `tiny_ckpt` with SD 1.4's topology (4 levels, 2 layers per block, 8 heads) at small widths."""
        return tiny.write_checkpoint(tmp_path_factory.mktemp("small"), "small")
