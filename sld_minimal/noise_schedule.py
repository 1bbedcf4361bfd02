"""The noise schedule every sampler shares: ᾱ_t, the spacing of the timesteps a sampler visits, and Karras' σ.

Notation. DDPM (Ho et al. 2020) writes α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s. The code only ever needs
the cumulative product, `alphas_cumprod` = ᾱ_t, which the DDIM paper (Song et al. 2020) writes as
plain α_t. Every docstring here and in schedulers.py uses ᾱ_t for it, so `a_t` in code means ᾱ_t, never DDPM's
α_t. The forward process is q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I); the UNet predicts ε ("epsilon").
DPM-Solver++ writes that process as x_t = α_t x_0 + σ_t ε with α_t = √ᾱ_t, σ_t = √(1−ᾱ_t); Karras et al.
(Euler) use the unscaled x = x_0 + σ ε with σ = σ_t/α_t = √((1−ᾱ_t)/ᾱ_t).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .checks import config_values

SPACINGS = ("leading", "linspace", "trailing")  # Lin et al. 2023, "Common Diffusion Noise Schedules…", Table 2


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers scheduler_config.json this module honours; defaults = SD 1.4.

    `timestep_spacing` None means each sampler's own default, as in diffusers (DDIM/PNDM 'leading',
    DPM-Solver++ and Euler 'linspace'); SD 1.4's file does not set it."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True
    timestep_spacing: str | None = None

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}: "
                             "only 'linear' and 'scaled_linear' are implemented")
        if self.timestep_spacing not in (None, *SPACINGS):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}: expected one of {SPACINGS}")
        # the values the maths needs: T ≥ 1 steps, offsets inside them, and 0 < β_t < 1 rising (each step adds
        # some noise, never all of it; outside, ᾱ_t turns zero, negative or NaN and the sampler divides by it)
        T = self.num_train_timesteps
        if T < 1:
            raise ValueError(f"key 'num_train_timesteps' must be at least 1, got {T}")
        if not 0 <= self.steps_offset < T:
            raise ValueError(f"key 'steps_offset' must be from 0 to num_train_timesteps - 1 = {T - 1}, "
                             f"got {self.steps_offset}")
        for key in ("beta_start", "beta_end"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"key {key!r} must be between 0 and 1 (exclusive), got {getattr(self, key)}")
        if self.beta_end <= self.beta_start:
            raise ValueError(f"key 'beta_end' must be above beta_start ({self.beta_start}), got {self.beta_end}")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Build from a scheduler_config.json dict; refuses settings that would change the maths."""
        refuse = {  # key: (value that is supported, why anything else is refused)
            "prediction_type": ("epsilon", "only epsilon-prediction models are supported"),
            "trained_betas": (None, "only betas computed from beta_start/beta_end are supported"),
            "clip_sample": (False, "clipping the predicted x0 is not implemented"),
            "thresholding": (False, "dynamic thresholding is not implemented"),
            "rescale_betas_zero_snr": (False, "zero-terminal-SNR rescaling is not implemented"),
        }
        for key, (ok, why) in refuse.items():
            if key in d and d[key] != ok:
                raise ValueError(f"unsupported scheduler config {key}={d[key]!r}: {why}")
        return cls(**config_values(cls, d, "scheduler config"))  # unknown keys are ignored


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t = ∏_{s=0}^{t} (1 − β_s) for t = 0..T−1, float32 like the reference.

    'scaled_linear' (SD): √β linear from √β_start to √β_end; 'linear' (DDPM): β itself linear."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(cfg: SchedulerConfig, n: int, spacing: str, rounded: bool = True) -> np.ndarray:
    """n descending timesteps in [0, T), float64, as diffusers spaces them (T = num_train_timesteps):

      leading:  t_i = i·⌊T/n⌋ + steps_offset      (SD 1.4, 50 steps: 981, 961, …, 1)
      linspace: t_i = i·(T−1)/(n−1), rounded       (50 steps: 999, 979, 958, …, 0); Euler keeps the floats
      trailing: t_i = round(T − i·T/n) − 1         (50 steps: 999, 979, …, 19)
    """
    T = cfg.num_train_timesteps
    if spacing == "leading":
        ts = np.arange(n)[::-1] * (T // n) + cfg.steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        ts = ts.round() if rounded else ts
    else:  # [:n]: for some n (61, 103, …) float rounding gives diffusers a stray (n+1)-th step at t = −1
        ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
    return ts.astype(np.float64)


def karras_sigmas(a: torch.Tensor, timesteps: np.ndarray) -> torch.Tensor:
    """σ(t) = √((1−ᾱ_t)/ᾱ_t), linearly interpolated at (possibly fractional) t, then a final σ = 0; float32.

    Outside [0, T−1] numpy's interp would clamp; `Sampler.check_range` keeps the timesteps inside."""
    table = (((1 - a) / a) ** 0.5).numpy()  # float32, as the reference
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
