"""Tests for sld_minimal.schedulers: closed-form identities first, then parity with diffusers."""
import json
import math
from pathlib import Path

import pytest
import torch

from sld_minimal import schedulers
from sld_minimal.schedulers import DDIM, PLMS_COEFFS, PNDM
from sld_minimal.noise_schedule import SchedulerConfig, alphas_cumprod
from sld_minimal.testing import generator as _gen, rel_err, trajectory

# SD 1.4's scheduler_config.json, inline so CI runs without shared/; checked against the file when present.
SD14_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD14_CONFIG_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "sd14" / "scheduler_config.json"
SHAPE = (2, 4, 8, 8)


def test_inline_config_matches_shared_file():
    if not SD14_CONFIG_FILE.exists():
        pytest.skip(f"{SD14_CONFIG_FILE} not present")
    assert json.loads(SD14_CONFIG_FILE.read_text()) == SD14_CONFIG


def test_defaults_are_sd14():
    assert SchedulerConfig() == SchedulerConfig.from_dict(SD14_CONFIG)


# ---------------------------------------------------------------- noise schedule and timesteps

def test_alpha_bar_endpoints_scaled_linear():
    # ᾱ_t = ∏_{s≤t}(1 − β_s), β = linspace(√β_start, √β_end)²; reference in float64, tolerance 1e-7.
    a = alphas_cumprod(SchedulerConfig())
    assert a.dtype == torch.float32 and a.shape == (1000,)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)]
    assert abs(a[0].item() - (1 - 0.00085)) < 1e-7
    assert abs(a[999].item() - math.prod(1 - b for b in betas)) < 1e-7


def test_alpha_bar_linear_schedule():
    # 'linear': β = linspace(β_start, β_end); float64 reference, tolerance 1e-7.
    cfg = SchedulerConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    a = alphas_cumprod(cfg)
    betas = [0.0001 + (0.02 - 0.0001) * i / 999 for i in range(1000)]
    assert abs(a[0].item() - (1 - 0.0001)) < 1e-7
    assert abs(a[999].item() - math.prod(1 - b for b in betas)) < 1e-7


def test_alpha_bar_below_zero():
    # set_alpha_to_one=False: ᾱ_{t<0} = ᾱ_0; True: ᾱ_{t<0} = 1.
    s = DDIM(10)
    assert s.alpha_bar(-1).item() == s.alphas_cumprod[0].item()
    assert DDIM(10, config=SchedulerConfig(set_alpha_to_one=True)).alpha_bar(-5).item() == 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 999])
def test_leading_timesteps(n):
    # t_i = i·(1000 // n) + 1, descending.
    ts = DDIM(n).timesteps
    assert ts.dtype == torch.int64
    assert ts.tolist() == [i * (1000 // n) + 1 for i in reversed(range(n))]


@pytest.mark.parametrize("n, expected", [
    (1, [1]), (2, [501, 1, 1]), (3, [667, 334, 334, 1]), (50, [981, 961, 961] + list(range(941, 0, -20))),
])
def test_pndm_timesteps(n, expected):
    assert PNDM(n).timesteps.tolist() == expected


# ---------------------------------------------------------------- DDIM closed form

def test_ddim_eta0_recovers_x0_and_lands_on_q():
    # With the true ε, x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; eq. 12 at η=0 must give x_prev = √ᾱ_prev x0 + √(1−ᾱ_prev) ε.
    # float64 inputs, tolerance 1e-6 (float32 ᾱ coefficients).
    s = DDIM(50)
    x0 = torch.randn(SHAPE, generator=_gen(1), dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=_gen(2), dtype=torch.float64)
    for t in (981, 501, 21, 1):  # t=1 steps to t_prev<0, i.e. ᾱ_prev = ᾱ_0
        a_t, a_prev = s.alpha_bar(t).double(), s.alpha_bar(t - 20).double()
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        x_prev = s.step(eps, t, x_t)
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        assert (x_prev - expected).abs().max() < 1e-6


def test_ddim_sigma_formula():
    # η>0: x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε + σ z, σ = η√((1−ᾱ_prev)/(1−ᾱ_t))√(1−ᾱ_t/ᾱ_prev),
    # z = torch.randn from the same seed; float64 hand computation, tolerance 1e-6.
    eta, t = 0.7, 501
    s = DDIM(50, eta=eta)
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    out = s.step(eps, t, x, generator=_gen(3))
    a_t, a_p = s.alpha_bar(t).item(), s.alpha_bar(t - 20).item()
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    x0 = (x.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    z = torch.randn(SHAPE, generator=_gen(3)).double()
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps.double() + sigma * z
    assert (out.double() - expected).abs().max() < 1e-6


def test_ddim_eta1_is_ddpm_posterior_variance():
    # η=1 with stride 1: σ² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (DDPM eq. 7). With x = ε = 0 the step returns σ z.
    # σ² in float32 loses digits to 1 − ᾱ_t/ᾱ_{t−1}: relative tolerance 1e-4.
    s, t = DDIM(999, eta=1.0), 500
    out = s.step(torch.zeros(SHAPE), t, torch.zeros(SHAPE), generator=_gen(4))
    sigma = (out / torch.randn(SHAPE, generator=_gen(4))).double()
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    beta_t = (lo + (hi - lo) * t / 999) ** 2
    a_t, a_p = s.alpha_bar(t).item(), s.alpha_bar(t - 1).item()
    posterior_var = (1 - a_p) / (1 - a_t) * beta_t
    assert ((sigma ** 2 - posterior_var).abs() / posterior_var).max() < 1e-4


def test_ddim_eta_seeded_reproducible_and_differs_from_eta0():
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    a = DDIM(20, eta=0.7).step(eps, 501, x, generator=_gen(5))
    b = DDIM(20, eta=0.7).step(eps, 501, x, generator=_gen(5))
    c = DDIM(20, eta=0.0).step(eps, 501, x, generator=_gen(5))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("make", [lambda: DDIM(20, eta=0.5), lambda: PNDM(20)])
def test_step_does_not_modify_inputs(make):
    s = make()
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    x0, e0 = x.clone(), eps.clone()
    for t in s.timesteps[:6]:
        s.step(eps, t, x, generator=_gen(3))
    assert torch.equal(x, x0) and torch.equal(eps, e0)


# ---------------------------------------------------------------- PNDM / PLMS closed form

@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_plms_coefficients_sum_to_one(order):
    nums, den = PLMS_COEFFS[order]
    assert len(nums) == order and sum(nums) == den  # exact: a constant ε is reproduced exactly


def _phi64(s, x, eps, t, t_prev):
    # φ(x_t, ε, t, t_prev) = √(ᾱ_prev/ᾱ_t) x − (ᾱ_prev − ᾱ_t) ε / (ᾱ_t√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev)), float64.
    a_t, a_p = s.alpha_bar(t).item(), s.alpha_bar(t_prev).item()
    denom = a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p)
    return math.sqrt(a_p / a_t) * x.double() - (a_p - a_t) * eps.double() / denom


def test_pndm_transfer_equals_ddim_eta0():
    # φ is DDIM's η=0 update written differently; both against the float64 formula, tolerance 1e-5 relative.
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    p, d = PNDM(50), DDIM(50)
    for t in (981, 501, 1):
        ref = _phi64(p, x, eps, t, t - 20)
        for out in (p.transfer(x, eps, t, t - 20), d.step(eps, t, x)):
            assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_pndm_hand_made_eps_sequence():
    # Each call against φ in float64 with the PLMS recipe spelled out by hand; tolerance 1e-5 relative.
    s = PNDM(10)  # timesteps 901, 801, 801, 701, ...
    assert s.timesteps.tolist()[:5] == [901, 801, 801, 701, 601]
    levels = [1.0, -2.0, 0.5, 3.0, -1.0, 2.5]
    E = [torch.full(SHAPE, v) + 0.1 * torch.randn(SHAPE, generator=_gen(i)) for i, v in enumerate(levels)]
    x0 = torch.randn(SHAPE, generator=_gen(99))
    expected_eps = [
        E[0],                                              # call 0: plain ε(901)
        (E[0] + E[1]) / 2,                                 # call 1: Heun average, redone from x(901)
        (3 * E[2] - E[0]) / 2,                             # call 2: AB2 on history [ε(901), ε(801)]; E[1] dropped
        (23 * E[3] - 16 * E[2] + 5 * E[0]) / 12,           # call 3: AB3
        (55 * E[4] - 59 * E[3] + 37 * E[2] - 9 * E[0]) / 24,  # call 4: AB4
        (55 * E[5] - 59 * E[4] + 37 * E[3] - 9 * E[2]) / 24,  # call 5: AB4, oldest entry evicted
    ]
    intervals = [(901, 801), (901, 801), (801, 701), (701, 601), (601, 501), (501, 401)]
    starts = [x0, x0]  # calls 0 and 1 both start from x(901)
    x = x0
    for k, t in enumerate(s.timesteps.tolist()[:6]):
        out = s.step(E[k], t, x)
        ref = _phi64(s, starts[k] if k < 2 else x, expected_eps[k], *intervals[k])
        assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5, k
        x = out
        if k == 0:
            assert s.first_sample is x0 and len(s.eps_history) == 1
        if k == 1:
            assert s.first_sample is None and len(s.eps_history) == 1
    assert len(s.eps_history) == 4


def test_pndm_first_step_heun_with_constant_eps():
    # With a constant ε both halves of the Heun average agree, so call 1 repeats call 0 bit for bit.
    s = PNDM(50)
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.full(SHAPE, 0.3)
    first = s.step(eps, 981, x)
    second = s.step(eps, 961, first * 7.0)  # the sample argument is ignored on the correction call
    assert torch.equal(first, second)


# ---------------------------------------------------------------- config handling and errors

@pytest.mark.parametrize("key, value, match", [
    ("prediction_type", "v_prediction", "prediction_type"),
    ("trained_betas", [0.1] * 1000, "trained_betas"),
    ("clip_sample", True, "clip_sample"),
    ("thresholding", True, "thresholding"),
    ("timestep_spacing", "quadratic", "timestep_spacing"),
    ("beta_schedule", "squaredcos_cap_v2", "beta_schedule"),
])
def test_unsupported_config_rejected(key, value, match):
    with pytest.raises(ValueError, match=match):
        schedulers.from_config({**SD14_CONFIG, key: value}, "ddim", num_inference_steps=10)


def test_irrelevant_keys_ignored_and_name_decides():
    cfg = {**SD14_CONFIG, "foo": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}
    assert isinstance(schedulers.from_config(cfg, "ddim", num_inference_steps=5, eta=0.3), DDIM)
    assert isinstance(schedulers.from_config(cfg, "PNDM", num_inference_steps=5), PNDM)


@pytest.mark.parametrize("n", [0, 1000, 1001])
@pytest.mark.parametrize("cls", [DDIM, PNDM])
def test_bad_step_counts_rejected(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls(n)


def test_other_errors():
    with pytest.raises(ValueError, match="unknown scheduler"):
        schedulers.from_config(SD14_CONFIG, "heun", num_inference_steps=10)
    with pytest.raises(ValueError, match="eta"):
        DDIM(10, eta=-0.1)
    for eta in (0.5, 0.0):  # PNDM takes no eta at all, not even a harmless one
        with pytest.raises(ValueError, match="eta"):
            schedulers.from_config(SD14_CONFIG, "pndm", num_inference_steps=10, eta=eta)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        PNDM(10, config=SchedulerConfig(skip_prk_steps=False))


# ---------------------------------------------------------------- parity with diffusers

STEP_COUNTS = [1, 2, 3, 7, 20, 50, 51, 100, 999]


def _pseudo_eps(x, t, noise):
    # Deterministic stand-in for the UNet that depends on x, so errors would propagate along the trajectory.
    return 0.3 * x + math.sin(int(t) / 37) * noise


def _run(ours, theirs, n, eta=None, seed=0):
    """The last x of both runs, from the same x_T, with the same stand-in ε (and seed, for DDIM's noise)."""
    noise, x_T = torch.randn(SHAPE, generator=_gen(11)), torch.randn(SHAPE, generator=_gen(12))
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    eps = lambda x, t: _pseudo_eps(x, t, noise)  # noqa: E731
    kw = {} if eta is None else {"eta": eta, "generator": _gen(seed)}
    return trajectory(ours, eps, x_T, generator=_gen(seed))[-1], trajectory(theirs, eps, x_T, **kw)[-1]


@pytest.fixture
def diffusers():
    # Only the parity tests need the reference; the closed-form tests above run without it.
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_match_diffusers_for_every_step_count(diffusers, spacing):
    cfg = {**SD14_CONFIG, "timestep_spacing": spacing}
    ddim, pndm = (cls.from_config(cfg) for cls in (diffusers.DDIMScheduler, diffusers.PNDMScheduler))
    for n in range(1, 1000):
        ddim.set_timesteps(n)
        pndm.set_timesteps(n)
        ours_d, ours_p = (schedulers.from_config(cfg, name, n).timesteps.tolist() for name in ("ddim", "pndm"))
        ref_d, ref_p = ddim.timesteps.tolist(), pndm.timesteps.tolist()
        if spacing == "trailing" and len(ref_d) > n:  # diffusers' float arange adds t = −1 for some n; we do not
            assert ref_d[-1] == ref_p[-1] == -1, n
            ref_d, ref_p = ref_d[:-1], ref_p[:-1]
        assert ours_d == ref_d, n
        assert ours_p == ref_p, n


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_pndm_matches_diffusers(diffusers, n, spacing):
    cfg = {**SD14_CONFIG, "timestep_spacing": spacing}
    theirs = diffusers.PNDMScheduler.from_config(cfg)
    theirs.set_timesteps(n)
    a, b = _run(schedulers.from_config(cfg, "pndm", num_inference_steps=n), theirs, n)
    assert rel_err(a, b) <= 1e-5  # fp32 trajectories: max|a−b| / max|b| ≤ 1e-5


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_matches_diffusers(diffusers, n, eta, spacing):
    cfg = {**SD14_CONFIG, "timestep_spacing": spacing}
    theirs = diffusers.DDIMScheduler.from_config(cfg)
    theirs.set_timesteps(n)
    a, b = _run(schedulers.from_config(cfg, "ddim", num_inference_steps=n, eta=eta), theirs, n, eta=eta)
    assert rel_err(a, b) <= 1e-5  # fp32 trajectories, same seed for both generators: ≤ 1e-5 relative
