"""Shared fixtures: small random checkpoints written in the published SD 1.4 layout by `sld_minimal.tiny`."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from sld_minimal import tiny

DATA = Path(__file__).parent / "data"  # copies of ../shared/sd14 (manifest and published configs)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "sd14"

torch.set_num_threads(max(1, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*accelerate.*")


def rel_err(ours, ref) -> float:
    """The parity measure used throughout: max|ours − ref| / max|ref|."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("small"), "small")


@pytest.fixture(scope="session")
def manifest():
    return json.loads((DATA / "sd14_manifest.json").read_text())
