"""Tests for sld_minimal.noise_schedule: SD 1.4's defaults, and ᾱ_t of both β schedules in closed form."""
import json
import math
from pathlib import Path

import torch

from sld_minimal.noise_schedule import SchedulerConfig, alphas_cumprod

DATA = Path(__file__).parent / "data"  # copies of SD 1.4's published files


def test_defaults_are_sd14():
    sd14 = json.loads((DATA / "sd14_scheduler_config.json").read_text())  # SD 1.4's scheduler_config.json
    assert SchedulerConfig() == SchedulerConfig.from_dict(sd14)


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
