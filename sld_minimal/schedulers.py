"""Noise schedule and the two samplers Stable Diffusion 1.4 ships with: DDIM and PNDM (PLMS).

Notation. DDPM (Ho et al. 2020) writes α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s. The code only ever needs
the cumulative product, `alphas_cumprod` = ᾱ_t, which the DDIM paper (Song et al. 2020) writes as
plain α_t. Every docstring below uses ᾱ_t for it, so `a_t` in code means ᾱ_t, never DDPM's α_t.
The forward process is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); the UNet predicts ε ("epsilon").

Numerics follow diffusers' DDIMScheduler / PNDMScheduler: a float32 ᾱ table, scalar coefficients
as float32 0-d tensors, and the sample's own dtype for the tensor arithmetic.
"""
from __future__ import annotations

import dataclasses

import torch

# Adams–Bashforth weights (numerators, denominator) for the newest-first eps history, PLMS order 1..4.
PLMS_COEFFS = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers scheduler_config.json this module honours; defaults = SD 1.4."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}: "
                             "only 'linear' and 'scaled_linear' are implemented")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Build from a scheduler_config.json dict; refuses settings that would change the maths."""
        refuse = {  # key: (value that is supported, why anything else is refused)
            "prediction_type": ("epsilon", "only epsilon-prediction models are supported"),
            "trained_betas": (None, "only betas computed from beta_start/beta_end are supported"),
            "clip_sample": (False, "clipping the predicted x0 is not implemented"),
            "thresholding": (False, "dynamic thresholding is not implemented"),
            "timestep_spacing": ("leading", "only 'leading' timestep spacing is implemented"),
            "rescale_betas_zero_snr": (False, "zero-terminal-SNR rescaling is not implemented"),
        }
        for key, (ok, why) in refuse.items():
            if key in d and d[key] != ok:
                raise ValueError(f"unsupported scheduler config {key}={d[key]!r}: {why}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # unknown keys are ignored


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t = ∏_{s=0}^{t} (1 − β_s) for t = 0..T−1, float32 like the reference.

    'scaled_linear' (SD): √β linear from √β_start to √β_end; 'linear' (DDPM): β itself linear."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> torch.Tensor:
    """'leading' spacing: t_i = i·(T // n) + steps_offset, i = n−1 … 0 (SD 1.4, 50 steps: 981 … 1)."""
    n, T = num_inference_steps, cfg.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    ratio = T // n
    if (n - 1) * ratio + cfg.steps_offset >= T:  # e.g. n = T with steps_offset 1 would need t = T
        raise ValueError(f"num_inference_steps={n} with steps_offset={cfg.steps_offset} would reach timestep "
                         f"{(n - 1) * ratio + cfg.steps_offset}, past the last trained timestep {T - 1}")
    return (torch.arange(n - 1, -1, -1, dtype=torch.int64) * ratio + cfg.steps_offset)


class _Sampler:
    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.num_inference_steps = num_inference_steps
        self.timesteps = leading_timesteps(self.config, num_inference_steps)  # validates the step count
        self.step_ratio = self.config.num_train_timesteps // num_inference_steps  # t → t_prev = t − step_ratio
        self.alphas_cumprod = alphas_cumprod(self.config)

    def alpha_bar(self, t: int) -> torch.Tensor:
        """ᾱ_t; below t = 0 (the step past the last timestep) it is 1 if set_alpha_to_one, else ᾱ_0."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]


class DDIM(_Sampler):
    """DDIM sampler (Song et al. 2020, "Denoising Diffusion Implicit Models"), eq. 12:

        x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z,   z ~ N(0, I)
        σ      = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)          (eq. 16)

    η = 0 is deterministic; η = 1 is the DDPM posterior variance. For η > 0, z is drawn once per step
    with torch.randn on the generator's device (CPU when generator is None), then moved to x's device,
    so a seeded torch.Generator reproduces diffusers' DDIMScheduler noise draw for draw.
    """

    def __init__(self, num_inference_steps: int = 50, eta: float = 0.0, config: SchedulerConfig | None = None):
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (it scales a standard deviation), got {eta}")
        super().__init__(num_inference_steps, config)
        self.eta = eta

    def step(self, eps: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        t = int(t)
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t - self.step_ratio)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if self.eta > 0:
            device = generator.device if generator is not None else "cpu"
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
            x_prev = x_prev + sigma * z
        return x_prev


class PNDM(_Sampler):
    """PNDM with skip_prk_steps, i.e. PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds"), as SD 1.4 uses it. Every update is the transfer step φ (eq. 11),

        φ(x_t, ε, t, t_prev) = √(ᾱ_prev/ᾱ_t) x_t − (ᾱ_prev − ᾱ_t) ε / (ᾱ_t √(1−ᾱ_prev) + √(ᾱ_t (1−ᾱ_t) ᾱ_prev)),

    (algebraically DDIM with η = 0), fed with a linear-multistep combination ε' of past eps values:
      call 0 (t_0):   ε' = ε_0; remember x_{t_0} and ε_0.
      call 1 (t_1):   Heun-style correction: redo the first step from the remembered x_{t_0} with
                      ε' = (ε_0 + ε_1)/2. ε_1 is used once and not added to the history.
      call k ≥ 2:     Adams–Bashforth on the newest ≤ 4 history entries (PLMS_COEFFS), e.g. order 4:
                      ε' = (55 e_1 − 59 e_2 + 37 e_3 − 9 e_4)/24, e_1 newest.
    Hence `timesteps` holds t_1 twice (n+1 UNet calls for n ≥ 2; 50 steps: 981, 961, 961, 941, …, 1).

    State: `eps_history` (past eps, oldest first, at most 4), `first_sample` (x_{t_0}, kept between
    calls 0 and 1) and `n_calls`. This state ties the object to one trajectory: use a fresh PNDM per
    generation.
    """

    def __init__(self, num_inference_steps: int = 50, config: SchedulerConfig | None = None):
        super().__init__(num_inference_steps, config)
        if not self.config.skip_prk_steps:
            raise ValueError("skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not implemented")
        ts = self.timesteps  # repeat the second timestep for the Heun correction call
        self.timesteps = torch.cat([ts[:1], ts[1:2], ts[1:]]) if len(ts) >= 2 else ts
        self.eps_history: list[torch.Tensor] = []
        self.first_sample: torch.Tensor | None = None
        self.n_calls = 0

    def transfer(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """φ(x_t, ε, t, t_prev) from the class docstring."""
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom

    def step(self, eps: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One PLMS update; `generator` is accepted for interface parity and unused (PNDM is deterministic)."""
        t = int(t)
        if self.n_calls == 1:  # Heun correction: same interval t_0 → t_1 again, from x_{t_0}
            eps_used = (eps + self.eps_history[-1]) / 2
            x, t_from, t_to = self.first_sample, t + self.step_ratio, t
            self.first_sample = None
        else:
            self.eps_history = self.eps_history[-3:] + [eps]
            if self.n_calls == 0:
                self.first_sample = x
            nums, den = PLMS_COEFFS[len(self.eps_history)]
            combo = sum(c * e for c, e in zip(nums, reversed(self.eps_history)))
            # the reference divides by 2 and 12 but multiplies by 1/24; rounding alike keeps a seed's bits
            eps_used = combo * (1 / den) if den == 24 else combo / den
            t_from, t_to = t, t - self.step_ratio
        self.n_calls += 1
        return self.transfer(x, eps_used, t_from, t_to)


def from_config(config: dict, name: str, num_inference_steps: int = 50, eta: float = 0.0) -> _Sampler:
    """Sampler `name` ("pndm" or "ddim") from a scheduler_config.json dict; its _class_name is ignored."""
    cfg = SchedulerConfig.from_dict(config)
    if name.lower() == "ddim":
        return DDIM(num_inference_steps, eta=eta, config=cfg)
    if name.lower() == "pndm":
        if eta != 0:
            raise ValueError(f"eta={eta} applies to DDIM only; PNDM is deterministic")
        return PNDM(num_inference_steps, config=cfg)
    raise ValueError(f"unknown scheduler {name!r}: expected 'pndm' or 'ddim'")
