"""Strict weight reading (weights.py): modules built on `meta` without their init (so without importing
torch._dynamo), damaged tensors refused at load, naming the file and the key, and configs checked by value."""
import dataclasses
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sld_minimal import clip, weights
from sld_minimal.loading import load_model
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.single_file import convert
from sld_minimal.unet import UNet2DConditionModel, UNetConfig
from sld_minimal.vae import VAEConfig
from sld_minimal.weights import WeightsError, no_init_on_meta


def test_loading_builds_modules_without_their_meta_init(monkeypatch):
    """The models are built on meta without the init of embeddings (which would import torch._dynamo, seconds),
    linear layers and convolutions (a tenth of a second for SD 1.4's UNet); each class is itself again afterwards,
    and on a real device the usual init runs."""
    resets = {cls: cls.reset_parameters for cls in (nn.Embedding, nn.Linear, nn.Conv2d)}
    called = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda *a, **k: called.append("kaiming"))
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: called.append("normal"))
    with torch.device("meta"), no_init_on_meta():
        text = clip.CLIPTextModel(clip.CLIPTextConfig())
        unet = UNet2DConditionModel(dataclasses.replace(UNetConfig(), block_out_channels=(32, 32, 32, 32),
                                                        attention_head_dim=2, cross_attention_dim=32))
    assert called == [] and text.text_model.embeddings.token_embedding.weight.is_meta and unet.conv_in.weight.is_meta
    assert {cls: cls.reset_parameters for cls in resets} == resets
    monkeypatch.undo()
    for make in (lambda: nn.Embedding(3, 2), lambda: nn.Linear(3, 2), lambda: nn.Conv2d(3, 2, 3)):
        torch.manual_seed(0)
        with no_init_on_meta():  # on a real device, the usual init
            a = make()
        torch.manual_seed(0)
        assert all(torch.equal(p, q) and p.abs().sum() > 0 for p, q in zip(a.parameters(), make().parameters()))


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


def _tensors(models):
    return [(f"{type(m).__name__}.{k}", t) for m in models for k, t in m.state_dict().items()]


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_loaded_weights_lie_in_aligned_memory_of_their_own(tiny_ckpt, tmp_path, layout):
    """Every CPU weight starts at a multiple of 64 bytes, whatever its offset in the file (the file's offsets are
    not aligned: oneDNN would pick other kernels for it), and no two weights share memory."""
    if layout == "folder":
        model = load_model(tiny_ckpt)
    else:  # with the tiny model's own tokenizer (a single file carries none)
        model = load_model(convert(tiny_ckpt, tmp_path / "tiny.safetensors"), tokenizer=tiny_ckpt)
    tensors = _tensors([model.text_encoder, model.unet, model.vae])
    assert [name for name, t in tensors if t.data_ptr() % 64] == []
    assert len({t.untyped_storage().data_ptr() for _, t in tensors}) == len(tensors)


@pytest.mark.parametrize("chunk, threads", [(1000, 1), (1000, 3), (7, 2)])
def test_weights_read_in_pieces_by_several_threads_are_the_files(tiny_ckpt, monkeypatch, chunk, threads):
    """The file is read in `CHUNK`-byte pieces by torch's number of threads; pieces that split a tensor, even
    mid-element (7 bytes), join up to the file's bytes exactly."""
    monkeypatch.setattr(weights, "CHUNK", chunk)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        unet = load_model(tiny_ckpt).unet
    finally:
        torch.set_num_threads(before)
    file = load_file(str(tiny_ckpt / "unet/diffusion_pytorch_model.safetensors"))
    state = unet.state_dict()
    assert state.keys() == file.keys()
    assert all(torch.equal(state[k], file[k]) and state[k].dtype == file[k].dtype for k in file)


def test_a_file_that_ends_while_its_tensors_are_read_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    """A file cut short after its header was checked (a download still being written, say): a one-line error."""
    path = tmp_path / "unet.safetensors"
    shutil.copy(tiny_ckpt / "unet/diffusion_pytorch_model.safetensors", path)
    names = {k: k for k in load_file(str(path))}
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    monkeypatch.setattr(weights, "CHUNK", 1000)
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(path))} ends before its tensors do; it is truncated"):
        weights.read_tensors(path, names, "cpu")


def test_tensors_are_read_in_batches_of_consecutive_tensors(monkeypatch):
    """Batches of about `BATCH` bytes, in the given (file) order, each tensor whole, none empty: a cast needs
    memory for one batch of the file's bytes at a time, not the whole file."""
    monkeypatch.setattr(weights, "BATCH", 10)
    sizes = {"a": 4, "b": 4, "c": 4, "d": 30, "e": 1, "f": 9}
    assert weights._batches(list(sizes), sizes.get) == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert weights._batches([], sizes.get) == []


def test_a_cast_keeps_the_files_values(tiny_ckpt, monkeypatch):
    """Read in batches of one tensor each and cast to bf16 batch by batch: the file's tensors, cast."""
    monkeypatch.setattr(weights, "BATCH", 1)
    path = tiny_ckpt / "unet/diffusion_pytorch_model.safetensors"
    file = load_file(str(path))
    got = weights.read_tensors(path, {k: k for k in file}, "cpu", torch.bfloat16)
    assert all(torch.equal(got[k], file[k].to(torch.bfloat16)) for k in file)
