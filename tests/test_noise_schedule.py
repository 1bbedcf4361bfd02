"""Tests for sld_minimal.noise_schedule: SD 1.4's defaults, and ᾱ_t of both β schedules in closed form."""
import json
import math
import re
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("values, message", [
    (dict(num_train_timesteps=0), "key 'num_train_timesteps' must be at least 1, got 0"),
    (dict(steps_offset=1000), "key 'steps_offset' must be from 0 to num_train_timesteps - 1 = 999, got 1000"),
    (dict(beta_start=0.0), "key 'beta_start' must be between 0 and 1 (exclusive), got 0.0"),
    (dict(beta_end=1.0), "key 'beta_end' must be between 0 and 1 (exclusive), got 1.0"),
    (dict(beta_start=0.012, beta_end=0.012), "key 'beta_end' must be above beta_start (0.012), got 0.012"),
])
def test_values_outside_the_maths_are_refused(values, message):
    """0 < β_start < β_end < 1 (else ᾱ_t is zero, negative or NaN), T ≥ 1, 0 ≤ steps_offset < T: refused when the
    config is made, from a file (`from_dict`) or in code."""
    with pytest.raises(ValueError) as err:
        SchedulerConfig.from_dict({**json.loads((DATA / "sd14_scheduler_config.json").read_text()), **values})
    assert str(err.value) == message
    with pytest.raises(ValueError, match=re.escape(message)):
        SchedulerConfig(**values)
    SchedulerConfig(num_train_timesteps=1, steps_offset=0, beta_start=0.5, beta_end=0.999)  # the edges inside


def test_nan_beta_in_code_is_refused():  # a file's NaN is refused as "not a finite number" when it is read
    with pytest.raises(ValueError, match=r"^key 'beta_end' must be between 0 and 1 \(exclusive\), got nan$"):
        SchedulerConfig(beta_end=float("nan"))
