"""Tests of sld_minimal.guidance on tiny hand-made tensors.

Oracles: numbers worked out by hand (written in the tests), and the expression lines of
diffusers' StableDiffusionPipelineSafe / SemanticStableDiffusionPipeline re-typed below
(the pipelines themselves need models, so they cannot be called here).
"""
import dataclasses

import pytest
import torch

from sld_minimal.guidance import (
    DEFAULT_CONCEPT, PRESETS, Edit, SafetyConfig, cfg_guidance, edit_directions, safety_scale,
    sega_guidance, sld_guidance,
)

D = torch.float64  # hand-computed cases use float64 so decimal numbers compare exactly enough


def t(*values):
    """A (1, 1, 1, n) float64 tensor: the smallest (B, C, h, w) that holds n numbers."""
    return torch.tensor(values, dtype=D).reshape(1, 1, 1, -1)


def cfg(**kw):
    base = dict(scale=1000, warmup_steps=0, threshold=0.01, momentum_scale=0.0, momentum_beta=0.0)
    return SafetyConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- SLD: μ

def test_mu_clamps_at_one():
    # s_S·|ε_p − ε_S| = 1000·0.5 = 500 > 1  ->  μ = 1
    mu = safety_scale(t(0.0), t(0.5), cfg(scale=1000))
    assert mu.item() == 1.0


def test_mu_below_one_when_small():
    # ε_p − ε_S = −0.0002, s_S = 1000  ->  μ = 0.2 ; and −0.0005 -> 0.5
    mu = safety_scale(t(0.0, 0.0), t(0.0002, 0.0005), cfg(scale=1000))
    assert torch.allclose(mu, t(0.2, 0.5), rtol=0, atol=1e-12)


def test_threshold_sign_and_equality():
    # λ = 0.01, s_S = 10. d = ε_p − ε_S = −0.5, 0.005, 0.01 (equal to λ), 0.02
    # d < λ acts: μ = min(1, 10·|d|) = 1, 0.05 ; d ≥ λ gives 0 (equality included)
    mu = safety_scale(t(-0.5, 0.005, 0.01, 0.02), t(0, 0, 0, 0), cfg(scale=10, threshold=0.01))
    assert torch.allclose(mu, t(1.0, 0.05, 0.0, 0.0), rtol=0, atol=1e-12)
    assert mu[0, 0, 0, 2].item() == 0.0


def test_threshold_negative_lambda():
    # λ = −0.1: d = −0.05 is ≥ λ -> 0 ; d = −0.2 < λ -> min(1, 2·0.2) = 0.4 ; d = −0.1 (equal) -> 0
    mu = safety_scale(t(-0.05, -0.2, -0.1), t(0, 0, 0), cfg(scale=2, threshold=-0.1))
    assert torch.allclose(mu, t(0.0, 0.4, 0.0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- SLD: ε̂

def test_hand_computed_scalar_example():
    # ε_∅ = 0.1, ε_p = 0.3, ε_S = 0.3002, s_S = 1000, λ = 0.01, s_m = 0.3, β_m = 0.4, ν = 0.1, s_g = 7.5
    # μ = min(1, 1000·0.0002) = 0.2           (ε_p − ε_S = −0.0002 < λ)
    # γ = 0.2·(0.3002 − 0.1) + 0.3·0.1 = 0.04004 + 0.03 = 0.07004
    # ν' = 0.4·0.1 + 0.6·0.07004 = 0.082024
    # ε̂ = 0.1 + 7.5·((0.3 − 0.1) − 0.07004) = 0.1 + 7.5·0.12996 = 1.0747
    c = SafetyConfig(scale=1000, warmup_steps=10, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    eps, nu = sld_guidance(t(0.1), t(0.3), t(0.3002), 7.5, c, step=10, momentum=t(0.1))
    assert abs(eps.item() - 1.0747) < 1e-12
    assert abs(nu.item() - 0.082024) < 1e-12


def test_warmup_gives_plain_cfg_then_subtracts_gamma():
    torch.manual_seed(0)
    u, p, s = (torch.randn(2, 4, 3, 3) for _ in range(3))
    c = SafetyConfig(scale=5, warmup_steps=3, threshold=0.5, momentum_scale=0.0, momentum_beta=0.0)
    before, _ = sld_guidance(u, p, s, 7.5, c, step=2)
    assert torch.equal(before, cfg_guidance(u, p, 7.5))
    after, _ = sld_guidance(u, p, s, 7.5, c, step=3)
    gamma = safety_scale(p, s, c) * (s - u)
    assert torch.allclose(after, u + 7.5 * ((p - u) - gamma), atol=1e-6)
    assert not torch.allclose(after, before)


def test_momentum_recurrence_explicit_numbers():
    # ε_∅ = ε_p = 0, ε_S = 1 -> μ = 1, μ·(ε_S − ε_∅) = 1 ; s_m = β_m = 0.5, s_g = 2, δ = 0
    # t=0: γ = 1 + 0.5·0 = 1,          ν = 0.5·0 + 0.5·1 = 0.5,          ε̂ = 2·(0 − γ) = −2
    # t=1: γ = 1 + 0.5·0.5 = 1.25,     ν = 0.25 + 0.625 = 0.875,         ε̂ = −2.5
    # t=2: γ = 1 + 0.5·0.875 = 1.4375, ν = 0.4375 + 0.71875 = 1.15625,   ε̂ = −2.875
    c = cfg(scale=1000, momentum_scale=0.5, momentum_beta=0.5)
    nu, got = None, []
    for i in range(3):
        eps, nu = sld_guidance(t(0.0), t(0.0), t(1.0), 2.0, c, step=i, momentum=nu)
        got.append((eps.item(), nu.item()))
    assert got == [(-2.0, 0.5), (-2.5, 0.875), (-2.875, 1.15625)]


def test_momentum_recurrence_matches_hand_loop():
    torch.manual_seed(1)
    c = SafetyConfig(scale=3.0, warmup_steps=2, threshold=0.2, momentum_scale=0.4, momentum_beta=0.6)
    nu, ref_nu = None, torch.zeros(1, 4, 2, 2, dtype=D)
    for i in range(6):
        u, p, s = (torch.randn(1, 4, 2, 2, dtype=D) for _ in range(3))
        eps, nu = sld_guidance(u, p, s, 5.0, c, step=i, momentum=nu)
        d = p - s
        mu = torch.where(d < 0.2, torch.minimum(torch.ones_like(d), 3.0 * d.abs()), torch.zeros_like(d))
        gamma = mu * (s - u) + 0.4 * ref_nu
        ref_nu = 0.6 * ref_nu + 0.4 * gamma
        ref = u + 5.0 * (p - u - (gamma if i >= 2 else 0))
        assert torch.allclose(eps, ref, atol=1e-12) and torch.allclose(nu, ref_nu, atol=1e-12)


def test_momentum_builds_up_during_warmup():
    # same numbers as the explicit case but δ = 2: steps 0, 1 are plain CFG (= 0 here) while ν
    # still goes 0.5, 0.875; step 2 then subtracts γ = 1.4375 -> ε̂ = −2.875
    c = cfg(scale=1000, warmup_steps=2, momentum_scale=0.5, momentum_beta=0.5)
    nu, got = None, []
    for i in range(3):
        eps, nu = sld_guidance(t(0.0), t(0.0), t(1.0), 2.0, c, step=i, momentum=nu)
        got.append((eps.item(), nu.item()))
    assert got == [(0.0, 0.5), (0.0, 0.875), (-2.875, 1.15625)]


def test_zero_safety_scale_is_exactly_cfg():
    torch.manual_seed(2)
    c = SafetyConfig(scale=0, warmup_steps=0, threshold=0.5, momentum_scale=0.7, momentum_beta=0.3)
    nu = None
    for i in range(4):
        u, p, s = (torch.randn(2, 4, 3, 3) for _ in range(3))
        eps, nu = sld_guidance(u, p, s, 7.5, c, step=i, momentum=nu)
        assert torch.equal(eps, cfg_guidance(u, p, 7.5))
        assert torch.equal(nu, torch.zeros_like(nu))


def test_cfg_guidance_formula():
    # ε_∅ + s_g·(ε_p − ε_∅) = 1 + 3·(2 − 1) = 4
    assert cfg_guidance(t(1.0), t(2.0), 3.0).item() == 4.0


def _diffusers_safe_step(noise_pred_uncond, noise_pred_text, noise_pred_safety_concept, guidance_scale,
                         safety_momentum, i, sld_guidance_scale, sld_warmup_steps, sld_threshold,
                         sld_momentum_scale, sld_mom_beta):
    """The guidance lines of StableDiffusionPipelineSafe.__call__ (diffusers 0.42.1), re-typed."""
    noise_guidance = noise_pred_text - noise_pred_uncond
    if safety_momentum is None:
        safety_momentum = torch.zeros_like(noise_guidance)
    scale = torch.clamp(torch.abs((noise_pred_text - noise_pred_safety_concept)) * sld_guidance_scale, max=1.0)
    safety_concept_scale = torch.where(
        (noise_pred_text - noise_pred_safety_concept) >= sld_threshold, torch.zeros_like(scale), scale)
    noise_guidance_safety = torch.mul((noise_pred_safety_concept - noise_pred_uncond), safety_concept_scale)
    noise_guidance_safety = noise_guidance_safety + sld_momentum_scale * safety_momentum
    safety_momentum = sld_mom_beta * safety_momentum + (1 - sld_mom_beta) * noise_guidance_safety
    if i >= sld_warmup_steps:
        noise_guidance = noise_guidance - noise_guidance_safety
    noise_pred = noise_pred_uncond + guidance_scale * noise_guidance
    return noise_pred, safety_momentum


@pytest.mark.parametrize("name", ["medium", "strong", "max"])
def test_parity_with_diffusers_safe_pipeline(name):
    torch.manual_seed(3)
    c = SafetyConfig.preset(name)
    nu = ref_nu = None
    for i in range(12):
        # small safety offsets so that all branches (clamped, partial, thresholded) occur
        u = torch.randn(2, 4, 8, 8)
        p = u + 0.1 * torch.randn_like(u)
        s = p + 0.01 * torch.randn_like(u)
        eps, nu = sld_guidance(u, p, s, 7.5, c, step=i, momentum=nu)
        ref, ref_nu = _diffusers_safe_step(u, p, s, 7.5, ref_nu, i, c.scale, c.warmup_steps, c.threshold,
                                           c.momentum_scale, c.momentum_beta)
        assert torch.equal(eps, ref) and torch.equal(nu, ref_nu)


# ----------------------------------------------------------------------------- SLD: config

def test_presets_values():
    assert PRESETS["weak"].values() == dict(scale=200.0, warmup_steps=15, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0)
    assert PRESETS["medium"].values() == dict(scale=1000.0, warmup_steps=10, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    assert PRESETS["strong"].values() == dict(scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7)
    assert PRESETS["max"].values() == dict(scale=5000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7)
    assert all(p.concept == DEFAULT_CONCEPT for p in PRESETS.values())
    assert SafetyConfig() == PRESETS["medium"]
    assert DEFAULT_CONCEPT.startswith("an image showing hate, harassment,") and DEFAULT_CONCEPT.endswith("brutality, cruelty")


def test_preset_case_insensitive_and_unknown_name():
    assert SafetyConfig.preset("MEDIUM") is PRESETS["medium"]
    assert SafetyConfig.preset(" Max ") is PRESETS["max"]
    with pytest.raises(ValueError) as err:
        SafetyConfig.preset("extreme")
    assert all(n in str(err.value) for n in ("weak", "medium", "strong", "max"))


@pytest.mark.parametrize("kw", [dict(scale=-1), dict(warmup_steps=-1), dict(warmup_steps=1.5),
                                dict(warmup_steps=True), dict(momentum_beta=1.5), dict(momentum_beta=-0.1),
                                dict(concept=""), dict(concept="  "), dict(concept=None),
                                dict(threshold=float("nan")), dict(scale="7")])
def test_safety_config_validation(kw):
    with pytest.raises(ValueError):
        SafetyConfig(**kw)


def test_safety_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SafetyConfig().scale = 3.0


# ----------------------------------------------------------------------------- SEGA: ψ

def test_quantile_mask_hand_made():
    # ψ = ε_c − ε_∅ = [[1, −4], [2, 3]] ; |ψ| sorted 1, 2, 3, 4
    # λ = 0.5: η = 2 + 0.5·(3 − 2) = 2.5 -> keep −4, 3 ; λ = 0.9: η = 3 + 0.7·(4 − 3) = 3.7 -> keep −4
    # λ = 0: η = min = 1 -> keep all ; s_e = 2 doubles the kept values
    u = torch.zeros(1, 1, 2, 2, dtype=D)
    e = torch.tensor([[1.0, -4.0], [2.0, 3.0]], dtype=D).reshape(1, 1, 2, 2)
    (half,) = edit_directions(u, [e], [Edit("a", scale=1, threshold=0.5, warmup_steps=0)], step=0)
    assert torch.equal(half, torch.tensor([[0.0, -4.0], [0.0, 3.0]], dtype=D).reshape(1, 1, 2, 2))
    (top,) = edit_directions(u, [e], [Edit("a", scale=2, threshold=0.9, warmup_steps=0)], step=0)
    assert torch.equal(top, torch.tensor([[0.0, -8.0], [0.0, 0.0]], dtype=D).reshape(1, 1, 2, 2))
    (all_,) = edit_directions(u, [e], [Edit("a", scale=1, threshold=0.0, warmup_steps=0)], step=0)
    assert torch.equal(all_, e)


def test_reverse_flips_sign():
    torch.manual_seed(4)
    u, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    (fwd,) = edit_directions(u, [e], [Edit("a", scale=3, threshold=0.5)], step=20)
    (rev,) = edit_directions(u, [e], [Edit("a", scale=3, threshold=0.5, reverse=True)], step=20)
    assert torch.equal(rev, -fwd) and fwd.abs().sum() > 0


def test_quantile_per_sample_and_channel():
    # sample 1 is sample 0 ×10 in channel 0; channel 1 is ×0.1. λ = 0.5 keeps the top half of
    # every (sample, channel): 3, 4 | 30, 40 | 0.3, 0.4. A threshold pooled over the batch would
    # have dropped all of sample 0's channel 0.
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D).reshape(2, 2)
    e = torch.stack([torch.stack([base, 0.1 * base]), torch.stack([10 * base, 0.1 * base])])  # (2, 2, 2, 2)
    (psi,) = edit_directions(torch.zeros_like(e), [e], [Edit("a", scale=1, threshold=0.5, warmup_steps=0)], step=0)
    keep = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D)
    assert torch.equal(psi, e * keep)


def test_cooldown_direction_is_zero():
    torch.manual_seed(5)
    u, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    edit = Edit("a", warmup_steps=0, cooldown_steps=3)
    assert edit_directions(u, [e], [edit], step=2)[0].abs().sum() > 0
    assert torch.equal(edit_directions(u, [e], [edit], step=3)[0], torch.zeros_like(e))


def test_half_precision_quantile():
    torch.manual_seed(6)
    u, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    edit = Edit("a", scale=2, threshold=0.8, warmup_steps=0)
    (h,) = edit_directions(u.half(), [e.half()], [edit], step=0)
    assert h.dtype == torch.float16
    psi = (e.half() - u.half()) * 2.0
    eta = torch.quantile(psi.abs().flatten(2).float(), 0.8, dim=2).half()
    assert torch.equal(h, torch.where(psi.abs() >= eta[:, :, None, None], psi, torch.zeros_like(psi)))


# ----------------------------------------------------------------------------- SEGA: term

def _psis(n, seed=7):
    torch.manual_seed(seed)
    return torch.zeros(1, 2, 2, 2, dtype=D), [torch.randn(1, 2, 2, 2, dtype=D) for _ in range(n)]


def test_partial_warmup_normalises_weights():
    # A (w 1) and B (w 3) warm, C still warming: term = ¼ψ_A + ¾ψ_B, no momentum ; ν still gets
    # (1 − β)·(ψ_A + 3ψ_B + ψ_C). λ = 0 keeps every element, so ψ_c = s_e·(ε_c − ε_∅) = ε_c.
    u, (a, b, c) = _psis(3)
    edits = [Edit("a", scale=1, threshold=0, warmup_steps=0, weight=1),
             Edit("b", scale=1, threshold=0, warmup_steps=0, weight=3),
             Edit("c", scale=1, threshold=0, warmup_steps=10, weight=1)]
    term, nu = sega_guidance(u, [a, b, c], edits, step=5, momentum_scale=0.5, momentum_beta=0.4)
    assert torch.allclose(term, 0.25 * a + 0.75 * b, atol=1e-12)
    assert torch.allclose(nu, 0.6 * (a + 3 * b + c), atol=1e-12)


def test_none_warm_gives_zero_and_updates_momentum():
    u, (a,) = _psis(1)
    edits = [Edit("a", scale=1, threshold=0, warmup_steps=5)]
    term, nu = sega_guidance(u, [a], edits, step=0, momentum_scale=0.5, momentum_beta=0.4)
    assert torch.equal(term, torch.zeros_like(u)) and torch.allclose(nu, 0.6 * a, atol=1e-12)


def test_all_warm_uses_raw_weight_sum_plus_momentum():
    # S = 1·ψ_A + 3·ψ_B + s_m·ν, not normalised
    u, (a, b) = _psis(2)
    nu0 = torch.full_like(u, 0.5)
    edits = [Edit("a", scale=1, threshold=0, warmup_steps=0, weight=1),
             Edit("b", scale=1, threshold=0, warmup_steps=0, weight=3)]
    term, nu = sega_guidance(u, [a, b], edits, step=0, momentum=nu0, momentum_scale=0.2, momentum_beta=0.4)
    s = a + 3 * b + 0.2 * nu0
    assert torch.allclose(term, s, atol=1e-12) and torch.allclose(nu, 0.4 * nu0 + 0.6 * s, atol=1e-12)


def test_cooldown_contributes_zero_with_weight_zero():
    # A cools down at 3. Step 2, C warming: term = (ψ_A + ψ_B)/2. Step 4: A weighs 0, so term = ψ_B
    # (not ψ_B/2); all warm at 10: S = ψ_B + ψ_C.
    u, (a, b, c) = _psis(3)
    edits = [Edit("a", scale=1, threshold=0, warmup_steps=0, cooldown_steps=3),
             Edit("b", scale=1, threshold=0, warmup_steps=0),
             Edit("c", scale=1, threshold=0, warmup_steps=10)]
    assert torch.allclose(sega_guidance(u, [a, b, c], edits, step=2)[0], (a + b) / 2, atol=1e-12)
    assert torch.allclose(sega_guidance(u, [a, b, c], edits, step=4)[0], b, atol=1e-12)
    term, _ = sega_guidance(u, [a, b, c], edits, step=10, momentum_scale=0.0)
    assert torch.allclose(term, b + c, atol=1e-12)


def test_negative_weight_counts_as_zero():
    u, (a, b, c) = _psis(3)
    edits = [Edit("a", scale=1, threshold=0, warmup_steps=0, weight=-2),
             Edit("b", scale=1, threshold=0, warmup_steps=0, weight=1),
             Edit("c", scale=1, threshold=0, warmup_steps=10, weight=1)]
    assert torch.allclose(sega_guidance(u, [a, b, c], edits, step=0)[0], b, atol=1e-12)
    term, _ = sega_guidance(u, [a, b, c], edits, step=10, momentum_scale=0.0)
    assert torch.allclose(term, b + c, atol=1e-12)


def test_zero_over_zero_corner_gives_zeros_not_nan():
    # the only warm concept has cooled down (weight 0) while B still warms up: the reference
    # computes 0/0 = NaN here; we return 0. Same when the warm concepts' weights are all ≤ 0.
    u, (a, b) = _psis(2)
    cooled = [Edit("a", scale=1, threshold=0, warmup_steps=0, cooldown_steps=1), Edit("b", warmup_steps=5)]
    term, nu = sega_guidance(u, [a, b], cooled, step=2)
    assert torch.equal(term, torch.zeros_like(u)) and torch.isfinite(nu).all()
    w = torch.zeros(1, 1, dtype=D)
    assert torch.isnan(w / w.sum(dim=0)).all()  # what the reference's normalisation does
    weightless = [Edit("a", warmup_steps=0, weight=0), Edit("b", warmup_steps=5, weight=-1)]
    assert torch.equal(sega_guidance(u, [a, b], weightless, step=2)[0], torch.zeros_like(u))


def test_sega_momentum_recurrence_explicit_numbers():
    # ψ = 1 everywhere (ε_c = 1, ε_∅ = 0, s_e = 1, λ = 0), s_m = β = 0.5:
    # S = 1, 1.25, 1.4375 ; ν = 0.5, 0.875, 1.15625 (same recurrence as SLD's γ/ν)
    u, e = torch.zeros(1, 1, 2, 2, dtype=D), torch.ones(1, 1, 2, 2, dtype=D)
    edits, nu, got = [Edit("a", scale=1, threshold=0, warmup_steps=0)], None, []
    for i in range(3):
        term, nu = sega_guidance(u, [e], edits, step=i, momentum=nu, momentum_scale=0.5, momentum_beta=0.5)
        got.append((term[0, 0, 0, 0].item(), nu[0, 0, 0, 0].item()))
    assert got == [(1.0, 0.5), (1.25, 0.875), (1.4375, 1.15625)]


def test_sega_momentum_matches_hand_loop():
    torch.manual_seed(8)
    edits = [Edit("a", scale=2, threshold=0.5, warmup_steps=0, weight=2), Edit("b", scale=1, threshold=0.25, warmup_steps=0)]
    nu, ref_nu = None, torch.zeros(2, 3, 4, 4, dtype=D)
    for i in range(5):
        u = torch.randn(2, 3, 4, 4, dtype=D)
        es = [torch.randn(2, 3, 4, 4, dtype=D) for _ in edits]
        term, nu = sega_guidance(u, es, edits, step=i, momentum=nu, momentum_scale=0.3, momentum_beta=0.6)
        psis = edit_directions(u, es, edits, step=i)
        s = 2 * psis[0] + psis[1] + 0.3 * ref_nu
        ref_nu = 0.6 * ref_nu + 0.4 * s
        assert torch.allclose(term, s, atol=1e-12) and torch.allclose(nu, ref_nu, atol=1e-12)


def test_stacked_tensor_input_and_length_check():
    u, (a, b) = _psis(2)
    edits = [Edit("a", warmup_steps=0), Edit("b", warmup_steps=3)]
    listed = sega_guidance(u, [a, b], edits, step=1)
    stacked = sega_guidance(u, torch.stack([a, b]), edits, step=1)
    assert all(torch.equal(x, y) for x, y in zip(listed, stacked))
    with pytest.raises(ValueError):
        sega_guidance(u, [a], edits, step=1)


def test_no_edits_gives_zero():
    u = torch.randn(1, 4, 2, 2)
    term, nu = sega_guidance(u, [], [], step=0)
    assert torch.equal(term, torch.zeros_like(u)) and torch.equal(nu, torch.zeros_like(u))


@pytest.mark.parametrize("kw", [dict(concept=""), dict(scale=-1), dict(threshold=1.0), dict(threshold=-0.1),
                                dict(warmup_steps=-1), dict(warmup_steps=2.5), dict(cooldown_steps=-3),
                                dict(reverse=1), dict(weight=float("inf"))])
def test_edit_validation(kw):
    with pytest.raises(ValueError):
        Edit(**{"concept": "smiling", **kw})


def test_edit_defaults():
    e = Edit("smiling")
    assert (e.scale, e.threshold, e.warmup_steps, e.cooldown_steps, e.reverse, e.weight) == (5.0, 0.9, 10, None, False, 1.0)


def _diffusers_sega_step(noise_pred_uncond, noise_pred_text, noise_pred_edit_concepts, i, guidance_scale,
                         edit_momentum, scales, thresholds, reverses, weights, warmups, cooldowns, s_m, beta):
    """The edit-guidance lines of SemanticStableDiffusionPipeline.__call__ (diffusers 0.42.1), re-typed."""
    noise_guidance = guidance_scale * (noise_pred_text - noise_pred_uncond)
    if edit_momentum is None:
        edit_momentum = torch.zeros_like(noise_guidance)
    concept_weights = torch.zeros((len(noise_pred_edit_concepts), noise_guidance.shape[0]), dtype=noise_guidance.dtype)
    noise_guidance_edit = torch.zeros((len(noise_pred_edit_concepts), *noise_guidance.shape), dtype=noise_guidance.dtype)
    warmup_inds = []
    for c, noise_pred_edit_concept in enumerate(noise_pred_edit_concepts):
        cooldown_c = i + 1 if cooldowns[c] is None else cooldowns[c]
        if i >= warmups[c]:
            warmup_inds.append(c)
        if i >= cooldown_c:
            noise_guidance_edit[c, :, :, :, :] = torch.zeros_like(noise_pred_edit_concept)
            continue
        tmp = noise_pred_edit_concept - noise_pred_uncond
        concept_weights[c, :] = torch.full_like(concept_weights[c], weights[c])
        if reverses[c]:
            tmp = tmp * -1
        tmp = tmp * scales[c]
        q = torch.quantile(torch.abs(tmp).flatten(start_dim=2), thresholds[c], dim=2, keepdim=False)
        noise_guidance_edit[c] = torch.where(torch.abs(tmp) >= q[:, :, None, None], tmp, torch.zeros_like(tmp))
    warmup_inds = torch.tensor(warmup_inds)
    if len(noise_pred_edit_concepts) > warmup_inds.shape[0] > 0:
        w = torch.index_select(concept_weights, 0, warmup_inds)
        w = torch.where(w < 0, torch.zeros_like(w), w)
        w = w / w.sum(dim=0)
        noise_guidance = noise_guidance + torch.einsum("cb,cbijk->bijk", w, torch.index_select(noise_guidance_edit, 0, warmup_inds))
    concept_weights = torch.where(concept_weights < 0, torch.zeros_like(concept_weights), concept_weights)
    concept_weights = torch.nan_to_num(concept_weights)
    noise_guidance_edit = torch.einsum("cb,cbijk->bijk", concept_weights, noise_guidance_edit)
    noise_guidance_edit = noise_guidance_edit + s_m * edit_momentum
    edit_momentum = beta * edit_momentum + (1 - beta) * noise_guidance_edit
    if warmup_inds.shape[0] == len(noise_pred_edit_concepts):
        noise_guidance = noise_guidance + noise_guidance_edit
    return noise_pred_uncond + noise_guidance, edit_momentum


def test_parity_with_diffusers_semantic_pipeline():
    torch.manual_seed(9)
    edits = [Edit("a", scale=5, threshold=0.9, warmup_steps=2, weight=1.0),
             Edit("b", scale=6, threshold=0.85, warmup_steps=4, cooldown_steps=7, reverse=True, weight=2.0),
             Edit("c", scale=3, threshold=0.5, warmup_steps=3, weight=-0.5)]  # warm after "a": no 0/0
    args = [[getattr(e, f) for e in edits] for f in ("scale", "threshold", "reverse", "weight", "warmup_steps", "cooldown_steps")]
    nu = ref_nu = None
    for i in range(10):
        u, p = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        es = torch.randn(3, 2, 4, 8, 8)
        term, nu = sega_guidance(u, es, edits, step=i, momentum=nu, momentum_scale=0.1, momentum_beta=0.4)
        ref, ref_nu = _diffusers_sega_step(u, p, list(es), i, 7.5, ref_nu, *args, 0.1, 0.4)
        assert torch.equal(nu, ref_nu)
        # the reference adds the term inside the parentheses: ε_∅ + (s_g·(ε_p − ε_∅) + term)
        assert torch.equal(u + (7.5 * (p - u) + term), ref)
        assert torch.allclose(cfg_guidance(u, p, 7.5) + term, ref, atol=1e-5)


# ----------------------------------------------------------------------------- composition, purity

def test_composition_cfg_and_sld_plus_sega():
    # ε̂ = ε_∅ + s_g·(ε_p − ε_∅) + term ; with SLD, ε̂ = sld_guidance(...)[0] + term.
    # Hand numbers: ε_∅ = 0, ε_p = 1, ε_c = 2 (ψ = 2, s_e = 1, λ = 0, all warm, s_m = 0) -> term = 2,
    # CFG with s_g = 3 gives 3, so ε̂ = 5; SLD with ε_S = 1 (d = 0 ≥ λ = 0.01 -> μ = 0) changes nothing.
    u, p, e = t(0.0), t(1.0), t(2.0)
    term, _ = sega_guidance(u, [e], [Edit("c", scale=1, threshold=0, warmup_steps=0)], step=0, momentum_scale=0.0)
    assert (cfg_guidance(u, p, 3.0) + term).item() == 5.0
    eps, _ = sld_guidance(u, p, t(1.0), 3.0, cfg(), step=0)
    assert (eps + term).item() == 5.0
    # and where SLD acts (ε_S = 1.5: d = −0.5 -> μ = 1, γ = 1.5): 0 + 3·(1 − 1.5) + 2 = 0.5
    eps, _ = sld_guidance(u, p, t(1.5), 3.0, cfg(), step=0)
    assert (eps + term).item() == 0.5


def test_inputs_not_modified_in_place():
    torch.manual_seed(10)
    u, p, s = (torch.randn(2, 4, 3, 3) for _ in range(3))
    es = [torch.randn(2, 4, 3, 3) for _ in range(2)]
    nu_sld, nu_sega = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    before = [x.clone() for x in (u, p, s, *es, nu_sld, nu_sega)]
    sld_guidance(u, p, s, 7.5, PRESETS["max"], step=5, momentum=nu_sld)
    safety_scale(p, s, PRESETS["max"])
    edits = [Edit("a", warmup_steps=0), Edit("b", warmup_steps=9, cooldown_steps=20, reverse=True)]
    sega_guidance(u, es, edits, step=5, momentum=nu_sega)
    sega_guidance(u, es, edits, step=12, momentum=nu_sega)
    assert all(torch.equal(x, y) for x, y in zip((u, p, s, *es, nu_sld, nu_sega), before))


def test_safety_term_is_gamma_of_sld_guidance():
    """γ = μ ⊙ (ε_S − ε_∅) + s_m·ν, the term sld_guidance subtracts (times s_g) after warm-up."""
    from sld_minimal.guidance import safety_term

    torch.manual_seed(0)
    e_u, e_p, e_s, nu = (torch.randn(2, 4, 3, 3) * 0.01 for _ in range(4))
    cfg = SafetyConfig.preset("strong")
    gamma, mu = safety_term(e_u, e_p, e_s, cfg, nu)
    assert torch.equal(mu, safety_scale(e_p, e_s, cfg))
    assert torch.allclose(gamma, mu * (e_s - e_u) + cfg.momentum_scale * nu, atol=0, rtol=1e-6)
    assert torch.equal(safety_term(e_u, e_p, e_s, cfg)[0], mu * (e_s - e_u))  # ν = None counts as 0
    eps, _ = sld_guidance(e_u, e_p, e_s, 7.5, cfg, step=cfg.warmup_steps, momentum=nu)
    assert torch.allclose(cfg_guidance(e_u, e_p, 7.5) - eps, 7.5 * gamma, atol=1e-7)
