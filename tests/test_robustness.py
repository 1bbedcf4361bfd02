"""Nothing half-written, nothing misleading: atomic files, every check before the work, one line per bad input,
and PNGs that say which image of a batch they are (so any one of them can be made again)."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sld_minimal import files, weights
from sld_minimal.app import cli
from sld_minimal.testing import tiny
from sld_minimal.outputs import SETTINGS_CHUNK, settings_from_png
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.weights import WeightsError, read_config
from sld_minimal.clip import CLIPTextConfig
from sld_minimal.loading import PACKAGED, SAFETY_CONCEPT_KEY, VOCABULARY_KEY, read_index
from sld_minimal.tokenizer import load_tokenizer
from sld_minimal.unet import UNetConfig

FAST = ["--steps", "2", "--seed", "1", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("sld-minimal: error: "), err
    return err


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the weights are loaded: usage errors must come before that."""
    def refuse(*a, **kw):
        raise AssertionError("the weights were loaded before the request was validated")
    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(refuse))


# ----------------------------------------------------------------------------- atomic files

def test_full_disk_while_saving_is_one_line_and_leaves_no_file(tiny_ckpt, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", out, "--num-images", "2", *FAST)
    assert code == 1 and f"cannot write {tmp_path / 'o-0.png'}: No space left on device" in one_line(err)
    assert listing(tmp_path) == []


def test_real_tiny_tmpfs(tiny_ckpt, tmp_path, capsys):
    """A real full disk, where this machine lets the test mount a 16 KiB tmpfs (root); the injected ENOSPC above
    covers the same path everywhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC test covers this path")
    try:
        code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", mnt / "o.png",
                           "--num-images", "40", "--height", "64", "--width", "64", *FAST)
        assert code == 1 and "No space left on device" in one_line(err) and "cannot write" in err
        written = [p for p in mnt.iterdir()]
        assert written and all(p.name.startswith("o-") and not p.name.startswith(".") for p in written)
        for p in written:  # whatever was written is whole
            Image.open(p).load()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_tiny_refuses_a_non_empty_folder_and_is_written_whole(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "mine.txt").write_text("the user's")
    code, _, err = run(capsys, "tiny", model)
    assert code == 1 and "is not empty (pass --overwrite" in one_line(err)
    assert listing(model) == ["mine.txt"]

    def broken(*a, **kw):  # the writer dies half-way: the tokenizer is written, the weights are not
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tiny, "write_folder", broken)
    code, _, err = run(capsys, "tiny", tmp_path / "new")
    assert code == 1 and "No space left on device" in one_line(err)
    assert listing(tmp_path) == ["model"]  # no half-written folder, no temporary sibling
    monkeypatch.undo()
    code, _, err = run(capsys, "tiny", model, "--overwrite")  # not a folder tiny wrote: never replaced
    assert code == 2 and "did not write" in one_line(err) and listing(model) == ["mine.txt"]
    (model / "mine.txt").unlink()
    assert run(capsys, "tiny", model)[0] == 0  # an empty folder is filled
    code, _, err = run(capsys, "tiny", model, "--overwrite")  # and its own folder replaced
    assert code == 0 and "unet" in listing(model)


# ----------------------------------------------------------------------------- checks before the work

@pytest.mark.parametrize("out, pattern", [
    ("x.txt", "--out x.txt: images are written as PNG"),
    ("x.jpg", "--out x.jpg: images are written as PNG"),
])
def test_output_path_checked_before_loading(tiny_ckpt, tmp_path, capsys, no_loading, out, pattern):
    code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", tmp_path / out, *FAST)
    assert code == 2 and pattern in one_line(err).replace(str(tmp_path) + "/", "")


def test_read_only_output_folder_checked_before_loading(tiny_ckpt, tmp_path, capsys, no_loading, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    if not mounted:  # no root: a real read-only folder by its mode bits, else the failing write injected
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            import tempfile

            def refuse(*a, **kw):
                raise PermissionError(errno.EROFS, "Read-only file system")
            monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", ro / "sub" / "o.png", *FAST)
        assert code == 2 and f"--out: cannot write in the folder {ro}" in one_line(err)
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
        ro.chmod(0o755)


def test_no_suffix_means_png(tiny_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", tmp_path / "outimg", *FAST)
    assert code == 0, err
    assert listing(tmp_path) == ["outimg.png"] and Image.open(tmp_path / "outimg.png").format == "PNG"


@pytest.mark.parametrize("args", [["--steps", "0"], ["--height", "31"], ["--guidance", "nan"],
                                  ["--num-images", "100"], ["--seed", "-1"]])
def test_usage_errors_come_before_the_weights(tiny_ckpt, tmp_path, capsys, no_loading, args):
    code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", tmp_path / "o.png", *args)
    assert code == 2 and one_line(err)


def test_default_size_comes_from_the_model(tiny_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--weights", tiny_ckpt, "--out", tmp_path / "o.png", *FAST)
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (32, 32)  # tiny: sample_size 16 × its VAE's factor 2
    sd14 = read_config(UNetConfig, ROOT / "tests/data/sd14_unet_config.json")
    assert sd14.sample_size == 64  # × SD 1.4's VAE factor 8 = 512
    assert StableDiffusion.from_pretrained(tiny_ckpt).default_size == 32


def _edit_json(path: Path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("file, changes, pattern", [
    ("unet/config.json", {"layers_per_block": "2"}, "unet/config.json: key 'layers_per_block' must be an integer, got str '2'"),
    ("vae/config.json", {"block_out_channels": None}, "vae/config.json: key 'block_out_channels' must be a non-empty list, got None"),
    ("text_encoder/config.json", {"hidden_size": 32.5}, "text_encoder/config.json: key 'hidden_size' must be an integer"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": "1000"},
     "scheduler/scheduler_config.json: key 'num_train_timesteps' must be an integer"),
    ("scheduler/scheduler_config.json", {"beta_start": None}, "key 'beta_start' must be a finite number, got None"),
])
def test_config_with_wrong_types_names_file_and_key(tiny_ckpt, tmp_path, capsys, no_loading, file, changes, pattern):
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    _edit_json(model / file, **changes)
    code, _, err = run(capsys, "generate", "x", "--weights", model, "--out", tmp_path / "o.png", *FAST)
    assert code == 1 and pattern in one_line(err)


def test_bad_vocab_names_the_tokenizer_folder(tiny_ckpt, tmp_path, capsys):
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    (model / "tokenizer/vocab.json").write_text('{"a": "not an id"')
    code, _, err = run(capsys, "generate", "x", "--weights", model, "--out", tmp_path / "o.png", *FAST)
    assert code == 1 and f"{model / 'tokenizer'}: vocab.json / merges.txt cannot be read" in one_line(err)
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------- model files checked by value

@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any tensor is read: every model file is checked by value before that."""
    def refuse(*a, **kw):
        raise AssertionError("a weight was read before the model files were checked")
    monkeypatch.setattr(weights, "read_tensors", refuse)


TOO_MANY = "the tokenizer has 531 tokens but the text encoder of {model} embeds only 100; pass this model's tokenizer " \
           "(tokenizer= / --tokenizer DIR)"


@pytest.mark.parametrize("file, change, message", [
    ("vae/config.json", {"scaling_factor": 0}, "{path}: key 'scaling_factor' must be a positive finite number, got 0.0"),
    ("vae/config.json", {"norm_num_groups": 24},
     "{path}: key 'norm_num_groups' (24) must divide each of the channel counts [32, 64]"),
    ("vae/config.json", {"latent_channels": 0}, "{path}: key 'latent_channels' must be a positive integer, got 0"),
    ("unet/config.json", {"sample_size": 0}, "{path}: key 'sample_size' must be a positive integer, got 0"),
    ("unet/config.json", {"block_out_channels": [32, 0]},
     "{path}: key 'block_out_channels' must be a list of positive integers, got [32, 0]"),
    ("unet/config.json", {"layers_per_block": 0}, "{path}: key 'layers_per_block' must be a positive integer, got 0"),
    ("unet/config.json", {"norm_num_groups": 5},
     "{path}: key 'norm_num_groups' (5) must divide each of the channel counts [32, 64]"),
    ("unet/config.json", {"attention_head_dim": 3},
     "{path}: key 'attention_head_dim' (3) must divide each of the channel counts [32, 64]"),
    ("text_encoder/config.json", {"num_attention_heads": 0},
     "{path}: key 'num_attention_heads' must be a positive integer, got 0"),
    ("text_encoder/config.json", {"max_position_embeddings": 16},
     "{path}: key 'max_position_embeddings' must be at least 77 (a prompt is 77 tokens), got 16"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": -5},
     "{path}: key 'num_train_timesteps' must be at least 1, got -5"),
    ("scheduler/scheduler_config.json", {"beta_start": -0.1},
     "{path}: key 'beta_start' must be between 0 and 1 (exclusive), got -0.1"),
    ("scheduler/scheduler_config.json", {"beta_end": 5}, "{path}: key 'beta_end' must be between 0 and 1 (exclusive), got 5.0"),
    ("scheduler/scheduler_config.json", {"beta_start": 0.02, "beta_end": 0.01},
     "{path}: key 'beta_end' must be above beta_start (0.02), got 0.01"),
    ("scheduler/scheduler_config.json", {"steps_offset": 1000},
     "{path}: key 'steps_offset' must be from 0 to num_train_timesteps - 1 = 999, got 1000"),
    ("scheduler/scheduler_config.json", {"steps_offset": -1},
     "{path}: key 'steps_offset' must be from 0 to num_train_timesteps - 1 = 999, got -1"),
    ("model_index.json", {"_class_name": "StableDiffusionXLPipeline"},
     "{path}: key '_class_name' is 'StableDiffusionXLPipeline', not an SD 1.x pipeline (StableDiffusionPipeline or "
     "StableDiffusionPipelineSafe); only SD 1.x models are supported"),
    ("model_index.json", {"_class_name": "TextToVideoSDPipeline"},
     "{path}: key '_class_name' is 'TextToVideoSDPipeline', not an SD 1.x pipeline (StableDiffusionPipeline or "
     "StableDiffusionPipelineSafe); only SD 1.x models are supported"),
    ("model_index.json", "{oops", "{path} is not valid JSON (Expecting property name enclosed in double quotes: "
                                  "line 1 column 2 (char 1)); download it again"),
    ("model_index.json", "[]", "{path}: expected a JSON object, got list"),
    ("tokenizer/merges.txt", "", "{path} holds no merges, so every word would be spelt byte by byte; download the "
                                 "model again or pass another --tokenizer"),
    ("tokenizer/merges.txt", "#version: 0.2\n", "{path} holds no merges, so every word would be spelt byte by byte; "
                                                 "download the model again or pass another --tokenizer"),
    ("tokenizer/vocab.json", "{}", "{path} must be a non-empty JSON object of token → id (an integer >= 0); download "
                                   "the model again or pass another --tokenizer"),
    ("text_encoder/config.json", {"vocab_size": 100}, TOO_MANY),
])
def test_bad_model_values_are_one_line_before_any_weight(tiny_ckpt, tmp_path, capsys, no_weights, file, change,
                                                         message):
    """A value the model cannot work with (an all-black image, another tokenization, an error deep in torch) is
    refused by from_pretrained and the command line alike, naming the file and the key, before a weight is read."""
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    if isinstance(change, dict):
        _edit_json(model / file, **change)
    else:
        (model / file).write_text(change)
    message = message.format(path=model / file, model=model)
    with pytest.raises(WeightsError) as err:
        StableDiffusion.from_pretrained(model)
    assert str(err.value) == message
    code, _, err = run(capsys, "generate", "x", "--weights", model, "--out", tmp_path / "o.png", *FAST)
    assert code == 1 and one_line(err) == f"sld-minimal: error: {message}\n"
    assert not (tmp_path / "o.png").exists()


def test_sd1_indexes_and_folders_without_one_load(tiny_ckpt, tmp_path):
    """The safe pipeline's index, this package's own fields (the toy model's) and a folder without model_index.json
    all load; the toy's 619-token vocabulary fits its 619-row embedding."""
    model = shutil.copytree(tiny_ckpt, tmp_path / "m")
    _edit_json(model / "model_index.json", _class_name="StableDiffusionPipelineSafe")
    assert StableDiffusion.from_pretrained(model).safety_concept is None
    (model / "model_index.json").unlink()
    assert StableDiffusion.from_pretrained(model).vocabulary is None
    toy = read_index(PACKAGED["toy"])
    assert toy["_class_name"] == "StableDiffusionPipeline" and {SAFETY_CONCEPT_KEY, VOCABULARY_KEY} <= set(toy)
    assert len(load_tokenizer(PACKAGED["toy"])) == read_config(CLIPTextConfig, PACKAGED["toy"] / "text_encoder"
                                                               / "config.json").vocab_size == 619


def test_python_api_says_which_type_it_wanted(tiny_ckpt):
    pipe = StableDiffusion.from_pretrained(tiny_ckpt, dtype="fp32")
    fast = dict(num_inference_steps=1, progress=False)
    out = pipe("x", height=np.int64(32), width=np.int32(32), guidance_scale=np.float32(7.5), seed=np.uint64(3), **fast)
    assert out.images.shape == (1, 32, 32, 3) and out.seed == 3
    for kwargs, error, pattern in [
        (dict(prompt=None), TypeError, "prompt must be a string or a non-empty list of strings, got None"),
        (dict(guidance_scale="7"), TypeError, "guidance_scale must be a number, got str '7'"),
        (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number"),
        (dict(height=32.0), TypeError, "height must be an integer, got float"),
        (dict(seed=10**23), ValueError, "seed must be from 0 to 2\\*\\*64 - 1"),
        (dict(num_images=2, image_index=2), ValueError, "image_index must be from 0 to 1"),
    ]:
        with pytest.raises(error, match=pattern):
            pipe(**{"prompt": "x", **fast, **kwargs})
    with pytest.raises(ValueError, match="fp16 is not accelerated on the CPU"):
        StableDiffusion.from_pretrained(tiny_ckpt, dtype="fp16")
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        StableDiffusion.from_pretrained(tiny_ckpt, dtype="half")


# ----------------------------------------------------------------------------- provenance

@pytest.mark.bitexact
def test_image_k_regenerated_from_its_own_chunk(tiny_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a cat", "--weights", tiny_ckpt, "--out", tmp_path / "cat.png",
                       "--num-images", "3", "--safety", "max", "--steps", "3", "--seed", "7", "--quiet")
    assert code == 0, err
    for k in range(3):
        png = Image.open(tmp_path / f"cat-{k}.png")
        assert f"Seed: 7, Image: {k} of 3," in png.text["parameters"]
        assert json.loads(png.text[SETTINGS_CHUNK])["image_index"] == k
    s = settings_from_png(tmp_path / "cat-1.png")  # everything needed to make image 1 again, from the file alone
    code, _, err = run(capsys, "generate", s["prompt"], "--weights", s["model"], "--out", tmp_path / "again.png",
                       "--seed", s["seed"], "--num-images", s["num_images"], "--image-index", s["image_index"],
                       "--steps", s["steps"], "--guidance", s["guidance_scale"], "--scheduler", s["scheduler"],
                       "--height", s["height"], "--width", s["width"], "--safety", s["safety"][0]["preset"],
                       "--quiet")
    assert code == 0, err
    assert listing(tmp_path) == ["again.png", "cat-0.png", "cat-1.png", "cat-2.png"]
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "cat-1.png").read_bytes()


def test_prompt_newlines_cannot_forge_a_field(tiny_ckpt, tmp_path, capsys):
    prompt = "a cat\nSeed: 999, Steps: 1\\n"
    code, _, err = run(capsys, "generate", prompt, "--weights", tiny_ckpt, "--out", tmp_path / "o.png", *FAST)
    assert code == 0, err
    png = Image.open(tmp_path / "o.png")
    lines = png.text["parameters"].splitlines()
    assert lines[0] == "a cat\\nSeed: 999, Steps: 1\\\\n" and not any(line.startswith("Seed: 999") for line in lines)
    assert settings_from_png(tmp_path / "o.png")["prompt"] == prompt  # the JSON chunk keeps it as it was


def test_quiet_prints_nothing(tiny_ckpt, tmp_path):
    """Not even the warnings that a long safety concept (the tiny tokenizer's bytes overflow 77 tokens) raises."""
    res = subprocess.run([sys.executable, "-m", "sld_minimal", "generate", "x", "--weights", str(tiny_ckpt),
                          "--out", str(tmp_path / "o.png"), "--safety", "strong", *FAST],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    assert (tmp_path / "o.png").exists()
