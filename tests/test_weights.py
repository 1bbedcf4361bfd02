"""Strict weight reading (weights.py): modules built on `meta` without their init (so without importing
torch._dynamo), damaged tensors refused at load, naming the file and the key, and configs checked by value."""
import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sld_minimal import clip
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.unet import UNet2DConditionModel, UNetConfig
from sld_minimal.vae import VAEConfig
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


def test_configs_made_in_code_are_checked_by_value_too():
    """The checks live in the config classes (what `read_config` builds), so `dataclasses.replace` gets them too;
    heads must divide only the widths that have attention."""
    with pytest.raises(ValueError, match=r"^key 'scaling_factor' must be a positive finite number, got inf$"):
        VAEConfig(scaling_factor=float("inf"))
    with pytest.raises(ValueError, match=r"^key 'norm_eps' must be a positive finite number, got 0.0$"):
        dataclasses.replace(UNetConfig(), norm_eps=0.0)
    with pytest.raises(ValueError, match=r"^key 'layer_norm_eps' must be a positive finite number, got -1e-05$"):
        clip.CLIPTextConfig(layer_norm_eps=-1e-5)
    cfg = UNetConfig(block_out_channels=(24, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=16,
                     cross_attention_dim=8, norm_num_groups=8)  # 24 channels, no attention there: 16 heads fine
    torch.manual_seed(0)
    out = UNet2DConditionModel(cfg)(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 8))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"^key 'attention_head_dim' \(16\) must divide each of the channel counts "
                                         r"\[24, 64\]$"):
        dataclasses.replace(cfg, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
