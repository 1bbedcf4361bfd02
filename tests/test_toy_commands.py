"""The toy world around the library: a model folder's own safety concept, packaged models by name, the `toy`
classifier through `i2p classify` and `report`, and `toy train`'s refusals."""
import json
import shutil

import numpy as np
import pytest
from sld_minimal import loading
from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, report as R
from sld_minimal.app.i2p.prompts import Row
from sld_minimal.app.i2p.folder import _png, image_path, row_meta
from sld_minimal.app.toy import world
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.weights import WeightsError


def _with_concept(src, dst, value):
    """A copy of the model folder `src` whose model_index.json names `value` as its safety concept."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps(index | {loading.SAFETY_CONCEPT_KEY: value}))
    return dst


def test_a_model_folder_names_its_own_safety_concept(tiny_ckpt, tmp_path):
    """A preset named by `safety="…"` steers away from the model's concept: the same images as the preset with that
    concept given by hand, and different ones from the paper's concept."""
    folder = _with_concept(tiny_ckpt, tmp_path / "m", "a photo of the dog")
    assert loading.safety_concept(tiny_ckpt) is None and loading.safety_concept(folder) == "a photo of the dog"
    pipe = StableDiffusion.from_pretrained(folder)
    assert pipe.safety_concept == "a photo of the dog"
    kw = dict(num_inference_steps=3, height=32, width=32, seed=0, progress=False)
    own = pipe("a photo of the cat", safety="max", **kw)
    from sld_minimal.presets import safety_configs
    by_hand = pipe("a photo of the cat", safety=safety_configs("max", "a photo of the dog"), **kw)
    paper = StableDiffusion.from_pretrained(tiny_ckpt)("a photo of the cat", safety="max", **kw)
    assert np.array_equal(own.images, by_hand.images) and not np.array_equal(own.images, paper.images)
    assert own.settings[0]["safety"][0]["concept"] == "a photo of the dog"


@pytest.mark.parametrize("value", ["", 3, ["red"]])
def test_a_bad_safety_concept_field_is_named(tiny_ckpt, tmp_path, value):
    folder = _with_concept(tiny_ckpt, tmp_path / "m", value)
    with pytest.raises(WeightsError, match=f"model_index.json: key '{loading.SAFETY_CONCEPT_KEY}' must be"):
        loading.load_model(folder)


def test_a_packaged_model_is_found_by_name_unless_a_path_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loading.model_path("toy") == loading.PACKAGED["toy"]
    assert str(loading.model_path("elsewhere")) == "elsewhere"  # not a packaged name: the path as given
    (tmp_path / "toy").mkdir()
    assert str(loading.model_path("toy")) == "toy"  # a folder of that name here: taken instead


def _image(colour, background):
    """A 32 px image in [0, 1] of one shape on a background, drawn by the world's renderer."""
    return world.render(np.random.default_rng(0), "circle", colour, background)


def test_the_toy_classifier_runs_through_classify_and_report(tmp_path):
    """`--classifiers toy` labels red images unsafe and others safe, in a column of its own; report counts them."""
    run = tmp_path / "run"
    rows = [Row(0, 2, "an apple on a dark background", ("implicit",), 1, 7.5),
            Row(1, 3, "a leaf on a light background", ("neutral",), 2, 7.5)]
    pictures = {(0, 0): _image("red", "dark"), (0, 1): _image("green", "dark"),
                (1, 0): _image("green", "light"), (1, 1): _image("yellow", "light")}
    image_path(run, 0, 0).parent.mkdir(parents=True)
    for (row, k), img in pictures.items():
        image_path(run, row, k).write_bytes(_png(img, {"i2p": json.dumps(row_meta(rows[row], k))}))
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "toy", "--quiet"]) == 0
    labels = C.read_labels(run)
    assert {key: (r["toy"], r["unsafe"], r["q16"]) for key, r in labels.items()} == {
        (0, 0): ("1", "1", ""), (0, 1): ("0", "0", ""), (1, 0): ("0", "0", ""), (1, 1): ("0", "0", "")}
    assert (run / "labels.csv").read_text().splitlines()[0].endswith(",clipscore,size,mtime_ns,toy")
    assert json.loads((run / "classify.json").read_text())["signature"]["classifiers"] == ["toy"]
    stats = R.summarize(labels)
    assert stats["implicit"].probability == 0.5 and stats["neutral"].probability == 0.0
    text = R.report([run])
    assert "toy (red pixels: the toy world's concept rule)" in text and "share of images that toy flags" in text


def test_a_registered_classifier_needs_a_plain_name():
    with pytest.raises(ValueError, match="lower-case"):
        C.register("Q 16", lambda device: None, "nothing")
    with pytest.raises(ValueError, match="not a built-in"):
        C.register("nudenet", lambda device: None, "nothing")


def test_toy_train_never_replaces_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mywork.txt").write_text("x")
    assert cli.main(["toy", "train", "--out", str(notes), "--steps", "2", "--overwrite", "--quiet"]) == 2
    assert "did not write" in capsys.readouterr().err and (notes / "mywork.txt").read_text() == "x"
    monkeypatch.chdir(notes)
    assert cli.main(["toy", "train", "--out", ".", "--steps", "2", "--overwrite", "--quiet"]) == 2
    assert "current folder" in capsys.readouterr().err and (notes / "mywork.txt").read_text() == "x"
    assert cli.main(["toy", "train", "--out", str(notes), "--steps", "2", "--quiet"]) == 1  # no --overwrite
    assert "not empty" in capsys.readouterr().err and (notes / "mywork.txt").read_text() == "x"


def test_toy_table_names_unknown_methods(capsys):
    assert cli.main(["toy", "table", "--methods", "sd,plain"]) == 2
    assert "--methods: choose from sd,negative,weak" in capsys.readouterr().err


def test_i2p_generate_takes_its_size_from_the_model(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,categories,sd_seed\na photo of the cat,x,3\n")
    out = tmp_path / "run"
    assert cli.main(["i2p", "generate", "--prompts", str(prompts), "--weights", str(tiny_ckpt), "--out", str(out),
                     "--safety", "off", "--steps", "1", "--images-per-prompt", "1", "--batch", "1", "--quiet"]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["height"], settings["width"]) == (32, 32)  # the tiny model's own size, as `generate` takes
    from PIL import Image
    with Image.open(image_path(out, 0, 0)) as im:
        assert im.size == (32, 32)
