"""`sld-minimal …`: generate writes PNGs with their settings; every bad input is one line and a non-zero exit."""
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.common import download_files

FAST = ["--height", "32", "--width", "32", "--steps", "3", "--seed", "1", "--quiet"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_png_with_parameters(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "king.png"
    code, _, err = run(capsys, "generate", "the king", "--weights", str(tiny_ckpt), "--out", str(out),
                       "--safety", "STRONG", "--negative-prompt", "a dog", *FAST)
    assert code == 0, err
    img = Image.open(out)
    assert img.size == (32, 32)
    text = img.text["parameters"]
    for needle in ("the king", "Negative prompt: a dog", "Seed: 1", "Steps: 3", "Safety: strong",
                   "Safety concept: an image showing", f"Model: {tiny_ckpt}"):
        assert needle in text


def test_generate_several_images_and_sega_flags(tiny_ckpt, tmp_path, capsys):
    code, out, err = run(capsys, "generate", "a photo of the cat", "--weights", str(tiny_ckpt),
                         "--out", str(tmp_path / "cat.png"), "--num-images", "2", "--edit", "the king",
                         "--edit-away", "a dog", "--edit-warmup", "1", "--safety-concept", "a dog",
                         "--height", "32", "--width", "32", "--steps", "3", "--seed", "1")
    assert code == 0, err
    assert "seed 1" in out and sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png"]
    text = Image.open(tmp_path / "cat-1.png").text["parameters"]
    assert "Edit: +the king" in text and "Edit: -a dog" in text and "Safety concept: a dog" in text


def test_existing_output_is_never_overwritten(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"a picture the user made")
    code, _, err = run(capsys, "generate", "x", "--weights", str(tiny_ckpt), "--out", str(out), *FAST)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"a picture the user made"
    code, _, err = run(capsys, "generate", "x", "--weights", str(tiny_ckpt), "--out", str(out), "--overwrite", *FAST)
    assert code == 0 and out.read_bytes() != b"a picture the user made"


@pytest.mark.parametrize("args, code, pattern", [
    (["--weights", "{missing}"], 1, "weights folder .* does not exist"),
    (["--weights", "{corrupt}"], 1, "not a readable safetensors file"),
    (["--safety", "extreme"], 2, "invalid choice: 'extreme'"),
    (["--safety", "off", "--safety-concept", "x"], 2, "--safety-concept needs a safety preset"),
    (["--height", "31"], 2, "--height 31: must be a multiple of 2 \\(this model's VAE factor\\)"),
    (["--height", "0"], 2, "argument --height: must be >= 8"),
    (["--steps", "0"], 2, "argument --steps: must be from 1 to 999, got 0"),
    (["--steps", "many"], 2, "argument --steps: expected an integer, got 'many'"),
    (["--guidance", "-2"], 2, "argument --guidance: must be >= 0"),
    (["--guidance", "inf"], 2, "argument --guidance: must be a finite number"),
    (["--scheduler", "ddim", "--eta", "nan"], 2, "argument --eta: must be a finite number"),
    (["--seed", str(10**23)], 2, "argument --seed: must be from 0 to 18446744073709551615"),
    (["--num-images", "0"], 2, "argument --num-images: must be >= 1"),
    (["--num-images", "65"], 2, "65 images in one call is more than 64 .*GiB.*--no-limits"),
    (["--height", "4096", "--width", "4096"], 2, "4096x4096 is more than 2048x2048 pixels .*GiB.*--no-limits"),
    (["--num-images", "2", "--image-index", "2"], 2, "--image-index 2: a batch of --num-images 2 has images 0 to 1"),
    (["--scheduler", "heun"], 2, "invalid choice: 'heun'"),
    (["--eta", "0.3"], 2, "--eta applies to --scheduler ddim only"),
    (["--device", "cuda"], 2, "--device cuda: no such device"),
])
def test_bad_input_is_one_line(tiny_ckpt, tmp_path, capsys, args, code, pattern):
    import re

    corrupt = shutil.copytree(tiny_ckpt, tmp_path / "corrupt")
    (corrupt / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    args = [a.format(missing=tmp_path / "nothing", corrupt=corrupt) for a in args]
    if "--weights" not in args:
        args += ["--weights", str(tiny_ckpt)]
    got, out, err = run(capsys, "generate", "x", "--out", str(tmp_path / "o.png"), "--quiet", *args)
    assert got == code
    assert err.count("\n") == 1 and err.startswith("sld-minimal: error: ") and re.search(pattern, err), err
    assert not (tmp_path / "o.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        cli.main(["generate", "x", "--weights", str(tmp_path / "nothing"), "--debug"])


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "sld_minimal", "generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--safety" in res.stdout and "--negative-prompt" in res.stdout


def test_download_takes_only_what_sd_needs(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: seen.update(repo=repo, **kw))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, out, err = run(capsys, "download", "--to", str(tmp_path / "sd"), "--fp16")
    assert code == 0 and "CreativeML OpenRAIL-M" in err
    assert seen["repo"] == "CompVis/stable-diffusion-v1-4" and seen["token"] == "hf_test"
    pats = seen["allow_patterns"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in pats and "text_encoder/model.fp16.safetensors" in pats
    assert not any("safety_checker" in p or p.endswith((".bin", ".ckpt")) or "ema" in p for p in pats)
    assert download_files(False)[-1] == "vae/diffusion_pytorch_model.safetensors"


def test_download_offline_is_one_line(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("Cannot reach the hub:\nconnection refused")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _, err = run(capsys, "download", "--to", str(tmp_path / "sd"))
    info, error = err.splitlines()  # the licence notice, then the error: one line
    assert code == 1 and "CreativeML" in info and error.startswith("sld-minimal: error: could not download")
    assert "check the network connection" in error and "resumes" in error


def test_generate_downloads_the_default_weights_when_missing(monkeypatch, tiny_ckpt, tmp_path, capsys):
    """No weights/stable-diffusion-v1-4: generate downloads SD 1.4 there first and says so."""
    monkeypatch.chdir(tmp_path)
    fetched = []

    def fake_download(to, fp16=False, quiet=False):
        fetched.append(to)
        shutil.copytree(tiny_ckpt, to)
        return to
    monkeypatch.setattr(cli, "download", fake_download)
    code, _, err = run(capsys, "generate", "x", *FAST[:-1])  # not --quiet: that prints nothing but errors
    assert code == 0 and fetched == [cli.DEFAULT_WEIGHTS] and "downloading Stable Diffusion 1.4" in err
    assert (tmp_path / "image.png").exists()


def test_tiny_command(tmp_path, capsys):
    code, out, _ = run(capsys, "tiny", str(tmp_path / "t"))
    assert code == 0 and (tmp_path / "t/unet/diffusion_pytorch_model.safetensors").exists()


def test_cli_refuses_edit_with_a_sega_preset(tiny_ckpt, tmp_path, capsys):
    code = cli.main(["generate", "a cat", "--weights", str(tiny_ckpt), "--safety", "sega-strong", "--edit", "a hat",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1 and "cannot be combined with --safety sega-strong" in err[0]
    assert not (tmp_path / "x.png").exists()
