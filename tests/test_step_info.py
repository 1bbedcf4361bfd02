"""The per-step diagnostics (`sampling.StepInfo`) mean one thing: a term is *computed* where the method evaluated it and
*applied* where it entered ε̂, and the shares and norms count applied terms only — 0.0 during a warm-up whether or
not the momentum needed μ there. One test per case, each against the branches the callback received."""
import pytest
import torch

from sld_minimal import methods
from sld_minimal.conditions import PROMPT, UNCOND, concept
from sld_minimal.guidance import Edit, SafetyConfig, cfg_guidance
from sld_minimal.pipeline import StableDiffusion

KW = dict(seed=3, height=32, width=32, num_inference_steps=6, scheduler="ddim", progress=False)
S_G = 7.5
KING = SafetyConfig(scale=800, warmup_steps=2, threshold=0.02, momentum_scale=0.3, momentum_beta=0.5,
                    concept="the king")                                   # s_m ≠ 0: γ computed from step 0
DOG = SafetyConfig(scale=3000, warmup_steps=4, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0,
                   concept="a dog")                                       # s_m = 0: no branch before δ


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


def run(pipe, method):
    seen = []
    pipe("a photo of the cat", method=method, callback=seen.append, **KW)
    assert len(seen) == 6
    return seen


def correction(info):
    """‖ε̂_CFG − ε̂‖: what the method changed against plain CFG, from the branches."""
    return (cfg_guidance(info.branches[UNCOND], info.branches[PROMPT], S_G) - info.eps).norm().item()


def share(mask):
    return mask.float().mean().item()


def test_warmup_with_no_momentum_reports_zero(pipe):
    """s_m = 0: during the warm-up the branch is skipped, nothing applied: sld_active and safety_norm are 0.0 (they
    were None, as if the method had no safety term)."""
    for info in run(pipe, methods.SLD(DOG, S_G))[:4]:
        assert info.computed == [False] and info.applied == [False] and info.mu is None
        assert info.sld_active == 0.0 and info.safety_norm == 0.0 and correction(info) == 0.0
        assert not info.sld_steered.any() and info.sld_steered.shape == info.eps.shape


def test_warmup_with_momentum_reports_zero(pipe):
    """s_m ≠ 0: γ and μ are computed during the warm-up (they build ν) but not applied: sld_active and safety_norm are
    0.0 (they read μ and γ as computed: the share of μ > 0 and ‖s_g γ‖)."""
    for info in run(pipe, methods.SLD(KING, S_G))[:2]:
        assert info.computed == [True] and info.applied == [False]
        assert share(info.mu > 0) > 0 and info.terms["gamma"][0].norm() > 0  # computed for the momentum
        assert info.sld_active == 0.0 and info.safety_norm == 0.0 and correction(info) == 0.0


def test_after_the_warmup_the_applied_term(pipe):
    """From δ on: sld_active is the share of μ > 0, safety_norm = ‖s_g γ‖ = ‖ε̂_CFG − ε̂‖."""
    for info in run(pipe, methods.SLD(KING, S_G))[2:]:
        assert info.computed == info.applied == [True]
        assert info.sld_active == share(info.mu > 0) > 0 and torch.equal(info.sld_steered, info.mu > 0)
        assert info.safety_norm == pytest.approx((S_G * info.terms["gamma"][0]).norm().item())
        assert info.safety_norm == pytest.approx(correction(info), rel=1e-5)


def test_two_concepts_with_different_warmups(pipe):
    """KING (δ = 2) and a second concept with momentum (δ = 4): at steps 2 and 3 both are computed and only KING is
    applied, so the diagnostics read KING's μ and γ alone (they summed γ and took μ's maximum over both)."""
    later = SafetyConfig(scale=3000, warmup_steps=4, threshold=0.0, momentum_scale=0.3, momentum_beta=0.4,
                         concept="a dog")
    seen = run(pipe, methods.SLD([KING, later], S_G))
    assert [i.applied for i in seen] == [[False, False]] * 2 + [[True, False]] * 2 + [[True, True]] * 2
    assert all(i.computed == [True, True] for i in seen)
    for info in seen[2:4]:
        mu_king, mu_dog = info.terms["mu"]
        gamma_king, gamma_dog = info.terms["gamma"]
        assert gamma_dog.norm() > 0 and (mu_dog > 0).any()  # the second concept's term exists, unapplied
        assert info.sld_active == share(mu_king > 0)
        assert info.safety_norm == pytest.approx((S_G * gamma_king).norm().item())
        assert info.safety_norm == pytest.approx(correction(info), rel=1e-5)
    for info in seen[4:]:
        assert info.sld_active == share((info.terms["mu"][0] > 0) | (info.terms["mu"][1] > 0))
        assert info.safety_norm == pytest.approx((S_G * sum(info.terms["gamma"])).norm().item())


def test_sega_as_safety(pipe):
    """SEGA as the safety method (one reversed edit, δ = 2, as the sega-* presets build it): the edit is computed at
    every step and applied from δ on; edit_steered is its mask there (empty before) and edit_norm = ‖γ̂‖, the term
    added to CFG's ε̂. SLD's diagnostics are None: there is no SLD term. With SLD beside it, the edit is numbered
    after SLD's configs."""
    edit = Edit("the king", scale=7, threshold=0.85, warmup_steps=2, reverse=True)
    seen = run(pipe, methods.SEGA([edit], S_G, momentum_scale=0.5, momentum_beta=0.4))
    for info in seen:
        acts = info.step >= 2
        assert info.computed == [True] and info.applied == info.edit_applied == [acts]
        assert info.edits[0]["applied"] is acts and info.sld_applied is None
        assert info.sld_active is None and info.safety_norm is None
        directions = info.terms["edit_directions"][0]
        assert torch.equal(info.edit_steered, (directions != 0) if acts else torch.zeros_like(directions).bool())
        assert share(info.edit_steered) == (info.edits[0]["kept"] if acts else 0.0)
        assert info.edit_norm == pytest.approx(correction(info), rel=1e-5, abs=1e-6)
        assert (info.edit_norm > 0) is acts
    both = run(pipe, methods.SLDWithSEGA(methods.SLD(KING, S_G), methods.SEGA([edit], S_G)))
    assert [i.applied for i in both] == [[False, False]] * 2 + [[True, True]] * 4
    assert [i.computed for i in both] == [[True, True]] * 6


def test_plain_cfg_reports_no_terms(pipe):
    info = run(pipe, methods.CFG(S_G))[0]
    assert info.applied is info.computed is info.sld_active is info.safety_norm is info.edit_norm is None
    assert info.sld_steered is None and info.edit_steered is None and info.cfg_norm > 0


def test_the_loop_and_the_method_agree_on_applied(pipe):
    """StepInfo's `applied` is what the method's `applied(step)` says (the rule `never_acts` asks), step by step."""
    method = methods.SLD([KING, DOG], S_G)
    seen = run(pipe, method)
    assert [[k for k, a in enumerate(i.applied) if a] for i in seen] == [method.applied(s) for s in range(6)]
    assert [list(i.branches)[2:] for i in seen] == [[concept("the king")]] * 4 + [[concept("the king"),
                                                                                  concept("a dog")]] * 2
