"""This suite's fixtures: `sld_minimal.testing`'s plugin (tiny_ckpt, small_ckpt), the copies of SD 1.4's files, and
the I2P tests' prompt CSVs."""
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


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory):
    """An I2P-layout CSV (`testing.i2p.I2P_ROWS`: three valid rows, ids 0, 1 and 4, and two invalid ones)."""
    from sld_minimal.testing.i2p import write_i2p_csv

    return write_i2p_csv(tmp_path_factory.mktemp("csv") / "i2p.csv")


@pytest.fixture(scope="module")
def rows(prompts_csv):
    from sld_minimal.app.i2p.prompts import read_csv

    return read_csv(prompts_csv)


@pytest.fixture(scope="module")
def i2p_csv(tmp_path_factory):
    """Three I2P rows (with I2P's label columns)."""
    from sld_minimal.testing.i2p import write_labelled_csv

    return write_labelled_csv(tmp_path_factory.mktemp("csv") / "i2p.csv")
