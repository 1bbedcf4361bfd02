"""`sld-minimal …`: generate writes PNGs with their settings; every bad input is one line and a non-zero exit."""
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.common import download_files, shown_default

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


# ----------------------------------------------------------------------------- output paths: one rule each

def _no_model(monkeypatch):
    """Loading weights or downloading fails the test: the checks under test come before both."""
    from sld_minimal.pipeline import StableDiffusion

    def forbidden(*a, **k):
        pytest.fail("weights were loaded or downloaded before a cheap check")
    monkeypatch.setattr(cli, "download", forbidden)
    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(forbidden))


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "--out {tmp} is a folder; name a .png file in it, e.g. {tmp}/image.png"),
    ("{tmp}/new/", "--out {tmp}/new/ is a folder; name a .png file in it, e.g. {tmp}/new/image.png"),
    (".", "--out . is a folder; name a .png file in it, e.g. image.png"),
    ("", "--out '' is an empty file name; name a .png file, e.g. image.png"),
    ("{tmp}/.png", "--out '{tmp}/.png' is an empty file name; name a .png file, e.g. image.png"),
    ("{tmp}/x.webp", "--out {tmp}/x.webp: images are written as PNG (with their settings in text chunks); "
                     "use a .png name"),
])
def test_out_rules_are_one_line_each(tiny_ckpt, tmp_path, monkeypatch, capsys, out, message):
    """An existing folder (or a name ending in /) is refused, not written beside as folder.png; an empty name is
    refused in one line; another suffix than .png is refused. All before the model loads."""
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = out.format(tmp=tmp_path)
    code, _, err = run(capsys, "generate", "x", "--weights", str(tiny_ckpt), "--out", out, *FAST)
    assert (code, err) == (2, f"sld-minimal: error: {message.format(tmp=tmp_path)}\n")
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name)) == [tmp_path.name]
    assert list(tmp_path.iterdir()) == []


def test_output_save_follows_the_same_rules(tmp_path):
    """`Output.save`: .png added to a bare name; another suffix, a folder or an empty name is a one-line ValueError."""
    import numpy as np
    import torch

    from sld_minimal.outputs import Output

    out = Output(np.zeros((1, 8, 8, 3), np.float32), torch.zeros(1, 4, 1, 1), 0)
    assert out.save(tmp_path / "bare") == [tmp_path / "bare.png"] and (tmp_path / "bare.png").is_file()
    with pytest.raises(ValueError, match=r"^.*x\.webp: images are written as PNG \(with their settings in text "
                                         r"chunks\); use a \.png name$"):
        out.save(tmp_path / "x.webp")
    with pytest.raises(ValueError, match=rf"^{tmp_path} is a folder; name a \.png file in it, e\.g\. "):
        out.save(tmp_path)
    with pytest.raises(ValueError, match=r"^'' is an empty file name; name a \.png file, e\.g\. image\.png$"):
        out.save("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.png"]


# ----------------------------------------------------------------------------- every cheap check before the download

@pytest.mark.parametrize("args, message", [
    (["--num-images", "100"], "100 images in one call is more than 64 "),
    (["--height", "33"], "--height 33: must be a multiple of 8 (this model's VAE factor)"),
    (["--height", "4096", "--width", "4096"], "4096x4096 is more than 2048x2048 pixels "),
    (["--tokenizer", "nowhere"], "--tokenizer nowhere: no such folder"),
    (["--ema"], "--ema applies to a single .safetensors file; weights/stable-diffusion-v1-4 is SD 1.4's model folder"),
    (["--out", "x.jpg"], "--out x.jpg: images are written as PNG"),
    (["--seed", "1", "--seed", "2"], "argument --seed: given twice (1, then 2); only one value is taken"),
])
def test_the_default_weights_absent_every_check_comes_before_the_download(tmp_path, monkeypatch, capsys, args,
                                                                          message):
    """Without weights/stable-diffusion-v1-4, the size and limits are checked against SD 1.4's known configs first:
    no 4 GB download for a request that would be refused."""
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "generate", "x", *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"sld-minimal: error: {message}"), err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- flags given twice

def _parsers(parser=None, path=("sld-minimal",)):
    """(path, parser) of the command line's every parser, subcommands included."""
    import argparse

    parser = parser or cli.build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_parser_refuses_a_repeated_value_flag_and_repeatable_flags_say_so():
    import argparse

    from sld_minimal.app.common import Parser

    seen = 0
    for path, parser in _parsers():
        assert isinstance(parser, Parser), path
        for action in parser._actions:
            if isinstance(action, argparse._AppendAction):
                assert "(repeatable)" in (action.help or ""), (path, action.option_strings)
            elif isinstance(action, argparse._StoreAction) and action.option_strings:
                assert type(action).__name__ == "Once_StoreAction", (path, action.option_strings)
                seen += 1
    assert seen > 50  # generate, demo, i2p's and toy's value flags


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--seed", "1", "--seed", "2"],
     "argument --seed: given twice (1, then 2); only one value is taken (see `sld-minimal generate --help`)"),
    (["generate", "x", "--safety", "off", "--safety", "MAX"],
     "argument --safety: given twice ('off', then 'max'); only one value is taken (see `sld-minimal generate --help`)"),
    (["i2p", "generate", "--prompts", "p.csv", "--out", "run", "--batch", "2", "--batch=3"],
     "argument --batch: given twice (2, then 3); only one value is taken (see `sld-minimal i2p generate --help`)"),
    (["toy", "train", "--out", "m", "--seed", "1", "--seed", "1", "--minutes", "1", "--steps", "1"],
     "argument --seed: given twice (1, then 1); only one value is taken (see `sld-minimal toy train --help`)"),
    (["demo", "--port", "7000", "--port", "7001"],
     "argument --port: given twice (7000, then 7001); only one value is taken (see `sld-minimal demo --help`)"),
])
def test_a_value_flag_given_twice_is_a_usage_error(tmp_path, monkeypatch, capsys, argv, message):
    """Refused while the command line is read: before any file, model or download (a missing --weights here would
    be refused later, and --minutes with --steps too)."""
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("generate", "demo"):
        argv = argv + ["--weights", "nowhere"]
    code, _, err = run(capsys, *argv)
    assert (code, err) == (2, f"sld-minimal: error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_repeatable_flags_still_repeat(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "e.png"
    code, _, err = run(capsys, "generate", "a cat", "--weights", str(tiny_ckpt), "--out", str(out), "--edit", "a hat",
                       "--edit", "a dog", "--edit-away", "red", "--edit-away", "blue", "--quiet", "--quiet", *FAST)
    assert code == 0, err
    text = Image.open(out).text["parameters"]
    assert all(f"Edit: {e}" in text for e in ("+a hat", "+a dog", "-red", "-blue"))


# ----------------------------------------------------------------------------- text that is not UTF-8

@pytest.mark.parametrize("args, message", [
    (["caf\udce9"], "argument prompt: not valid UTF-8 (the byte 0xe9 at character 4); give the text in UTF-8"),
    (["x", "--negative-prompt", "\udcff"],
     "argument --negative-prompt: not valid UTF-8 (the byte 0xff at character 1); give the text in UTF-8"),
    (["x", "--edit", "a \ud800"], "argument --edit: not valid UTF-8 (U+D800 at character 3); give the text in UTF-8"),
])
def test_a_prompt_that_is_not_utf8_is_named(tiny_ckpt, tmp_path, monkeypatch, capsys, args, message):
    """Bytes of another encoding reach Python as lone surrogates (os.fsdecode): refused as the flag's value, naming
    the byte, before anything is loaded."""
    _no_model(monkeypatch)
    code, _, err = run(capsys, "generate", *args, "--weights", str(tiny_ckpt), "--out", str(tmp_path / "o.png"))
    assert (code, err) == (2, f"sld-minimal: error: {message} (see `sld-minimal generate --help`)\n")


def test_help_shows_every_default():
    """Every flag with a default (not None, not an off switch) names it in --help, as "(default: X)" or in words
    that start so; e.g. generate's --safety, --steps, --guidance and the weights path, i2p generate's --batch."""
    seen = 0
    for _, parser in _parsers():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and shown_default(action.default):
                assert f"default: {action.default}" in text, (parser.prog, action.option_strings)
                seen += 1
    assert seen >= 30


# ----------------------------------------------------------------------------- several concepts, notes

def test_two_safety_concepts_are_multi_concept_sld(tiny_ckpt, tmp_path, capsys):
    """`--safety-concept` twice: one config of the preset's values per concept, bit for bit `safety=[…]`."""
    import dataclasses

    import numpy as np

    from sld_minimal.guidance import PRESETS
    from sld_minimal.pipeline import StableDiffusion

    out = tmp_path / "two.png"
    code, _, err = run(capsys, "generate", "a cat", "--weights", str(tiny_ckpt), "--out", str(out), "--safety", "max",
                       "--safety-concept", "a dog", "--safety-concept", "the king", *FAST)
    assert code == 0, err
    configs = [dataclasses.replace(PRESETS["max"], concept=c) for c in ("a dog", "the king")]
    ref = StableDiffusion.from_pretrained(tiny_ckpt)("a cat", safety=configs, seed=1, height=32, width=32,
                                                      num_inference_steps=3, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), (ref.images[0] * 255).round().astype(np.uint8))
    text = Image.open(out).text["parameters"]
    assert "Safety concept: a dog" in text and "Safety concept: the king" in text
    for args, message in ((["--safety-concept", "a dog", "--safety-concept", "a dog"],
                           "--safety-concept: the safety concept 'a dog' is given twice"),
                          (["--safety", "sega-max", "--safety-concept", "a", "--safety-concept", "b"],
                           "--safety-concept: a SEGA safety preset takes one safety concept (its one reversed edit "
                           "has the one SEGA momentum); give one concept, or use an SLD preset for several")):
        code, _, err = run(capsys, "generate", "a cat", "--weights", str(tiny_ckpt), "--out", str(tmp_path / "x.png"),
                           *args, *FAST)
        assert (code, err) == (2, f"sld-minimal: error: {message}\n")


def test_notes_are_one_line_each_and_quiet_silences_them(tiny_ckpt, tmp_path):
    """A run shorter than the preset's warm-up says so once; the tiny vocabulary cuts the paper's concept, which
    is named; --quiet prints neither (a real process: warnings as the command line prints them)."""
    argv = [sys.executable, "-m", "sld_minimal", "generate", "a cat", "--weights", str(tiny_ckpt), "--safety", "strong",
            "--steps", "4", "--height", "16", "--width", "16", "--seed", "0"]
    loud = subprocess.run(argv + ["--out", str(tmp_path / "a.png")], capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr
    warned = [line for line in loud.stderr.splitlines() if line.startswith("sld-minimal: warning:")]
    assert len(warned) == 2 and all(line.count("\n") == 0 for line in warned), loud.stderr
    assert warned[0].startswith("sld-minimal: warning: the safety guidance never acts: its warm-up (δ = 7) is not "
                                "shorter than the run's 5 sampling iterations")
    assert warned[1].startswith("sld-minimal: warning: the safety concept is longer than 77 tokens;")
    quiet = subprocess.run(argv + ["--out", str(tmp_path / "b.png"), "--quiet"], capture_output=True, text=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert "Never acted: the safety guidance never acts" in Image.open(tmp_path / "b.png").text["parameters"]
