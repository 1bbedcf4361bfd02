"""Strict weight reading (weights.py): modules built on `meta` without their init (so without importing
torch._dynamo), and damaged tensors refused at load, naming the file and the key."""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sld_minimal import clip
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.weights import WeightsError, no_init_on_meta


def test_loading_builds_embeddings_without_their_meta_init():
    """The text encoder is built on meta without nn.Embedding's init (which would import torch._dynamo, seconds),
    and nn.Embedding is itself again afterwards."""
    reset = nn.Embedding.reset_parameters
    with torch.device("meta"), no_init_on_meta():
        text = clip.CLIPTextModel(clip.CLIPTextConfig())
    assert text.text_model.embeddings.token_embedding.weight.is_meta
    assert nn.Embedding.reset_parameters is reset
    torch.manual_seed(0)
    with no_init_on_meta():  # on a real device, the usual init
        e = nn.Embedding(3, 2)
    torch.manual_seed(0)
    assert torch.equal(e.weight, nn.Embedding(3, 2).weight)


def test_loading_does_not_import_dynamo(tiny_ckpt):
    code = ("import sys; from sld_minimal.loading import load_model; load_model(sys.argv[1]); "
            "assert 'torch._dynamo' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("value, pattern", [
    (float("nan"), "contains NaN or infinite values"),
    (float("inf"), "contains NaN or infinite values"),
    ("int8", "holds I8 integers"),
])
def test_damaged_weights_refused_at_load(tiny_ckpt, tmp_path, value, pattern):
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    path = model / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "down_blocks.0.resnets.0.conv1.weight"
    state[key] = state[key].to(torch.int8) if value == "int8" else state[key].index_fill(0, torch.tensor([0]), value)
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=f"{path}: key '{key}' {pattern}"):
        StableDiffusion.from_pretrained(model)
