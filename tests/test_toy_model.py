"""What SLD does, on the toy model shipped with the package (`--weights toy`): on prompts whose objects the data
ties to red without naming it, SLD strong and max lower the share of red images against plain SD and keep the
background the prompt asked for — for every registered deterministic sampler, on seeds used neither in training nor
in the shipped table. Judged on rates over many images, so it holds on any CPU; it fails if the safety term's sign,
μ or the concept branch breaks (`test_a_broken_safety_term_is_caught` shows it)."""
import dataclasses

import numpy as np
import pytest

from sld_minimal import methods, schedulers
from sld_minimal.app.toy import world
from sld_minimal.conditions import PROMPT, UNCOND
from sld_minimal.diffusers_folder import SCHEDULER_CONFIG
from sld_minimal.guidance import PRESETS, cfg_guidance
from sld_minimal.loading import PACKAGED
from sld_minimal.pipeline import StableDiffusion

SEEDS = (2_000_000, 2_000_001)  # unseen: training draws from seeds 0..9, the shipped prompt set from 1_000_000 on
STEPS = 25                      # strong acts from step δ = 7, max from the first (δ = 0)
# Margins. Measured on the shipped model (2-core AMD EPYC, Zen 1; 60 images per cell, DDIM / PNDM / DPM-Solver++ /
# Euler): plain SD drew red in 90 / 78 / 85 / 88 % of them and kept every background; SLD strong drew red in 30 / 23
# / 28 / 32 % and kept every background; SLD max drew red in 7 / 10 / 5 / 5 % and kept the background in 78 / 85 /
# 77 / 78 % (max steers nearly every latent element of these 8×8 latents from the first step, and flips some
# backgrounds). The test asks: SD red in ≥ 60 % (the model shows the concept unasked), strong at most half of SD's
# rate with ≥ 90 % of backgrounds kept, max at most a quarter of SD's rate with ≥ 60 % kept: margins of several images
# each way on 60 images.
MIN_SD_RATE, MIN_FIDELITY = 0.6, 0.9
MAX_SHARE_OF_SD = {"strong": 0.5, "max": 0.25}
MIN_KEPT = {"strong": 0.9, "max": 0.6}
MAX_SLD_SHARE_OF_SD = 0.5  # what a broken SLD max must exceed (test_a_broken_safety_term_is_caught)


@pytest.fixture(scope="module")
def toy():
    if not (PACKAGED["toy"] / "model_index.json").is_file():
        pytest.fail(f"the toy model is missing from {PACKAGED['toy']}")
    return StableDiffusion.from_pretrained("toy")


def implicit_prompts():
    """The implicit prompts of the world (each asks for a background, never for a colour)."""
    return [p for p, category in world.eval_prompts() if category == "implicit"]


def rates(pipe, scheduler, safety=None, method=None):
    """(share of red images, share with the asked background) over 60 images: the 30 implicit prompts × 2 seeds."""
    prompts = implicit_prompts()
    images, asked = [], []
    for seed in SEEDS:
        options = {"safety": safety} if method is None else {"method": method}
        out = pipe(prompts, scheduler=scheduler, num_inference_steps=STEPS, seed=seed, progress=False, **options)
        images += list(out.images)
        asked += [world.asked_background(p) for p in prompts]
    assert len(images) >= 32
    red = np.mean([world.shows_concept(img) for img in images])
    kept = np.mean([world.background(img) == a for img, a in zip(images, asked)])
    return red, kept


# every registered sampler that draws no noise per step (DDIM with η = 0 among them)
DETERMINISTIC = [name for name in schedulers.SAMPLERS
                 if not schedulers.from_config(SCHEDULER_CONFIG, name, STEPS).stochastic]


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_sld_removes_the_concept_and_keeps_the_background(toy, scheduler):
    sd_red, sd_kept = rates(toy, scheduler, "off")
    assert sd_red >= MIN_SD_RATE and sd_kept >= MIN_FIDELITY, (sd_red, sd_kept)
    for preset in ("strong", "max"):
        red, kept = rates(toy, scheduler, preset)
        assert red <= MAX_SHARE_OF_SD[preset] * sd_red, (scheduler, preset, sd_red, red)
        assert kept >= MIN_KEPT[preset], (scheduler, preset, kept)


class FlippedSLD(methods.SLD):
    """SLD with the sign of its safety term flipped: ε̂ = ε_∅ + s_g·(ε_p − ε_∅ + γ), i.e. 2·CFG − SLD's ε̂."""

    def __call__(self, eps, step, num_steps, t):
        eps_hat, terms = super().__call__(eps, step, num_steps, t)
        return 2 * cfg_guidance(eps[UNCOND], eps[PROMPT], self.guidance_scale) - eps_hat, terms


class WrongBranchSLD(methods.SLD):
    """SLD handed the prompt's estimate where the concept's belongs (ε_S := ε_p): a batch index off by one."""

    def __call__(self, eps, step, num_steps, t):
        return super().__call__({**eps, **{c: eps[PROMPT] for c in eps if c not in (UNCOND, PROMPT)}},
                                step, num_steps, t)


def test_a_broken_safety_term_is_caught(toy):
    """The measure above fails where SLD is broken: the safety term's sign flipped, μ zero everywhere (a threshold
    no element passes: SLD never acts), or the concept branch replaced by the prompt's."""
    sd_red, _ = rates(toy, "pndm", "off")
    bound = MAX_SLD_SHARE_OF_SD * sd_red
    red_max = dataclasses.replace(PRESETS["max"], concept="red")
    assert rates(toy, "pndm", method=FlippedSLD(red_max))[0] > bound
    assert rates(toy, "pndm", dataclasses.replace(red_max, threshold=-1e9))[0] > bound
    assert rates(toy, "pndm", method=WrongBranchSLD(red_max))[0] > bound


def test_readmes_first_command_shows_the_concept_gone(tmp_path, monkeypatch):
    """README's first command, as written there: plain SD's four images are red, SLD's four are not, and each keeps
    the dark background the prompt asks for."""
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    from sld_minimal.app import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "sld-minimal generate" in x and "--weights toy" in x)
    commands = [shlex.split(c.strip())[1:] for c in line.split("&&") if c.strip().startswith("sld-minimal generate")]
    assert len(commands) == 2
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert cli.main(argv + ["--quiet"]) == 0
    prompt = commands[0][1]
    for stem, red in (("sd", True), ("sld", False)):
        paths = sorted(tmp_path.glob(f"{stem}-*.png"))
        assert len(paths) == 4 and re.search(r"--num-images 4", line)
        for p in paths:
            img = np.asarray(Image.open(p), dtype=np.float32) / 255
            assert world.shows_concept(img) is red and world.background(img) == world.asked_background(prompt), p
