"""This suite's fixtures: `sld_minimal.testing`'s plugin (tiny_ckpt, small_ckpt) plus the copies of SD 1.4's files."""
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest_plugins = ["sld_minimal.testing"]

DATA = Path(__file__).parent / "data"  # copies of ../shared/sd14 (manifest and published configs)

torch.set_num_threads(max(1, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*accelerate.*")


@pytest.fixture(scope="session")
def manifest():
    return json.loads((DATA / "sd14_manifest.json").read_text())
