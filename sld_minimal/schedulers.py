"""Samplers: DDIM and PNDM (PLMS), which SD 1.4 ships with, DPM-Solver++(2M) and Euler, in one registry.

The noise schedule they share (ᾱ_t, the timestep spacings, σ) and its notation are in `noise_schedule.py`: ᾱ_t is
`alphas_cumprod` (`a_t` in code), DPM-Solver++ writes x_t = α_t x_0 + σ_t ε with α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), and
Karras et al. (Euler) use x = x_0 + σ ε with σ = σ_t/α_t = √((1−ᾱ_t)/ᾱ_t).

Every sampler is a `Sampler`: `timesteps`, `init_noise_sigma`, `scale_model_input(x, t, i)` and
`step(eps, t, x, generator, i)`. The loop that drives one (`sampling.sample`) reads

    x = randn · init_noise_sigma
    for i, t in enumerate(timesteps): x = step(ε_θ(scale_model_input(x, t, i=i), t), t, x, i=i)

i is the loop's iteration, one per UNet call (PNDM makes 51 for 50 steps, as diffusers does); the sampler is told
it and keeps no step counter of its own.

`SAMPLERS` maps a name to its class; `@register("name")` adds one, `from_config` builds one.

Numerics follow diffusers' DDIM/PNDM/DPMSolverMultistep/EulerDiscrete schedulers: a float32 ᾱ (and σ)
table, scalar coefficients as float32 0-d tensors, the timesteps and σ interpolation computed with numpy
as diffusers does, and the same order of operations, so a trajectory matches theirs to float rounding.
"""
from __future__ import annotations

import inspect
import math
from typing import ClassVar

import numpy as np
import torch

from .noise_schedule import SchedulerConfig, alphas_cumprod, karras_sigmas, spaced_timesteps

# Adams–Bashforth weights (numerators, denominator) for the newest-first eps history, PLMS order 1..4.
PLMS_COEFFS = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


# ---------------------------------------------------------------- the interface and the registry

class Sampler:
    """What the sampling loop needs from a sampler; subclasses implement `update` (and may set the rest).

    timesteps          1-D tensor of the t at which the UNet is called, in order (int64, or float32 for Euler)
    init_noise_sigma   std of the initial latents: x_T = randn · init_noise_sigma
    scale_model_input  (x, t, i) ↦ what the UNet sees at step i (identity unless the sampler works in another scaling)
    step               (ε, t, x_t, generator, i) ↦ x at the next timestep, by `update(ε, i, x_t, generator)`
    stochastic         whether `step` draws noise (then a seeded generator is what makes a run repeatable);
                       read it on an instance (DDIM's depends on its η)

    Where it is: `i`, the index of the step in `timesteps`, which the loop passes and `index` checks against t. A
    caller that gives t alone (diffusers' convention: `step(eps, t, x)`) gets the index that holds t (PNDM, whose
    t_1 comes twice, tells its two calls apart by its memory). There is no step counter: a sampler without memory
    (DDIM, Euler) takes any one step alone, `step(eps, t, x, i=k)`.

    Memory of the run: PNDM (its past ε) and DPM-Solver++ (the last x_θ) remember earlier steps, in plain attributes
    named in their docstrings, and `last_step`, the index of the step that memory ends with (`remembers` is True for
    them). Step 0 starts a run and clears that memory (`reset`), so one object serves run after run; step i > 0 must
    come right after step i − 1 of the same run, else ValueError. (Two runs interleaved on one object: not supported.)

    A subclass writes its maths in `update(eps, i, x, generator)` and reads t = timesteps[i] (or σ_i) itself.
    A subclass is built as `cls(num_inference_steps, config=SchedulerConfig, **its options)`; `from_config`
    passes the options by keyword and refuses ones its __init__ does not name.
    """
    name: ClassVar[str] = ""           # registry key, set by @register
    description: ClassVar[str] = ""    # one line for a CLI's --help
    default_spacing: ClassVar[str] = "leading"
    fixed_config: ClassVar[dict] = {}  # diffusers config keys this class implements at one value only
    stochastic: ClassVar[bool] = False
    remembers: ClassVar[bool] = False  # keeps memory of earlier steps of a run (then steps go in order from 0)
    init_noise_sigma: float = 1.0

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.timestep_spacing = self.config.timestep_spacing or self.default_spacing
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.timesteps = torch.zeros(0, dtype=torch.int64)  # the subclass sets the schedule
        self.last_step: int | None = None  # the step the memory of the run ends with (samplers that remember)

    def check_range(self, ts: np.ndarray) -> np.ndarray:
        """Refuse a schedule past the last trained timestep ('leading' with steps_offset 1 at n = T, or
        DPM-Solver++'s n+1-point 'leading' at n = T − 1, where diffusers steps from t = T and returns inf)."""
        T = self.config.num_train_timesteps
        if ts.max() >= T:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} with {self.timestep_spacing!r} spacing "
                             f"and steps_offset={self.config.steps_offset} would reach timestep {int(ts.max())}, "
                             f"past the last trained timestep {T - 1}")
        return ts

    def scale_model_input(self, x: torch.Tensor, t, i: int | None = None) -> torch.Tensor:
        return x

    def step(self, eps: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None,
             i: int | None = None) -> torch.Tensor:
        """x_t → x_{t_prev} by the subclass's `update`; t is an element of `timesteps` (tensor or number), i its
        index there (the loop's iteration; found from t where not given, see `index`)."""
        i = self.index(t, i)
        if self.remembers:
            self.follow(i)
        return self.update(eps, i, x, generator)

    def update(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def index(self, t, i: int | None = None) -> int:
        """The index of the step at timestep t: i as the caller gives it, checked (timesteps[i] must be t), or,
        where not given, the first index that holds t."""
        name, ts = type(self).__name__, self.timesteps
        if i is not None:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(ts):
                raise ValueError(f"{name} has steps 0 to {len(ts) - 1}, got i={i!r}")
            if float(t) != float(ts[i]):
                raise ValueError(f"{name}'s step {i} is at t={ts[i].item()}, got t={float(t)}")
            return i
        found = next((k for k, s in enumerate(ts.tolist()) if s == float(t)), None)
        if found is None:
            raise ValueError(f"t={float(t)} is none of {name}'s {len(ts)} timesteps")
        return found

    def reset(self):
        """Forget the memory of a previous run (step 0 calls it); samplers without memory have none."""

    def follow(self, i: int):
        """For samplers that remember: step 0 starts a run afresh; step i > 0 must follow step i − 1 of this run."""
        if i == 0:
            self.reset()
        elif self.last_step != i - 1:
            held = "nothing" if self.last_step is None else f"step {self.last_step}"
            raise ValueError(f"{type(self).__name__}'s step {i} needs its memory of step {i - 1} of the same run, but "
                             f"it holds {held}: take the steps in order from step 0")
        self.last_step = i


SAMPLERS: dict[str, type[Sampler]] = {}


def register(name: str):
    """Class decorator: add a Sampler subclass to `SAMPLERS` under `name` (lower case; what --scheduler takes)."""
    def add(cls: type[Sampler]) -> type[Sampler]:
        if name != name.lower() or name in SAMPLERS:
            raise ValueError(f"sampler name {name!r} must be lower case and not yet taken ({', '.join(SAMPLERS)})")
        if not issubclass(cls, Sampler):
            raise TypeError(f"{cls.__name__} must subclass schedulers.Sampler")
        cls.name = name
        SAMPLERS[name] = cls
        return cls
    return add


def describe() -> str:
    """The registry in one line per sampler, for a CLI's --help."""
    return "; ".join(f"{name}: {cls.description}" for name, cls in SAMPLERS.items())


def from_config(config: dict, name: str, num_inference_steps: int = 50, **options) -> Sampler:
    """Sampler `name` (a key of SAMPLERS) from a scheduler_config.json dict, like diffusers'
    `<Class>.from_config(config)`: its _class_name is ignored and keys another sampler uses are skipped."""
    cls = SAMPLERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SAMPLERS)}")
    takes = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "num_inference_steps", "config")]
    for key in options:
        if key not in takes:
            raise ValueError(f"scheduler {cls.name!r} takes no option {key!r} "
                             f"(its options: {', '.join(takes) or 'none'})")
    for key, value in cls.fixed_config.items():
        given = config.get(key, value)
        if (bool(given) != value) if isinstance(value, bool) else (given != value):  # a saved null reads as False
            raise ValueError(f"unsupported scheduler config {key}={given!r}: "
                             f"{cls.name!r} implements {key}={value!r} only")
    return cls(num_inference_steps, config=SchedulerConfig.from_dict(config), **options)


# ---------------------------------------------------------------- DDIM and PNDM: integer timesteps, t → t − ⌊T/n⌋

class _DiscreteSampler(Sampler):
    """DDIM and PNDM step from t to t − ⌊T/n⌋ whatever the spacing (diffusers does; for 'leading' it is the
    next timestep, for 'linspace'/'trailing' it can differ from it by a few)."""

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        super().__init__(num_inference_steps, config)
        ts = self.check_range(spaced_timesteps(self.config, num_inference_steps, self.timestep_spacing))
        self.timesteps = torch.from_numpy(ts.astype(np.int64))
        self.step_ratio = self.config.num_train_timesteps // num_inference_steps

    def alpha_bar(self, t: int) -> torch.Tensor:
        """ᾱ_t; below t = 0 (the step past the last timestep) it is 1 if set_alpha_to_one, else ᾱ_0."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]


@register("ddim")
class DDIM(_DiscreteSampler):
    """DDIM sampler (Song et al. 2020, "Denoising Diffusion Implicit Models"), eq. 12:

        x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z,   z ~ N(0, I)
        σ      = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)          (eq. 16)

    η = 0 is deterministic; η = 1 is the DDPM posterior variance. For η > 0, z is drawn once per step
    with torch.randn on the generator's device (CPU when generator is None), then moved to x's device,
    so a seeded torch.Generator reproduces diffusers' DDIMScheduler noise draw for draw.
    """
    description = "DDIM (Song et al. 2020); deterministic at eta=0, eta>0 adds noise"

    def __init__(self, num_inference_steps: int = 50, eta: float = 0.0, config: SchedulerConfig | None = None):
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (it scales a standard deviation), got {eta}")
        super().__init__(num_inference_steps, config)
        self.eta = eta

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def update(self, eps, i, x, generator=None):
        t = int(self.timesteps[i])
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t - self.step_ratio)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if self.eta > 0:
            device = generator.device if generator is not None else "cpu"
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
            x_prev = x_prev + sigma * z
        return x_prev


@register("pndm")
class PNDM(_DiscreteSampler):
    """PNDM with skip_prk_steps, i.e. PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds"), as SD 1.4 uses it. Every update is the transfer step φ (eq. 11),

        φ(x_t, ε, t, t_prev) = √(ᾱ_prev/ᾱ_t) x_t − (ᾱ_prev − ᾱ_t) ε / (ᾱ_t √(1−ᾱ_prev) + √(ᾱ_t (1−ᾱ_t) ᾱ_prev)),

    (algebraically DDIM with η = 0), fed with a linear-multistep combination ε' of past eps values:
      call 0 (t_0):   ε' = ε_0; remember x_{t_0} and ε_0.
      call 1 (t_1):   Heun-style correction: redo the first step from the remembered x_{t_0} with
                      ε' = (ε_0 + ε_1)/2. ε_1 is used once and not added to the history.
      call k ≥ 2:     Adams–Bashforth on the newest ≤ 4 history entries (PLMS_COEFFS), e.g. order 4:
                      ε' = (55 e_1 − 59 e_2 + 37 e_3 − 9 e_4)/24, e_1 newest.
    Hence `timesteps` holds t_1 twice (n+1 UNet calls for n ≥ 2; 50 steps: 981, 961, 961, 941, …, 1), and the
    call number is the step index i that the loop passes (given t alone, t_1 is call 1 until call 1 is done).

    Memory of the run: `eps_history` (past eps, oldest first, at most 4), `first_sample` (x_{t_0}, kept
    between calls 0 and 1) and `last_step`. Call 0 clears it, so one object serves run after run; a call
    i > 0 must follow call i − 1 of the same run.
    """
    description = "PLMS/PNDM (Liu et al. 2022), SD 1.4's default; deterministic"
    remembers = True

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        super().__init__(num_inference_steps, config)
        if not self.config.skip_prk_steps:
            raise ValueError("skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not implemented")
        ts = self.timesteps  # repeat the second timestep for the Heun correction call
        self.timesteps = torch.cat([ts[:1], ts[1:2], ts[1:]]) if len(ts) >= 2 else ts
        self.reset()

    def reset(self):
        self.eps_history: list[torch.Tensor] = []
        self.first_sample: torch.Tensor | None = None
        self.last_step = None

    def index(self, t, i=None):
        if i is None and len(self.timesteps) > 2 and float(t) == float(self.timesteps[1]):
            return 2 if self.last_step == 1 else 1  # t_1 twice: the Heun correction (1), then Adams–Bashforth (2)
        return super().index(t, i)

    def transfer(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """φ(x_t, ε, t, t_prev) from the class docstring."""
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom

    def update(self, eps, i, x, generator=None):
        """One PLMS update; `generator` is accepted for interface parity and unused (PNDM is deterministic)."""
        t = int(self.timesteps[i])
        if i == 1:  # Heun correction: same interval t_0 → t_1 again, from x_{t_0}
            eps_used = (eps + self.eps_history[-1]) / 2
            x, t_from, t_to = self.first_sample, t + self.step_ratio, t
            self.first_sample = None
        else:
            self.eps_history = self.eps_history[-3:] + [eps]
            if i == 0:
                self.first_sample = x
            nums, den = PLMS_COEFFS[len(self.eps_history)]
            combo = sum(c * e for c, e in zip(nums, reversed(self.eps_history)))
            # the reference divides by 2 and 12 but multiplies by 1/24; rounding alike keeps a seed's bits
            eps_used = combo * (1 / den) if den == 24 else combo / den
            t_from, t_to = t, t - self.step_ratio
        return self.transfer(x, eps_used, t_from, t_to)


# ---------------------------------------------------------------- DPM-Solver++(2M) and Euler: a σ table

def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras σ → DPM-Solver's (α_t, σ_t) = (1/√(σ²+1), σ/√(σ²+1)), i.e. (√ᾱ_t, √(1−ᾱ_t))."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


@register("dpmpp2m")
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", arXiv 2211.01095), Algorithm 2, as diffusers' DPMSolverMultistepScheduler builds
    it from SD 1.4's config (dpmsolver++, solver_order 2, midpoint, lower_order_final, final σ = 0).

    With α_t = √ᾱ_t, σ_t = √(1−ᾱ_t) and λ_t = log(α_t/σ_t), the solver integrates the data prediction
        x_θ(x_t, t) = (x_t − σ_t ε_θ(x_t, t)) / α_t.
    Step i takes x̃_{t_{i−1}} to x̃_{t_i}, with h_i = λ_{t_i} − λ_{t_{i−1}}:
      first order (i = 1, no history yet; and the last step, where σ_{t_M} = 0, λ = ∞ and x̃_{t_M} = x_θ),
      which is DDIM with η = 0:
        x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) x_θ(x̃_{t_{i−1}}, t_{i−1})
      second order (multistep midpoint), r_i = h_{i−1}/h_i:
        D_i     = (1 + 1/(2r_i)) x_θ(x̃_{t_{i−1}}, t_{i−1}) − 1/(2r_i) x_θ(x̃_{t_{i−2}}, t_{i−2})
        x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i
    Timesteps: 'linspace' (default) is n+1 points on [0, T−1] without the last (20 steps: 999, 949, …, 50),
    'leading' likewise from ⌊T/(n+1)⌋; α, σ are read from the σ table interpolated there (`karras_sigmas`).

    diffusers' lower_order_final / euler_at_final change nothing here: with the final σ = 0 the last step is
    first order anyway. Memory of the run: `x0_history` (x_θ of the last two steps, newest last) and
    `last_step`; step 0 clears it, so one object serves run after run.
    """
    description = "DPM-Solver++(2M) (Lu et al. 2022), good in about 20 steps; deterministic"
    default_spacing = "linspace"
    remembers = True
    fixed_config = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                    "final_sigmas_type": "zero", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                    "lambda_min_clipped": -math.inf, "variance_type": None, "use_dynamic_shifting": False}

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        super().__init__(num_inference_steps, config)
        n, spacing = num_inference_steps, self.timestep_spacing
        # linspace/leading: n+1 points and drop t = 0, which only the final σ = 0 stands for
        ts = spaced_timesteps(self.config, n, spacing) if spacing == "trailing" else \
            spaced_timesteps(self.config, n + 1, spacing)[:-1]
        self.check_range(ts)
        self.timesteps = torch.from_numpy(ts.astype(np.int64))
        self.sigmas = karras_sigmas(self.alphas_cumprod, ts)  # (n+1,), float32, last 0
        self.reset()

    def reset(self):
        self.x0_history: list[torch.Tensor] = []
        self.last_step = None

    def update(self, eps, i, x, generator=None):
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        x0 = (x - sigma_s0 * eps) / alpha_s0  # x_θ(x̃_{t_{i−1}}, t_{i−1}) in the sample's dtype
        self.x0_history = self.x0_history[-1:] + [x0]
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))  # diffusers upcasts fp16/bf16
        lam_t, lam_s0 = torch.log(alpha_t) - torch.log(sigma_t), torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lam_t - lam_s0
        if i == 0 or i == len(self.timesteps) - 1:  # first order: no history yet / σ_{t_M} = 0
            x_prev = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
            r = (lam_s0 - (torch.log(alpha_s1) - torch.log(sigma_s1))) / h  # r_i = h_{i−1}/h_i
            D0, D1 = x0, (1.0 / r) * (x0 - self.x0_history[0])  # D_i = D0 + D1/2 (diffusers' grouping)
            x_prev = ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                      - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return x_prev.to(dtype)


@register("euler")
class Euler(Sampler):
    """Euler sampler of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
    Models", arXiv 2206.00364), Algorithm 2 with S_churn = 0 and no second-order correction (i.e. the Euler
    step of Algorithm 1, lines 4–5), as diffusers' EulerDiscreteScheduler builds it from SD 1.4's config.

    Karras' x lives at noise level σ: x = x_0 + σ n, with σ_t = √((1−ᾱ_t)/ᾱ_t) (their VP σ(t)). The ε-model is
    preconditioned as in their Table 1 (VP): c_in = 1/√(σ²+1), c_skip = 1, c_out = −σ, so
        `scale_model_input`:  x ↦ x / √(σ²+1)          (= √ᾱ_t x_0 + √(1−ᾱ_t) n, the UNet's training input)
        D_θ(x; σ) = x − σ ε_θ(x/√(σ²+1), t)            (x̂_0)
        d_i       = (x_i − D_θ(x_i; σ_i)) / σ_i         (dx/dσ of the probability-flow ODE)
        x_{i+1}   = x_i + (σ_{i+1} − σ_i) d_i           (σ_{n} = 0 closes the schedule)
    σ_i is σ(t) interpolated linearly at the timesteps, which are floats for 'linspace' (the default:
    n points on [0, T−1], 20 steps: 999, 946.4…, …, 0). The initial noise is N(0, σ_max²) for linspace and
    trailing, and N(0, σ_max² + 1) for leading (diffusers' `init_noise_sigma`).
    """
    description = "Euler (Karras et al. 2022, Alg. 2 without churn), sigma-scaled input; deterministic"
    default_spacing = "linspace"
    fixed_config = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "timestep_type": "discrete", "final_sigmas_type": "zero"}

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        super().__init__(num_inference_steps, config)
        ts = spaced_timesteps(self.config, num_inference_steps, self.timestep_spacing, rounded=False)
        ts = self.check_range(ts).astype(np.float32)  # diffusers interpolates at the float32 timesteps
        self.timesteps = torch.from_numpy(ts)
        self.sigmas = karras_sigmas(self.alphas_cumprod, ts)  # (n+1,), float32, last 0
        s_max = self.sigmas.max()
        self.init_noise_sigma = float(s_max if self.timestep_spacing != "leading" else (s_max ** 2 + 1) ** 0.5)

    def scale_model_input(self, x, t, i=None):
        return x / (self.sigmas[self.index(t, i)] ** 2 + 1) ** 0.5

    def update(self, eps, i, x, generator=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))  # diffusers upcasts fp16/bf16
        x0 = x - sigma * eps  # D_θ(x_i; σ_i)
        d = (x - x0) / sigma
        return (x + d * (sigma_next - sigma)).to(dtype)
