"""Tests for the sampler interface, the registry, DPM-Solver++(2M) and Euler: closed form first, then diffusers."""
import math

import pytest
import torch

from sld_minimal import schedulers
from sld_minimal.schedulers import DDIM, PNDM, SAMPLERS, DPMSolverPP2M, Euler, Sampler
from sld_minimal.noise_schedule import SchedulerConfig
from sld_minimal.testing import generator as _gen, randn, rel_err, trajectory
from test_schedulers import SD14_CONFIG

# diffusers' set_timesteps calls np.array(tensor), which numpy 2 warns about on every call: thousands of warnings
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHAPE = (2, 4, 8, 8)
SPACINGS = ["leading", "linspace", "trailing"]


def _randn(seed, dtype=torch.float64):
    return randn(SHAPE, seed, dtype)


def _a(s, t):
    """ᾱ_t at an integer timestep, float64."""
    return s.alphas_cumprod[int(t)].double().item()


# ---------------------------------------------------------------- registry and from_config

def test_registry_holds_the_four_samplers():
    assert set(SAMPLERS) == {"pndm", "ddim", "dpmpp2m", "euler"}
    for name, cls in SAMPLERS.items():
        assert issubclass(cls, Sampler) and cls.name == name
        assert cls.description and "\n" not in cls.description  # one line for --help


def test_register_a_user_sampler_the_readme_example(monkeypatch, diffusers):
    # README "Add a sampler": Euler ancestral in user code, built by name; equal to diffusers'
    # EulerAncestralDiscreteScheduler draw for draw (same seed), 1e-5 relative.
    monkeypatch.setattr(schedulers, "SAMPLERS", dict(SAMPLERS))  # leave the real registry as it was

    @schedulers.register("euler-a")
    class EulerAncestral(schedulers.Euler):
        description, stochastic = "Euler ancestral (k-diffusion's sample_euler_ancestral, eta=1)", True

        def update(self, eps, t, x, generator=None):
            i = self.position(t)
            s, s_next = self.sigmas[i], self.sigmas[i + 1]
            s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                            device=generator.device if generator else "cpu")
            return x + eps * ((s_next ** 2 - s_up ** 2) ** 0.5 - s) + z.to(x.device) * s_up

    ours = schedulers.from_config(SD14_CONFIG, "euler-a", 7)
    ref = diffusers.EulerAncestralDiscreteScheduler.from_config(SD14_CONFIG)
    ref.set_timesteps(7)
    noise, x_T = _randn(11, torch.float32), _randn(12, torch.float32)
    eps = lambda x_in, t: _fake_eps(x_in, t, noise)  # noqa: E731
    x_ours, x_ref = (trajectory(s, eps, x_T, generator=_gen(5))[-1] for s in (ours, ref))
    assert ours.stochastic and ours.steps_taken == 7 and rel_err(x_ours, x_ref) <= 1e-5
    with pytest.raises(ValueError, match="'eta'"):
        schedulers.from_config(SD14_CONFIG, "euler-a", 3, eta=0.5)
    with pytest.raises(ValueError, match="taken"):
        schedulers.register("euler-a")(EulerAncestral)
    with pytest.raises(ValueError, match="lower case"):
        schedulers.register("Euler-A")(EulerAncestral)
    with pytest.raises(TypeError, match="Sampler"):
        schedulers.register("other")(int)


def test_from_config_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'") as e:
        schedulers.from_config(SD14_CONFIG, "heun", 10)
    assert all(name in str(e.value) for name in SAMPLERS)


@pytest.mark.parametrize("name", ["pndm", "dpmpp2m", "euler"])
def test_from_config_refuses_options_a_sampler_does_not_take(name):
    with pytest.raises(ValueError, match="no option 'eta'"):
        schedulers.from_config(SD14_CONFIG, name, 10, eta=0.5)


@pytest.mark.parametrize("name, key, value", [
    ("dpmpp2m", "solver_order", 3), ("dpmpp2m", "algorithm_type", "sde-dpmsolver++"),
    ("dpmpp2m", "use_karras_sigmas", True), ("dpmpp2m", "final_sigmas_type", "sigma_min"),
    ("euler", "use_karras_sigmas", True), ("euler", "interpolation_type", "log_linear"),
])
def test_from_config_refuses_settings_the_sampler_does_not_implement(name, key, value):
    with pytest.raises(ValueError, match=key):
        schedulers.from_config({**SD14_CONFIG, key: value}, name, 10)
    schedulers.from_config({**SD14_CONFIG, key: value}, "ddim", 10)  # another sampler's key: ignored


@pytest.mark.parametrize("spacing, expected", [
    (None, {"pndm": "leading", "ddim": "leading", "dpmpp2m": "linspace", "euler": "linspace"}),
    ("trailing", dict.fromkeys(["pndm", "ddim", "dpmpp2m", "euler"], "trailing")),
])
def test_timestep_spacing_from_config_else_each_samplers_default(spacing, expected):
    cfg = SD14_CONFIG if spacing is None else {**SD14_CONFIG, "timestep_spacing": spacing}
    assert {name: schedulers.from_config(cfg, name, 10).timestep_spacing for name in SAMPLERS} == expected


@pytest.mark.parametrize("name, spacing, expected_head, expected_tail", [
    # the examples in the docstrings of spaced_timesteps, DPMSolverPP2M and Euler
    ("ddim", "leading", [981, 961], [1]), ("ddim", "linspace", [999, 979, 958], [0]),
    ("ddim", "trailing", [999, 979], [19]), ("dpmpp2m", "linspace", [999, 949], [50]),
])
def test_documented_timesteps(name, spacing, expected_head, expected_tail):
    n = 20 if name == "dpmpp2m" else 50
    ts = schedulers.from_config({**SD14_CONFIG, "timestep_spacing": spacing}, name, n).timesteps.tolist()
    assert len(ts) == n and ts[:len(expected_head)] == expected_head and ts[-len(expected_tail):] == expected_tail


def test_documented_euler_timesteps_are_floats():
    ts = Euler(20).timesteps
    assert ts.dtype == torch.float32 and ts[0] == 999.0 and 946.4 < ts[1] < 946.5 and ts[-1] == 0.0


def test_ddim_steps_t_minus_floor_T_over_n_whatever_the_spacing():
    # 'linspace', 50 steps: …, 979, 958, …; the step at t = 979 goes to 979 − ⌊1000/50⌋ = 959, not 958.
    s = DDIM(50, config=SchedulerConfig(timestep_spacing="linspace"))
    assert s.timesteps[1:3].tolist() == [979, 958]
    x0, eps = _randn(1), _randn(2)
    a_t, a_p = _a(s, 979), _a(s, 959)
    out = s.step(eps, 979, math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps)
    assert rel_err(out, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps) < 1e-6


# ---------------------------------------------------------------- the interface

MAKERS = {"pndm": lambda n: PNDM(n), "ddim": lambda n: DDIM(n, eta=0.5),
          "dpmpp2m": lambda n: DPMSolverPP2M(n), "euler": lambda n: Euler(n)}


@pytest.mark.parametrize("name", MAKERS)
def test_steps_taken_counts_every_step_and_inputs_stay_untouched(name):
    s = MAKERS[name](6)
    x, eps = _randn(1, torch.float32), _randn(2, torch.float32)
    x0, e0 = x.clone(), eps.clone()
    assert s.steps_taken == 0
    for k, t in enumerate(s.timesteps.tolist()):  # plain numbers, as a loop over .tolist() hands them
        s.step(eps, t, s.scale_model_input(x, t), generator=_gen(3))
        assert s.steps_taken == k + 1
    assert torch.equal(x, x0) and torch.equal(eps, e0)


def test_stochastic_flag():
    assert DDIM(10, eta=0.5).stochastic and not DDIM(10).stochastic
    assert not any(cls.stochastic for cls in (PNDM, DPMSolverPP2M, Euler))


@pytest.mark.parametrize("cls", [DPMSolverPP2M, Euler])
def test_stateful_samplers_step_in_order_once(cls):
    s = cls(3)
    x = _randn(1, torch.float32)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, s.timesteps[1], x)
    for t in s.timesteps:
        x = s.step(x, t, x)
    with pytest.raises(ValueError, match="all its 3 steps"):
        s.step(x, s.timesteps[-1], x)


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_out(name, dtype):
    # The sample's dtype is kept; bf16 / fp16 trajectories stay within 2e-2 relative of float32 (bf16 keeps
    # 8 bits of mantissa; DDIM η>0 draws its noise in the sample's dtype too).
    (s32, s16), out = (MAKERS[name](4), MAKERS[name](4)), []
    for s, dt in ((s32, torch.float32), (s16, dtype)):
        x, noise = _randn(1, torch.float32).to(dt), _randn(2, torch.float32).to(dt)
        for t in s.timesteps:
            x = s.step(0.3 * s.scale_model_input(x, t) + noise, t, x, generator=_gen(3))
            assert x.dtype == dt
        out.append(x)
    assert rel_err(out[1], out[0]) < 2e-2


# ---------------------------------------------------------------- Euler, closed form

def test_euler_sigmas_are_sqrt_one_minus_abar_over_abar_interpolated():
    # σ_t = √((1−ᾱ_t)/ᾱ_t) at integer t; linear in between at the fractional linspace timesteps; last σ = 0.
    s = Euler(20)
    ts = s.timesteps.double()
    assert ts[1].item() != round(ts[1].item()) and s.sigmas[-1].item() == 0.0
    table = ((1 - s.alphas_cumprod.double()) / s.alphas_cumprod.double()).sqrt()
    lo = ts.floor().long()
    w = ts - lo
    expected = (1 - w) * table[lo] + w * table[(lo + 1).clamp(max=999)]
    assert rel_err(s.sigmas[:-1], expected) < 1e-6


def test_euler_init_noise_sigma():
    # linspace/trailing: σ_max; leading: √(σ_max² + 1) = 1/√ᾱ_{t_0}. float64 references, 1e-6 relative.
    assert abs(Euler(50).init_noise_sigma / math.sqrt((1 - _a(Euler(1), 999)) / _a(Euler(1), 999)) - 1) < 1e-6
    lead = Euler(50, config=SchedulerConfig(timestep_spacing="leading"))
    assert lead.timesteps[0].item() == 981.0
    assert abs(lead.init_noise_sigma * math.sqrt(_a(lead, 981)) - 1) < 1e-6
    assert DDIM(5).init_noise_sigma == PNDM(5).init_noise_sigma == DPMSolverPP2M(5).init_noise_sigma == 1.0


def test_euler_scale_model_input_is_the_vp_sample():
    # x = x0 + σ_t n  ↦  x/√(σ_t²+1) = √ᾱ_t x0 + √(1−ᾱ_t) n at integer t ('leading'); float64, 1e-6.
    s = Euler(10, config=SchedulerConfig(timestep_spacing="leading"))
    x0, n = _randn(1), _randn(2)
    t = s.timesteps[0]
    x = x0 + s.sigmas[0].double() * n
    a = _a(s, t)
    assert rel_err(s.scale_model_input(x, t), math.sqrt(a) * x0 + math.sqrt(1 - a) * n) < 1e-6


def test_euler_step_formula_and_true_noise_lands_on_x0():
    # D = x − σε, d = (x − D)/σ, x_next = x + (σ_next − σ) d. With the true ε of x = x0 + σ ε the whole
    # trajectory stays on x0 + σ_i ε and ends at x0 (σ_n = 0). float64 samples; σ_next − σ is taken in
    # float32 as diffusers does: 1e-7 relative.
    s = Euler(20)
    x0, eps = _randn(1), _randn(2)
    x = x0 + s.sigmas[0].double() * eps
    for i, t in enumerate(s.timesteps):
        sig, nxt = s.sigmas[i].double(), s.sigmas[i + 1].double()
        D = x - sig * eps
        expected = x + (nxt - sig) * (x - D) / sig
        x = s.step(eps, t, x)
        assert rel_err(x, expected) < 1e-7 and rel_err(x, x0 + nxt * eps) < 1e-7
    assert rel_err(x, x0) < 1e-7


# ---------------------------------------------------------------- DPM-Solver++(2M), closed form

def _alpha_sigma_lambda(s, t):
    """(α_t, σ_t, λ_t) = (√ᾱ_t, √(1−ᾱ_t), log(α_t/σ_t)) at an integer timestep, float64."""
    a = _a(s, t)
    return math.sqrt(a), math.sqrt(1 - a), math.log(math.sqrt(a) / math.sqrt(1 - a))


def test_dpmpp_first_order_step_is_ddim_eta0():
    # Step 1: x̃_{t_1} = (σ_{t_1}/σ_{t_0}) x − α_{t_1}(e^{−h} − 1) x_θ, x_θ = (x − σ_{t_0} ε)/α_{t_0};
    # equal to DDIM's √ᾱ_{t_1} x̂0 + √(1−ᾱ_{t_1}) ε. float64 samples, float32 σ table: 1e-6 relative.
    s = DPMSolverPP2M(20)
    t0, t1 = s.timesteps[:2].tolist()
    x, eps = _randn(1), _randn(2)
    (a0, s0, l0), (a1, s1, l1) = _alpha_sigma_lambda(s, t0), _alpha_sigma_lambda(s, t1)
    x_theta = (x - s0 * eps) / a0
    out = s.step(eps, t0, x)
    assert rel_err(out, (s1 / s0) * x - a1 * (math.exp(-(l1 - l0)) - 1) * x_theta) < 1e-6
    assert rel_err(out, a1 * x_theta + s1 * eps) < 1e-6  # DDIM, η = 0


def test_dpmpp_second_order_step_by_hand():
    # Step 2: r = h_1/h_2, D = (1 + 1/(2r)) x_θ(t_1) − 1/(2r) x_θ(t_0),
    # x̃_{t_2} = (σ_{t_2}/σ_{t_1}) x̃_{t_1} − α_{t_2}(e^{−h_2} − 1) D. float64 samples, float32 σ table: 1e-6 relative.
    s = DPMSolverPP2M(20)
    t0, t1, t2 = s.timesteps[:3].tolist()
    (a0, s0, l0), (a1, s1, l1), (a2, s2, l2) = (_alpha_sigma_lambda(s, t) for t in (t0, t1, t2))
    x, e0, e1 = _randn(1), _randn(2), _randn(3)
    x1 = s.step(e0, t0, x)
    m0, m1 = (x - s0 * e0) / a0, (x1 - s1 * e1) / a1
    r = (l1 - l0) / (l2 - l1)
    D = (1 + 1 / (2 * r)) * m1 - 1 / (2 * r) * m0
    assert rel_err(s.step(e1, t1, x1), (s2 / s1) * x1 - a2 * (math.exp(-(l2 - l1)) - 1) * D) < 1e-6


@pytest.mark.parametrize("n", [1, 2, 7])
def test_dpmpp_true_noise_stays_on_q_and_ends_at_x_theta(n):
    # With the true ε of x0 every x_θ is x0, D = x0, and x̃_{t_i} = α_{t_i} x0 + σ_{t_i} ε; the last step
    # (σ = 0) returns x_θ = x0. float64 samples, float32 σ table: 1e-6 relative.
    s = DPMSolverPP2M(n)
    x0, eps = _randn(1), _randn(2)
    a, sg, _ = _alpha_sigma_lambda(s, s.timesteps[0])
    x = a * x0 + sg * eps
    for i, t in enumerate(s.timesteps.tolist()):
        x = s.step(eps, t, x)
        if i + 1 < n:
            a, sg, _ = _alpha_sigma_lambda(s, s.timesteps[i + 1])
            assert rel_err(x, a * x0 + sg * eps) < 1e-6
    assert rel_err(x, x0) < 1e-6


# ---------------------------------------------------------------- parity with diffusers

STEP_COUNTS = [1, 2, 3, 7, 20, 25, 50, 100, 999]
REFERENCE = {"dpmpp2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _reference(diffusers, name, spacing, n=None):
    ref = getattr(diffusers, REFERENCE[name]).from_config({**SD14_CONFIG, "timestep_spacing": spacing})
    if n is not None:
        ref.set_timesteps(n)
    return ref


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", REFERENCE)
def test_timesteps_and_sigmas_match_diffusers(diffusers, name, spacing):
    # Every n ≤ 100, then every 7th, the parity step counts and some n where diffusers' trailing adds t = −1.
    ref, cfg = _reference(diffusers, name, spacing), {**SD14_CONFIG, "timestep_spacing": spacing}
    for n in sorted({*range(1, 101), *range(101, 1000, 7), *STEP_COUNTS, 103, 121, 998}):
        ref.set_timesteps(n)
        if (name, spacing, n) == ("dpmpp2m", "leading", 999):  # see test_dpmpp_leading_999_refused
            continue
        ours = schedulers.from_config(cfg, name, n)
        ts, sig = ref.timesteps, ref.sigmas
        if spacing == "trailing" and len(ts) > n:  # diffusers' float arange adds t = −1 for some n; we do not
            assert ts[-1].item() == -1, n
            ts, sig = ts[:-1], torch.cat([sig[:-2], sig[-1:]])
        assert ours.timesteps.dtype == ts.dtype and torch.equal(ours.timesteps, ts), n
        assert torch.equal(ours.sigmas, sig), n
        assert ours.init_noise_sigma == float(ref.init_noise_sigma), n


def test_dpmpp_leading_999_refused(diffusers):
    # 'leading' spaces n+1 = 1000 points at ⌊1000/1000⌋ = 1 apart plus steps_offset 1: t_0 = 1000, past the
    # table. diffusers clamps σ(1000) to σ(999), so h_2 = 0, r = 0 and its second step divides by zero.
    cfg = {**SD14_CONFIG, "timestep_spacing": "leading"}
    with pytest.raises(ValueError, match="timestep 1000"):
        schedulers.from_config(cfg, "dpmpp2m", 999)
    ref = _reference(diffusers, "dpmpp2m", "leading", 999)
    assert ref.timesteps[0].item() == 1000 and ref.sigmas[0] == ref.sigmas[1]
    x = _randn(1, torch.float32)
    for t in ref.timesteps[:2]:
        x = ref.step(0.3 * x + math.sin(t.item()), t, x).prev_sample
    assert not x.isfinite().all()


def _fake_eps(x_in, t, noise):
    # Deterministic stand-in for the UNet: depends on the scaled input and on t, so errors propagate.
    return 0.3 * x_in + math.sin(float(t) / 37) * noise


@pytest.mark.parametrize("name, n, spacing", [  # DPM-Solver++ 'leading' at 999: test_dpmpp_leading_999_refused
    (name, n, sp) for name in REFERENCE for n in STEP_COUNTS for sp in SPACINGS
    if (name, n, sp) != ("dpmpp2m", 999, "leading")])
def test_trajectory_matches_diffusers(diffusers, name, n, spacing):
    # The whole loop as the pipeline runs it: x_T = randn·init_noise_sigma, scale, fake ε, step. Every
    # intermediate x within 1e-5 relative (max|ours − ref| / max|ref|), fp32 on both sides.
    ref = _reference(diffusers, name, spacing, n)
    ours = schedulers.from_config({**SD14_CONFIG, "timestep_spacing": spacing}, name, n)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    noise, x_T = _randn(11, torch.float32), _randn(12, torch.float32)
    seen_ours, seen_ref = [], []  # what each side's UNet stand-in was given

    def recording(seen):
        def eps(x_in, t):
            seen.append(x_in)
            return _fake_eps(x_in, t, noise)
        return eps

    xs_ours, xs_ref = trajectory(ours, recording(seen_ours), x_T), trajectory(ref, recording(seen_ref), x_T)
    for t, in_ours, in_ref, x_ours, x_ref in zip(ours.timesteps.tolist(), seen_ours, seen_ref, xs_ours[1:], xs_ref[1:]):
        assert rel_err(in_ours, in_ref) <= 1e-5, t
        assert rel_err(x_ours, x_ref) <= 1e-5, t
