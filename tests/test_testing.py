"""`sld_minimal.testing`: the pytest plugin works from a test file anywhere with one line, and the helpers do what
they say (the random checkpoints in the published layout, the pickle trap)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from sld_minimal import schedulers
from sld_minimal.testing import bchw, generator, randn, rel_err, tiny, trajectory
from sld_minimal.testing.pickles import write_trap

ROOT = Path(__file__).resolve().parents[1]

RESEARCH_TEST = '''
    pytest_plugins = ["sld_minimal.testing"]

    from sld_minimal import StableDiffusion
    from sld_minimal.testing import rel_err


    def test_my_variant(tiny_ckpt):
        pipe = StableDiffusion.from_pretrained(tiny_ckpt)
        kw = dict(num_inference_steps=2, height=32, width=32, seed=0, progress=False)
        assert rel_err(pipe("a cat", **kw).images, pipe("a cat", **kw).images) == 0.0
'''


def test_a_test_file_outside_tests_uses_the_fixture_with_one_line(tmp_path):
    (tmp_path / "test_research.py").write_text(textwrap.dedent(RESEARCH_TEST))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::pytest.PytestAssertRewriteWarning",
                          "test_research.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout.strip().splitlines()[-1]


def test_rel_err_and_bchw():
    assert bchw(1, 2, 3).shape == (1, 1, 1, 3) and bchw(1).dtype == torch.float64
    assert abs(rel_err(bchw(1.0, 2.1), bchw(1.0, -2.0)) - 4.1 / 2.0) < 1e-12  # max|ours − ref| / max|ref|


def test_seeded_draws_leave_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = randn((2, 3), seed=5)
    assert torch.equal(torch.rand(3), expected) and torch.equal(a, randn((2, 3), seed=5))
    assert torch.equal(torch.randn(4, generator=generator(7)), randn(4, seed=7))


def test_trajectory_is_the_sampling_loop():
    """Every x of a run, the first one x_T·init_noise_sigma, as a hand-written loop computes them."""
    for name in schedulers.SAMPLERS:
        noise, x_T = randn((1, 4, 4, 4), seed=1), randn((1, 4, 4, 4), seed=2)
        eps = lambda x_in, t: 0.3 * x_in + float(t) / 1000 * noise  # noqa: E731
        xs = trajectory(schedulers.from_config({}, name, 5), eps, x_T)
        s = schedulers.from_config({}, name, 5)
        x = x_T * s.init_noise_sigma
        assert len(xs) == len(s.timesteps) + 1 and torch.equal(xs[0], x)
        for t, got in zip(s.timesteps, xs[1:]):
            x = s.step(eps(s.scale_model_input(x, t), t), t, x)
            assert torch.equal(got, x), name


def test_tiny_writer_uses_the_published_layout(manifest):
    """`sld_minimal.testing.tiny` at full size writes exactly the published files' keys, shapes and dtypes."""
    dicts = tiny.published_state_dicts(*tiny.CONFIGS["sd14"], device="meta")
    for component, sd in dicts.items():
        assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in manifest[component].items()}
        dtypes = {k: {torch.float32: "F32", torch.int64: "I64"}[v.dtype] for k, v in sd.items()}
        assert dtypes == {k: v["dtype"] for k, v in manifest[component].items()}


def test_the_pickle_trap_is_live(tmp_path):
    """What the loaders' refusal tests rely on: unpickling the trap (as torch.load without weights_only does) creates
    its marker, and the file holds the tensors it was given."""
    marker = tmp_path / "unpickled"
    path = write_trap(tmp_path / "model.bin", marker, {"w": torch.arange(3.0)})
    assert path.is_file() and not marker.exists()
    loaded = torch.load(path, weights_only=False)
    assert marker.exists() and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
