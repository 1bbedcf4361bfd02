"""Tests for sld_minimal.schedulers, every sampler (DDIM, PNDM, DPM-Solver++(2M), Euler) and the registry:
closed-form identities first, then parity with diffusers."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from sld_minimal import schedulers
from sld_minimal.noise_schedule import SchedulerConfig
from sld_minimal.schedulers import DDIM, PLMS_COEFFS, PNDM, SAMPLERS, DPMSolverPP2M, Euler, Sampler
from sld_minimal.testing import generator as _gen, randn, rel_err, trajectory

# diffusers' set_timesteps calls np.array(tensor), which numpy 2 warns about on every call: thousands of warnings
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

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
SPACINGS = ["leading", "linspace", "trailing"]


def _randn(seed, dtype=torch.float64):
    return randn(SHAPE, seed, dtype)


def _a(s, t):
    """ᾱ_t at an integer timestep, float64."""
    return s.alphas_cumprod[int(t)].double().item()


# ---------------------------------------------------------------- SD 1.4's config, the registry and from_config

def test_inline_config_matches_shared_file():
    if not SD14_CONFIG_FILE.exists():
        pytest.skip(f"{SD14_CONFIG_FILE} not present")
    assert json.loads(SD14_CONFIG_FILE.read_text()) == SD14_CONFIG


def test_registry_holds_the_four_samplers():
    assert set(SAMPLERS) == {"pndm", "ddim", "dpmpp2m", "euler"}
    for name, cls in SAMPLERS.items():
        assert issubclass(cls, Sampler) and cls.name == name
        assert cls.description and "\n" not in cls.description  # one line for --help


def readme_block(heading: str) -> str:
    """The first ```python block under README.md's `## heading`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_register_a_user_sampler_the_readme_example(monkeypatch, diffusers):
    # README "Add a sampler", its code block run as written: Euler ancestral in user code, built by name; equal to
    # diffusers' EulerAncestralDiscreteScheduler draw for draw (same seed), 1e-5 relative.
    monkeypatch.setattr(schedulers, "SAMPLERS", dict(SAMPLERS))  # leave the real registry as it was
    namespace = {"torch": torch}
    exec(readme_block("Add a sampler"), namespace)
    EulerAncestral = namespace["EulerAncestral"]

    ours = schedulers.from_config(SD14_CONFIG, "euler-a", 7)
    ref = diffusers.EulerAncestralDiscreteScheduler.from_config(SD14_CONFIG)
    ref.set_timesteps(7)
    noise, x_T = _randn(11, torch.float32), _randn(12, torch.float32)
    eps = lambda x_in, t: _fake_eps(x_in, t, noise)  # noqa: E731
    x_ours, x_ref = (trajectory(s, eps, x_T, generator=_gen(5))[-1] for s in (ours, ref))
    assert isinstance(ours, EulerAncestral) and ours.stochastic and rel_err(x_ours, x_ref) <= 1e-5
    assert torch.equal(trajectory(ours, eps, x_T, generator=_gen(5))[-1], x_ours)  # the same object, again
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


# ---------------------------------------------------------------- timesteps

@pytest.mark.parametrize("spacing, expected", [
    (None, {"pndm": "leading", "ddim": "leading", "dpmpp2m": "linspace", "euler": "linspace"}),
    ("trailing", dict.fromkeys(["pndm", "ddim", "dpmpp2m", "euler"], "trailing")),
])
def test_timestep_spacing_from_config_else_each_samplers_default(spacing, expected):
    cfg = SD14_CONFIG if spacing is None else {**SD14_CONFIG, "timestep_spacing": spacing}
    assert {name: schedulers.from_config(cfg, name, 10).timestep_spacing for name in SAMPLERS} == expected


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
def test_no_step_counter_and_inputs_stay_untouched(name):
    s = MAKERS[name](6)
    x, eps = _randn(1, torch.float32), _randn(2, torch.float32)
    x0, e0 = x.clone(), eps.clone()
    for k, t in enumerate(s.timesteps.tolist()):  # plain numbers, as a loop over .tolist() hands them
        s.step(eps, t, s.scale_model_input(x, t, i=k), generator=_gen(3), i=k)
        assert s.last_step == (k if s.remembers else None)  # memory of the run: PNDM and DPM-Solver++ only
    assert torch.equal(x, x0) and torch.equal(eps, e0) and not hasattr(s, "steps_taken")


def _run_by_index(s, x_T, noise, seed=3):
    """The loop as `sampling.sample` drives a sampler: told the index of each step; the last x."""
    x = x_T * s.init_noise_sigma
    for i, t in enumerate(s.timesteps.tolist()):
        eps = 0.3 * s.scale_model_input(x, t, i=i) + math.sin(t / 37) * noise
        x = s.step(eps, t, x, generator=_gen(seed + i), i=i)
    return x


@pytest.mark.parametrize("name", MAKERS)
def test_one_sampler_object_serves_two_runs_alike(name):
    # Step 0 clears a sampler's memory of the run: a second run of the same object is the first, bit for bit, and
    # the same as a fresh object's (before, a used object was refused or, for PNDM, stepped on from the old run).
    s, noise = MAKERS[name](5), _randn(2, torch.float32)
    first = _run_by_index(s, _randn(1, torch.float32), noise)
    assert torch.equal(_run_by_index(s, _randn(1, torch.float32), noise), first)
    assert torch.equal(_run_by_index(MAKERS[name](5), _randn(1, torch.float32), noise), first)
    by_t = trajectory(s, lambda x_in, t: 0.3 * x_in + math.sin(float(t) / 37) * noise, _randn(1, torch.float32))
    if not s.stochastic:  # told t alone (diffusers' convention), it finds the index itself: the same run
        assert torch.equal(by_t[-1], first)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_a_sampler_without_memory_takes_one_step_alone(name):
    # Step 3 of a fresh object, told its index, is step 3 of a whole run (DDIM's noise: the same seed).
    s, x, noise = MAKERS[name](6), _randn(1, torch.float32), _randn(2, torch.float32)
    t = s.timesteps[3].item()
    alone = s.step(0.3 * s.scale_model_input(x, t, i=3) + noise, t, x, generator=_gen(4), i=3)
    run = MAKERS[name](6)
    for i, ti in enumerate(run.timesteps.tolist()[:3]):
        run.step(noise, ti, x, generator=_gen(9), i=i)
    assert torch.equal(run.step(0.3 * run.scale_model_input(x, t, i=3) + noise, t, x, generator=_gen(4), i=3), alone)


def test_one_step_of_a_sampler_with_memory_alone():
    # DPM-Solver++'s second-order step 2 from its memory set by hand (x_θ of step 1, `last_step`), against the same
    # step within a run; and PNDM's Adams–Bashforth step 3 from its ε history.
    x, e = _randn(1, torch.float32), [_randn(k, torch.float32) for k in (2, 3, 4)]
    run = DPMSolverPP2M(6)
    xs = [x]
    for i in range(3):
        xs.append(run.step(e[i], run.timesteps[i].item(), xs[-1], i=i))
    alone = DPMSolverPP2M(6)
    alone.x0_history, alone.last_step = list(run.x0_history[:1]), 1
    assert torch.equal(alone.step(e[2], alone.timesteps[2].item(), xs[2], i=2), xs[3])
    pndm = PNDM(6)
    history = [_randn(k, torch.float32) for k in (5, 6)]
    pndm.eps_history, pndm.last_step = list(history), 2
    t = pndm.timesteps[3].item()
    expected = pndm.transfer(x, (23 * e[0] - 16 * history[1] + 5 * history[0]) / 12, int(t), int(t) - 1000 // 6)
    assert rel_err(pndm.step(e[0], t, x, i=3), expected) < 1e-6


@pytest.mark.parametrize("make", [lambda: DDIM(20, eta=0.5), lambda: PNDM(20)])
def test_step_does_not_modify_inputs(make):
    s = make()
    x, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    x0, e0 = x.clone(), eps.clone()
    for t in s.timesteps[:6]:
        s.step(eps, t, x, generator=_gen(3))
    assert torch.equal(x, x0) and torch.equal(eps, e0)


def test_stochastic_flag():
    assert DDIM(10, eta=0.5).stochastic and not DDIM(10).stochastic
    assert not any(cls.stochastic for cls in (PNDM, DPMSolverPP2M, Euler))


@pytest.mark.parametrize("cls", [DPMSolverPP2M, PNDM])
def test_samplers_with_memory_step_in_order_from_step_0(cls):
    s = cls(3)
    x = _randn(1, torch.float32)
    name = cls.__name__
    with pytest.raises(ValueError, match=f"^{name}'s step 2 needs its memory of step 1 of the same run, but it holds "
                                         f"nothing: take the steps in order from step 0$"):
        s.step(x, s.timesteps[2], x, i=2)
    x = s.step(x, s.timesteps[0], x, i=0)
    with pytest.raises(ValueError, match=f"^{name}'s step 2 needs its memory of step 1 of the same run, but it holds "
                                         f"step 0: take"):
        s.step(x, s.timesteps[2], x, i=2)


def test_the_index_is_checked_against_t():
    s = DDIM(10)
    x = _randn(1, torch.float32)
    with pytest.raises(ValueError, match="^DDIM's step 3 is at t=601, got t=501.0$"):
        s.step(x, 501, x, i=3)
    with pytest.raises(ValueError, match="^DDIM has steps 0 to 9, got i=10$"):
        s.step(x, 1, x, i=10)
    with pytest.raises(ValueError, match="^t=500.0 is none of DDIM's 10 timesteps$"):
        s.step(x, 500, x)


def test_the_loop_tells_the_sampler_each_index():
    # sampling.sample passes i, the loop's iteration, to scale_model_input and step: PNDM's 4 iterations for 3 steps,
    # its second timestep twice (i = 1 and 2).
    from sld_minimal.methods import CFG
    from sld_minimal.sampling import sample

    told = []

    class Told(PNDM):
        def scale_model_input(self, x, t, i=None):
            told.append(("input", i, int(t)))
            return x

        def update(self, eps, i, x, generator=None):
            told.append(("step", i))
            return super().update(eps, i, x, generator)

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, context):
            return 0.1 * x

    sampler = Told(3)
    sample(Unet(), sampler, CFG(7.5), _randn(1, torch.float32), lambda name: torch.zeros(1, 77, 8))
    ts = sampler.timesteps.tolist()
    assert ts[1] == ts[2] and told == [x for i, t in enumerate(ts) for x in (("input", i, t), ("step", i))]


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


# ---------------------------------------------------------------- DDIM closed form

def test_alpha_bar_below_zero():
    # set_alpha_to_one=False: ᾱ_{t<0} = ᾱ_0; True: ᾱ_{t<0} = 1.
    s = DDIM(10)
    assert s.alpha_bar(-1).item() == s.alphas_cumprod[0].item()
    assert DDIM(10, config=SchedulerConfig(set_alpha_to_one=True)).alpha_bar(-5).item() == 1.0


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

STEP_COUNTS = [1, 2, 3, 7, 20, 50, 51, 100, 999]  # DDIM and PNDM
SOLVER_STEP_COUNTS = [1, 2, 3, 7, 20, 25, 50, 100, 999]  # DPM-Solver++(2M) and Euler
REFERENCE = {"dpmpp2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


@pytest.fixture(scope="module")
def diffusers():
    # Only the parity tests need the reference; the closed-form tests above run without it.
    return pytest.importorskip("diffusers")


def _fake_eps(x_in, t, noise):
    # Deterministic stand-in for the UNet: depends on the scaled input and on t, so errors propagate.
    return 0.3 * x_in + math.sin(float(t) / 37) * noise


def _run(ours, theirs, n, eta=None, seed=0):
    """The last x of both runs, from the same x_T, with the same stand-in ε (and seed, for DDIM's noise)."""
    noise, x_T = torch.randn(SHAPE, generator=_gen(11)), torch.randn(SHAPE, generator=_gen(12))
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    eps = lambda x, t: _fake_eps(x, t, noise)  # noqa: E731
    kw = {} if eta is None else {"eta": eta, "generator": _gen(seed)}
    return trajectory(ours, eps, x_T, generator=_gen(seed))[-1], trajectory(theirs, eps, x_T, **kw)[-1]


def _reference(diffusers, name, spacing, n=None):
    ref = getattr(diffusers, REFERENCE[name]).from_config({**SD14_CONFIG, "timestep_spacing": spacing})
    if n is not None:
        ref.set_timesteps(n)
    return ref


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


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", REFERENCE)
def test_timesteps_and_sigmas_match_diffusers(diffusers, name, spacing):
    # Every n ≤ 100, then every 7th, the parity step counts and some n where diffusers' trailing adds t = −1.
    ref, cfg = _reference(diffusers, name, spacing), {**SD14_CONFIG, "timestep_spacing": spacing}
    for n in sorted({*range(1, 101), *range(101, 1000, 7), *SOLVER_STEP_COUNTS, 103, 121, 998}):
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


@pytest.mark.parametrize("name, n, spacing", [  # DPM-Solver++ 'leading' at 999: test_dpmpp_leading_999_refused
    (name, n, sp) for name in REFERENCE for n in SOLVER_STEP_COUNTS for sp in SPACINGS
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
