"""Guidance methods (methods.py) and the loop's seams: conditions by name, several safety concepts, method objects,
callbacks that stop or replace the latents."""
import dataclasses

import numpy as np
import pytest
import torch

from sld_minimal import STOP, methods, presets, schedulers
from sld_minimal import guidance as G
from sld_minimal.guidance import DEFAULT_CONCEPT, Edit, SafetyConfig
from sld_minimal.conditions import PROMPT, UNCOND, concept
from sld_minimal.pipeline import StableDiffusion

KW = dict(seed=3, height=32, width=32, num_inference_steps=6, progress=False)
PROMPT_TEXT = "a photo of the cat"
NUDITY = SafetyConfig(scale=800, warmup_steps=2, threshold=0.02, momentum_scale=0.3, momentum_beta=0.5,
                      concept="the king")
DOG = SafetyConfig(scale=3000, warmup_steps=4, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0,
                   concept="a dog")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


def batch_sizes(pipe, **kw):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        out = pipe(PROMPT_TEXT, **(KW | kw))
    finally:
        handle.remove()
    return out, sizes


class Recorder:
    """A method that wraps another and keeps every branch's ε and what it was told, per step."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def reset(self):
        self.inner.reset()
        self.seen.clear()

    def conditions(self, step, num_steps, t):
        return self.inner.conditions(step, num_steps, t)

    def __call__(self, eps, step, num_steps, t):
        self.seen.append((step, num_steps, t, dict(eps)))
        return self.inner(eps, step, num_steps, t)


# ---------------------------------------------------------------- several safety concepts

@pytest.mark.bitexact
def test_a_list_of_one_config_is_the_single_config(pipe):
    one = pipe(PROMPT_TEXT, safety=NUDITY, **KW)
    listed = pipe(PROMPT_TEXT, safety=[NUDITY], **KW)
    assert torch.equal(one.latents, listed.latents) and np.array_equal(one.images, listed.images)
    assert one.parameters == listed.parameters


@pytest.mark.bitexact
def test_no_config_and_disabled_configs_are_plain_sd(pipe):
    plain, plain_sizes = batch_sizes(pipe, safety=None)
    empty, empty_sizes = batch_sizes(pipe, safety=[])
    weak = dataclasses.replace(NUDITY, scale=1.0)  # s_S ≤ 1: contributes nothing, costs no branch
    off, off_sizes = batch_sizes(pipe, safety=[weak])
    assert plain_sizes == empty_sizes == off_sizes == [2] * 7  # PNDM: steps + 1 calls of ∅ and prompt
    assert torch.equal(plain.latents, empty.latents) and torch.equal(plain.latents, off.latents)


def test_two_concepts_each_with_its_own_scales(pipe):
    """ε̂ = ε_∅ + s_g·(ε_p − ε_∅ − Σ_{c warm} γ_c), each concept with its own μ_c, δ_c and ν_c, from the
    recorded branches; DOG (s_m = 0) costs its branch only from its warm-up δ = 4 on."""
    recorder = Recorder(methods.SLD([NUDITY, DOG]))
    seen = []
    pipe(PROMPT_TEXT, method=recorder, callback=seen.append, **KW)
    momenta = [None, None]
    for (step, num_steps, t, eps), info in zip(recorder.seen, seen):
        keys = [UNCOND, PROMPT, concept("the king")] + ([concept("a dog")] if step >= 4 else [])
        assert list(eps) == keys and num_steps == 7 and t == info.timestep
        configs = [NUDITY, DOG][:len(keys) - 2]
        expected, momenta[:len(configs)], gammas, mus = G.multi_sld_guidance(
            eps[UNCOND], eps[PROMPT], [eps[k] for k in keys[2:]], 7.5, configs, step, momenta[:len(configs)])
        assert torch.equal(info.eps, expected)
        by_hand = eps[PROMPT] - eps[UNCOND]
        for c, g in zip(configs, gammas):
            by_hand = by_hand - g if step >= c.warmup_steps else by_hand
        assert torch.allclose(info.eps, eps[UNCOND] + 7.5 * by_hand, atol=1e-6)
        assert info.mu is not None and torch.equal(info.mu, mus[0] if len(mus) == 1 else torch.maximum(*mus))


def test_configs_with_the_same_concept_share_one_branch(pipe):
    twin = dataclasses.replace(DOG, concept=NUDITY.concept)
    _, sizes = batch_sizes(pipe, safety=[NUDITY, twin])
    assert sizes == [3] * 7


# ---------------------------------------------------------------- method objects, the research API

def test_a_schedule_passes_through_zero(pipe):
    """A per-step hook, `at`, sets the step's configuration before `conditions`. The base config has s_S = 0 (kept
    for the schedule to raise); at a step with s_S ≤ 1 the concept contributes nothing and costs no branch, and it
    acts again once s_S rises. Checked against a hand computation of eq. 7, whose γ_t is 0 over a step off:
    ν_{t+1} = β_m·ν_t. (Before the hook, SLD dropped the s_S = 0 config: plain CFG, silently.)"""
    scales = [0.0, 900.0, 0.0, 800.0, 800.0, 0.5, 800.0]  # NUDITY: δ = 2, s_m = 0.3, β_m = 0.5

    class Ramp(methods.SLD):
        def at(self, step, num_steps, t):
            self.current = [dataclasses.replace(c, scale=scales[step]) for c in self.safety]

    seen = []
    out = pipe(PROMPT_TEXT, method=Ramp(dataclasses.replace(NUDITY, scale=0.0)), callback=seen.append, **KW)
    assert [i.terms["safety"][0].scale for i in seen] == scales
    assert [len(i.branches) for i in seen] == [2, 3, 2, 3, 3, 2, 3]            # no branch where s_S ≤ 1
    assert [i.computed for i in seen] == [[s > 1] for s in scales]             # s_m ≠ 0: from step 0 where on
    assert [i.applied for i in seen] == [[s > 1 and k >= 2] for k, s in enumerate(scales)]
    nu = torch.zeros(1, 4, 16, 16)                                             # ν_0 = 0
    for info, s_S in zip(seen, scales):
        e_u, e_p = info.branches[UNCOND], info.branches[PROMPT]
        correction = 0.0
        if s_S <= 1:
            nu = NUDITY.momentum_beta * nu                                     # γ_t = 0: ν_{t+1} = β_m·ν_t
        else:
            e_s = info.branches[concept(NUDITY.concept)]
            d = e_p - e_s
            mu = torch.where(d < NUDITY.threshold, torch.clamp(s_S * d.abs(), max=1.0), torch.zeros_like(d))
            gamma = mu * (e_s - e_u) + NUDITY.momentum_scale * nu               # γ_t = μ ⊙ (ε_S − ε_∅) + s_m·ν_t
            nu = NUDITY.momentum_beta * nu + (1 - NUDITY.momentum_beta) * gamma
            correction = gamma if info.step >= NUDITY.warmup_steps else 0.0
        assert torch.allclose(info.eps, e_u + 7.5 * (e_p - e_u - correction), atol=1e-6), info.step
        got = info.terms["nu"][0]
        assert torch.allclose(torch.zeros_like(nu) if got is None else got, nu, atol=1e-7), info.step
    assert seen[1].terms["nu"][0].abs().max() > 0 and torch.equal(seen[2].terms["nu"][0], 0.5 * seen[1].terms["nu"][0])
    method_line = next(line for line in out.parameters[0].splitlines() if line.startswith("Method: "))
    assert "Ramp" in method_line and "Safety: medium" not in out.parameters[0]
    # never_acts steps through the hook: this one acts; one that is on only during its warm-up never does
    assert methods.never_acts(Ramp(dataclasses.replace(NUDITY, scale=0.0)), 7) is None
    scales = [900.0, 900.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert methods.never_acts(Ramp(NUDITY), 7) == ("no safety or edit term acts at any step of this run (each safety "
                                                   "concept has s_S ≤ 1 wherever it is past its warm-up)")
    assert methods.never_acts(methods.SLD(dataclasses.replace(NUDITY, scale=1.0)), 7) is None  # switched off


def test_method_conflicts_and_the_deprecated_function(pipe):
    with pytest.raises(ValueError, match="method= replaces safety=, edits= and guidance="):
        pipe(PROMPT_TEXT, method=methods.CFG(), safety="strong", **KW)
    with pytest.raises(TypeError, match="method must have conditions"):
        pipe(PROMPT_TEXT, method=lambda eps: eps, **KW)
    with pytest.warns(DeprecationWarning, match="guidance= is deprecated"):
        with pytest.raises(ValueError, match=r"s_S = 1.0 <= 1 turns SLD off"):
            pipe(PROMPT_TEXT, safety=dataclasses.replace(NUDITY, scale=1.0), guidance=G.sld_guidance, **KW)
    with pytest.warns(DeprecationWarning):
        via_function = pipe(PROMPT_TEXT, safety=NUDITY, guidance=G.sld_guidance, **KW)
    default = pipe(PROMPT_TEXT, safety=NUDITY, **KW)
    assert torch.equal(via_function.latents, default.latents)


def test_presets_come_from_one_registry():
    assert list(presets.PRESETS) == ["off", "weak", "medium", "strong", "max", "sega-medium", "sega-strong", "sega-max"]
    assert presets.preset("off") == [] and type(presets.build("off", guidance_scale=7.5)) is methods.CFG
    strong = presets.build(presets.safety_configs("Strong", "violence"), guidance_scale=5.0)
    assert strong.safety == [dataclasses.replace(G.PRESETS["strong"], concept="violence")]
    assert strong.guidance_scale == 5.0 and [c.name for c in strong.safety] == ["strong"]
    with pytest.raises(ValueError, match="unknown safety preset 'extreme'"):
        presets.preset("extreme")


def test_the_branch_skip_rule_lives_with_sld():
    weak = methods.SLD(G.PRESETS["weak"])  # s_m = 0, δ = 15: no safety branch before step 15
    assert weak.conditions(14, 50, 301) == [UNCOND, PROMPT]
    assert weak.conditions(15, 50, 281) == [UNCOND, PROMPT, concept(G.DEFAULT_CONCEPT)]
    assert methods.SLD(G.PRESETS["medium"]).conditions(0, 50, 981)[2:] == [concept(G.DEFAULT_CONCEPT)]
    assert methods.SLD(G.PRESETS["max"], guidance_scale=1.0).conditions(0, 50, 981) == [PROMPT]  # CFG off


# ---------------------------------------------------------------- callbacks

def test_a_callback_can_stop_sampling(pipe):
    seen = []

    def stop_at_2(info):
        seen.append(info.step)
        return STOP if info.step == 2 else None

    stopped = pipe(PROMPT_TEXT, safety="strong", callback=stop_at_2, **KW)
    assert seen == [0, 1, 2] and stopped.images.shape == (1, 32, 32, 3)
    full = []
    pipe(PROMPT_TEXT, safety="strong", callback=full.append, **KW)
    assert torch.equal(stopped.latents, full[2].next_latents)  # decoded what it had after step 2


def test_a_callback_can_replace_the_latents(pipe):
    seen = []

    def replace(info):
        seen.append(info)
        return torch.zeros_like(info.next_latents) if info.step == 3 else None

    pipe(PROMPT_TEXT, safety="strong", callback=replace, scheduler="ddim", **KW)
    assert torch.equal(seen[4].latents, torch.zeros_like(seen[4].latents))
    with pytest.raises(ValueError, match="a callback returns None, STOP or latents of shape"):
        pipe(PROMPT_TEXT, callback=lambda info: torch.zeros(1), **KW)


def test_a_replacement_under_pndm_meets_the_samplers_memory(pipe):
    """README's callback paragraph: replacement latents R become the next step's x and its ε is computed on them, but
    PNDM keeps its memory of the run. After step 0 its Heun correction steps again from the first latents x_T with
    (ε_0 + ε(R))/2, so R enters through its ε only; after a later step PLMS steps from R with a combination that still
    holds ε of up to three steps before it (computed on the old latents). Either way the run changes."""
    def run(replace_at):
        seen, noise = [], {}

        def callback(info):
            seen.append(info)
            if info.step == replace_at:
                noise["R"] = torch.randn(info.next_latents.shape, generator=torch.Generator().manual_seed(0))
                return noise["R"]

        pipe(PROMPT_TEXT, safety=None, callback=callback, **KW)
        return seen, noise.get("R")

    plain, _ = run(None)
    pndm = schedulers.from_config(pipe.scheduler_config, "pndm", KW["num_inference_steps"])
    t = [int(x) for x in pndm.timesteps]  # t_0, t_1, t_1, t_2, …: 7 iterations for 6 steps
    after0, r = run(0)
    assert torch.equal(after0[1].latents, r)  # the UNet saw R at step 1 …
    heun = pndm.transfer(after0[0].latents, (after0[0].eps + after0[1].eps) / 2, t[0], t[1])
    assert torch.allclose(after0[1].next_latents, heun, atol=1e-6)  # … but the step went from x_T, not from R
    assert not torch.equal(after0[1].eps, plain[1].eps) and not torch.equal(after0[-1].next_latents,
                                                                            plain[-1].next_latents)
    after3, r = run(3)
    e = [info.eps for info in after3]
    assert torch.equal(after3[4].latents, r) and all(torch.equal(e[k], plain[k].eps) for k in range(4))
    plms = (55 * e[4] - 59 * e[3] + 37 * e[2] - 9 * e[0]) / 24  # ε_0, ε_2, ε_3 from before R (ε_1: Heun's only)
    assert torch.allclose(after3[4].next_latents, pndm.transfer(r, plms, t[4], t[5]), atol=1e-5)
    seen = []  # DDIM has no memory: the step after a replacement is DDIM's step from R with ε(R), nothing else
    pipe(PROMPT_TEXT, safety=None, scheduler="ddim", callback=lambda info: seen.append(info) or (
        torch.zeros_like(info.next_latents) if info.step == 2 else None), **KW)
    ddim = schedulers.from_config(pipe.scheduler_config, "ddim", KW["num_inference_steps"])
    assert torch.equal(seen[3].latents, torch.zeros_like(seen[3].latents))
    assert torch.allclose(seen[3].next_latents, ddim.step(seen[3].eps, seen[3].timestep, seen[3].latents), atol=1e-6)


def test_step_info_fields_and_float_timesteps(pipe):
    seen = []
    pipe(PROMPT_TEXT, safety="medium", scheduler="euler", callback=seen.append, **KW)
    assert [i.step for i in seen] == list(range(6)) and {i.num_steps for i in seen} == {6}
    assert all(isinstance(i.timestep, float) for i in seen)  # Euler's timesteps are not integers
    info = seen[0]  # medium: δ = 10, s_m = 0.3: γ computed for the momentum, not applied
    assert list(info.branches) == [UNCOND, PROMPT, concept(G.DEFAULT_CONCEPT)]
    assert info.cfg_norm == pytest.approx((7.5 * (info.branches[PROMPT] - info.branches[UNCOND])).norm().item())
    assert info.computed == [True] and info.applied == [False] and info.mu is not None
    assert info.safety_norm == 0.0 and info.sld_active == 0.0


@pytest.mark.parametrize("name", ["dpmpp2m", "pndm"])
def test_a_sampler_object_is_used_as_is_and_again(pipe, name):
    """An object's own steps win; used again, step 0 clears its memory of the run (before, a used object was
    refused): the same image twice."""
    sampler = schedulers.from_config(pipe.scheduler_config, name, 4)
    by_object = pipe(PROMPT_TEXT, safety="max", scheduler=sampler, **KW)  # its 4 steps win over KW's 6
    by_name = pipe(PROMPT_TEXT, safety="max", scheduler=name, **(KW | dict(num_inference_steps=4)))
    assert torch.equal(by_object.latents, by_name.latents) and "Steps: 4, " in by_object.parameters[0]
    again = pipe(PROMPT_TEXT, safety="max", scheduler=sampler, **KW)
    assert torch.equal(again.latents, by_object.latents)


# ---------------------------------------------------------------- SEGA as the safety method: the presets

def test_sega_presets_have_the_harness_values():
    expected = {"sega-medium": (4, 10, 0.9, 0.3), "sega-strong": (7, 5, 0.85, 0.5), "sega-max": (10, 0, 0.75, 0.5)}
    for name, (scale, warmup, threshold, momentum) in expected.items():
        method = presets.build(name)  # what pipe(safety=name) and the CLIs run
        assert isinstance(method, methods.SEGA) and method.guidance_scale == 7.5
        assert method.edits == [Edit(DEFAULT_CONCEPT, scale=scale, threshold=threshold, warmup_steps=warmup,
                                     reverse=True)]
        assert (method.momentum_scale, method.momentum_beta) == (momentum, 0.4)
    assert presets.build(presets.safety_configs("sega-strong", "nudity"), (), 5.0).edits[0].concept == "nudity"
    assert presets.safety_configs("sega-max", "gore")[0].values()["method"] == "sega"
    with pytest.raises(ValueError, match="cannot be combined with edits"):
        presets.build("sega-strong", [Edit("a hat")])


SEGA_KW = dict(height=32, width=40, num_inference_steps=12, seed=0, progress=False)


@pytest.mark.bitexact
def test_pipe_takes_a_sega_preset(pipe):
    ours = pipe("a photo of the cat", safety="sega-strong", **SEGA_KW)
    by_hand = pipe("a photo of the cat", safety=None, edits=[Edit(DEFAULT_CONCEPT, scale=7, threshold=0.85,
                                                                  warmup_steps=5, reverse=True)],
                   edit_momentum_scale=0.5, edit_momentum_beta=0.4, **SEGA_KW)
    assert torch.equal(ours.latents, by_hand.latents)
    with pytest.raises(ValueError, match="cannot be combined with edits"):
        pipe("a photo of the cat", safety="sega-max", edits=[Edit("a hat")], **SEGA_KW)


# ---------------------------------------------------------------- when a method's terms act

def test_applied_follows_warmup_and_guidance_scale():
    """γ_c enters ε̂ from step δ_c on, with s_g > 1 (s_m ≠ 0 computes ν during warm-up but applies nothing)."""
    sld = methods.SLD([NUDITY, DOG], 7.5)                         # δ = 2 and 4, s_m = 0.3 and 0
    assert [sld.applied(s) for s in range(6)] == [[], [], [0], [0], [0, 1], [0, 1]]
    assert sld.computed(0) == [0]                                  # ν of NUDITY runs from step 0, unapplied
    assert methods.SLD([NUDITY], 1.0).applied(5) == []             # s_g ≤ 1: CFG and SLD off
    sega = methods.SEGA([Edit("a hat", warmup_steps=3, cooldown_steps=5), Edit("a dog", warmup_steps=1)], 7.5)
    assert [sega.applied(s) for s in range(6)] == [[], [1], [1], [0, 1], [0, 1], [1]]
    both = methods.SLDWithSEGA(methods.SLD([NUDITY], 7.5), methods.SEGA([Edit("a dog", warmup_steps=1)], 7.5))
    assert [both.applied(s) for s in range(3)] == [[], [1], [0, 1]]
    assert methods.CFG(7.5).applied(0) == []


@pytest.mark.parametrize("method, n, reason", [
    (methods.SLD([NUDITY, DOG], 7.5), 2, "warm-up (δ = 2, 4) is not shorter than the run's 2 sampling iterations"),
    (methods.SLD([NUDITY], 7.5), 3, None),                          # acts at step 2, the last
    (methods.SLD([NUDITY], 1.0), 50, "guidance scale s_g = 1.0 <= 1 turns classifier-free guidance off"),
    (methods.SEGA([Edit("a hat", warmup_steps=6)], 7.5), 6, "warm-up (δ = 6) is not shorter than the run's 6"),
    (methods.SEGA([Edit("a hat", warmup_steps=3, cooldown_steps=2)], 7.5), 9, "cooled down before its warm-up"),
    (methods.SLDWithSEGA(methods.SLD([DOG], 7.5), methods.SEGA([Edit("a hat", warmup_steps=9)], 7.5)), 4,
     "warm-up (δ = 4, 9)"),
    (methods.SLDWithSEGA(methods.SLD([DOG], 7.5), methods.SEGA([Edit("a hat", warmup_steps=1)], 7.5)), 4, None),
    (methods.CFG(7.5), 1, None),                                     # plain SD has nothing to act
    (Recorder(methods.SLD([NUDITY], 7.5)), 1, None),                 # a method without applied(): cannot say
])
def test_never_acts_names_why(method, n, reason):
    got = methods.never_acts(method, n)
    assert got is None if reason is None else reason in got, got


def test_several_safety_concepts_from_one_preset():
    configs = presets.safety_configs("strong", ["a dog", "the king"])
    assert [c.concept for c in configs] == ["a dog", "the king"]
    assert all(c.values() == G.PRESETS["strong"].values() for c in configs)
    with pytest.raises(ValueError, match="^the safety concept 'a dog' is given twice$"):
        presets.safety_configs("strong", ["a dog", "the king", "a dog"])
    with pytest.raises(ValueError, match="^a SEGA safety preset takes one safety concept"):
        presets.safety_configs("sega-strong", ["a dog", "the king"])
    assert presets.safety_configs("sega-strong", ["a dog"])[0].concept == "a dog"


def test_a_run_shorter_than_the_warmup_says_so_and_is_plain_sd(pipe):
    """PNDM makes 6 loop iterations for 5 steps; strong's δ = 7: the image is plain SD's, warned and recorded."""
    kw = KW | {"num_inference_steps": 5}
    with pytest.warns(UserWarning, match=r"warm-up \(δ = 7\) is not shorter than the run's 6 sampling iterations") as w:
        out = pipe(PROMPT_TEXT, safety="strong", **kw)
    assert [x.filename for x in w if "never acts" in str(x.message)] == [__file__]  # the caller's line, not torch's
    assert out.settings[0]["never_acts"].startswith("the safety guidance never acts")
    assert "Never acted: the safety guidance never acts" in out.parameters[0]
    assert torch.equal(out.latents, pipe(PROMPT_TEXT, safety=None, **kw).latents)
    acting = pipe(PROMPT_TEXT, safety="strong", **(KW | {"num_inference_steps": 8}))  # 9 iterations > δ
    assert acting.settings[0]["never_acts"] is None and "Never acted" not in acting.parameters[0]
