"""The classifiers beside I2P's table and what classify writes: CLIP score and Q16 on a tiny random CLIP (offline: a
missing model is named at once), classifiers added to a labelled run, damaged inputs named, strict label files;
and the helpers the other I2P metric tests (test_i2p_counts) share. Nothing is downloaded."""
import csv
import io
import json
import pickle
import re
import socket
import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, clipmodels, metrics as M, report as R
from sld_minimal.testing.tiny import VOCAB_SIZE, write_tokenizer


def png(path, array, meta=None):
    """Save an (H, W, 3) uint8 array as PNG with an `i2p` chunk."""
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        info.add_text("i2p", json.dumps(meta))
    Image.fromarray(array).save(path, pnginfo=info)
    return path


def raw_png(path, text):
    """A small PNG whose `i2p` chunk holds `text` as it is."""
    info = PngImagePlugin.PngInfo()
    info.add_text("i2p", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def make_run(folder, prompts, detections=None, clipscores=None, stored_labels=True, settings=None):
    """A classified run folder. prompts {row: (categories, [unsafe flags], {label column: percent})}; each image is
    a small PNG whose i2p chunk carries the row's labels (as `i2p generate` writes them) when `stored_labels`."""
    (folder / "images").mkdir(parents=True)
    labels = {}
    for row, (cats, flags, ref) in prompts.items():
        for k, u in enumerate(flags):
            meta = {"row": row, "k": k, "prompt": f"p{row}", "categories": cats.split(", ")}
            if stored_labels and ref:
                meta["i2p_labels"] = ref
            png(folder / "images" / f"{row}-{k}.png", np.full((8, 8, 3), 10 * k, np.uint8), meta)
            score = "" if clipscores is None else f"{clipscores[row, k]:.4f}"
            labels[row, k] = {"row": str(row), "k": str(k), "prompt": f"p{row}", "categories": cats,
                              "q16": str(u), "nudenet": str(int(row % 2 == 0 and u)), "unsafe": str(u),
                              "clipscore": score}
    C.write_labels(folder, labels)
    if detections is not None:
        C.write_detections(folder, detections)
    n = max(len(flags) for _c, flags, _r in prompts.values())
    (folder / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": n, **(settings or {})}}))
    return folder


def det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 1, 1]}


AGREE = {0: ("hate", [1, 1, 0, 0], {"inappropriate_percentage": 40.0, "nudity_percentage": 10.0,
                                    "q16_percentage": 30.0}),
         1: ("hate, sexual", [1, 1, 1, 1], {"inappropriate_percentage": 90.0, "nudity_percentage": 0.0,
                                            "q16_percentage": 80.0}),
         2: ("sexual", [0, 0, 0, 1], {"inappropriate_percentage": 50.0, "nudity_percentage": 60.0,
                                      "q16_percentage": 10.0}),
         3: ("sexual", [0, 0, 0, 0], {"inappropriate_percentage": 0.0, "nudity_percentage": 0.0,
                                      "q16_percentage": 0.0})}


# ----------------------------------------------------------------------------- CLIP: CLIP score, Q16, offline

def write_tiny_clip(folder, projection_dim=8, seed=0):
    """A random CLIP in transformers' layout (save_pretrained), with an image processor and a small BPE tokenizer
    written in code: everything `--clip FOLDER` reads."""
    from transformers import CLIPConfig, CLIPModel
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1,
                                         pad_token_id=VOCAB_SIZE - 1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # (read at import)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no Q16 prompts cached


def direct_features(folder, images, texts):
    """CLIP's projected embeddings computed by hand: the text at its first end-of-text token; a text longer than
    CLIP's 77 tokens cut to its first 76 and the end-of-text token."""
    from transformers import CLIPModel, CLIPTokenizer
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    model = CLIPModel.from_pretrained(folder).eval()
    eos = VOCAB_SIZE - 1  # also the padding
    ids = [i if len(i) <= 77 else i[:76] + [eos] for i in CLIPTokenizer.from_pretrained(folder)(texts)["input_ids"]]
    ids = torch.tensor([i + [eos] * (max(map(len, ids)) - len(i)) for i in ids])
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids).last_hidden_state                       # (N, T, h)
        eot = (ids == eos).int().argmax(-1)
        text = model.text_projection(hidden[torch.arange(len(ids)), eot])
        pixels = Processor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return image.numpy(), text.numpy()


def test_clip_score_against_a_direct_computation(tiny_clip, tmp_path, offline):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (40, 48, 3), np.uint8) for _ in range(3)]
    images = [Image.fromarray(a) for a in arrays]
    texts = ["a painting", "a cat", "a dog and a cat " * 15]  # the last one 92 tokens: cut to 77
    clip = clipmodels.Clip(tiny_clip)
    ours_x, ours_t = clip.image_features(images).numpy(), clip.text_features(texts).numpy()
    x, t = direct_features(tiny_clip, images, texts)
    assert ours_x == pytest.approx(x, abs=1e-5) and ours_t == pytest.approx(t, abs=1e-5)  # before any clamping
    cos = (x * t).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(t, axis=1)
    scores = clipmodels.ClipScore(clip).predict(None, images, texts)
    assert scores == pytest.approx(np.maximum(100 * cos, 0), abs=1e-3)
    assert sum(s > 1 for s in scores) == 2 and 0 in scores  # (≈ 19, 0 (clamped), 30)
    assert M.clip_score([[1, 0], [1, 0], [0, 1]], [[2, 0], [-1, 0], [1, 1]]) == pytest.approx([100, 0, 100 / 2**0.5])
    # through classify: the clipscore column, and the report's mean per category
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    for k, (a, text) in enumerate(zip(arrays, texts)):
        png(run / "images" / f"{k}-0.png", a, {"prompt": text, "categories": ["hate" if k else "sexual"]})
    assert C.classify(run, ["clipscore"], clip=tiny_clip, progress=False)["labelled"] == 3
    labels = C.read_labels(run)
    assert [float(labels[k, 0]["clipscore"]) for k in range(3)] == pytest.approx(scores, abs=1e-3)
    assert all(labels[k, 0]["unsafe"] == "" for k in range(3))  # neither Q16 nor NudeNet ran
    assert not (run / "detections.jsonl").exists()
    table = list(csv.reader(io.StringIO(R.report([run], "csv"))))
    row = dict(zip(table[0], table[-1]))
    assert table[-1][0] == "Overall" and float(row["CLIP score run"]) == pytest.approx(np.mean(scores), abs=1e-3)
    hate = dict(zip(table[0], next(r for r in table if r[0] == "Hate")))
    assert float(hate["CLIP score run"]) == pytest.approx(np.mean(scores[1:]), abs=1e-3)
    assert "CLIP score" in R.report([run]) and "| Overall |" not in R.report([run]).split("CLIP score")[0]


def test_q16_on_the_tiny_clip_against_a_direct_computation(tiny_clip, tmp_path, offline):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)) for _ in range(2)]
    prompts = rng.standard_normal((2, 8)).astype(np.float32)
    (tmp_path / "p.p").write_bytes(pickle.dumps(prompts))
    q16 = clipmodels.Q16(tiny_clip, tmp_path / "p.p")
    x, _ = direct_features(tiny_clip, images, ["a"])
    logits = 100 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert q16.probabilities(images) == pytest.approx(expected, abs=1e-4)
    assert q16.predict(None, images) == [bool(p[1] > p[0]) for p in expected]


def test_classify_offline_names_the_missing_model_at_once(tmp_path, capsys, offline):
    run = make_run(tmp_path / "run", {0: ("hate", [0], {})})
    (run / "labels.csv").unlink()
    start = time.monotonic()
    with pytest.raises(clipmodels.ModelMissing, match="the CLIP model openai/clip-vit-large-patch14 .* not in the hub "
                                             "cache .*--classifiers nudenet.*--clip FOLDER"):
        C.classify(run, ["clipscore"], progress=False)
    # Q16's prompts file is looked for first; the command line says it in one line
    prompts = tmp_path / "p.p"
    prompts.write_bytes(pickle.dumps(np.zeros((2, 8), np.float32)))
    assert cli.main(["i2p", "classify", str(run), "--q16-prompts", str(prompts), "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/clip-vit-large-patch14" in err[0] and "--classifiers nudenet" in err[0]
    assert cli.main(["i2p", "classify", str(run), "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q16's prompts" in err[0] and "--q16-prompts FILE" in err[0]
    assert time.monotonic() - start < 10  # no retry loop
    assert not (run / "classify.json").exists() and not (run / "labels.csv").exists()  # nothing written
    # a complete snapshot in the hub cache is found without the network; a partial one is not enough
    snapshot = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(clipmodels.ModelMissing):
        clipmodels.find_clip(clipmodels.DEFAULT_CLIP)
    (snapshot / "model.safetensors").write_bytes(b"")
    assert clipmodels.find_clip(clipmodels.DEFAULT_CLIP) == str(snapshot)
    with pytest.raises(FileNotFoundError, match="CLIP folder .*nowhere not found"):
        clipmodels.find_clip("./nowhere")
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "nudenet,clip"]) == cli.EXIT_USAGE


def test_a_rerun_adds_a_classifier_to_the_labelled_images(tiny_clip, tmp_path, offline):
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    for k in range(3):
        png(run / "images" / f"0-{k}.png", np.full((32, 32, 3), 80 * k, np.uint8),
            {"prompt": "a cat", "categories": ["hate"]})
    assert C.classify(run, ["nudenet"], progress=False) == {"labelled": 3, "found": 0}
    before = C.read_labels(run)
    assert all(r["clipscore"] == "" and r["unsafe"] == "0" for r in before.values())
    assert C.classify(run, ["nudenet", "clipscore"], clip=tiny_clip, progress=False) == {"labelled": 3, "found": 3}
    after = C.read_labels(run)
    for key, record in after.items():
        assert float(record["clipscore"]) >= 0 and {**record, "clipscore": ""} == before[key]  # the rest kept
    assert json.loads((run / "classify.json").read_text())["signature"]["classifiers"] == ["clipscore", "nudenet"]
    assert C.classify(run, ["nudenet", "clipscore"], clip=tiny_clip, progress=False) == {"labelled": 0, "found": 3}
    with pytest.raises(ValueError, match="holds labels with classifiers=.*may add classifiers but not drop one"):
        C.classify(run, ["nudenet"], progress=False)


def test_clip_score_on_its_own_clip_beside_q16(tiny_clip, tmp_path, offline, capsys):
    """Q16's prompts fit one CLIP (8-d here, ViT-L/14's 768 in use), CLIP score may use another (6-d, as B/32's 512):
    added to a run Q16 labelled, each classifier records its own. An image without metadata gets no CLIP score."""
    other = write_tiny_clip(tmp_path / "clip-b", projection_dim=6, seed=1)
    prompts = tmp_path / "p.p"
    prompts.write_bytes(pickle.dumps(np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)))
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    png(run / "images" / "0-0.png", rng.integers(0, 255, (32, 32, 3), np.uint8), {"prompt": "a cat", "categories": []})
    png(run / "images" / "1-0.png", rng.integers(0, 255, (32, 32, 3), np.uint8))  # no i2p metadata
    assert C.classify(run, ["q16"], clip=tiny_clip, q16_prompts=prompts, progress=False)["labelled"] == 2
    assert C.classify(run, ["q16", "clipscore"], clip=tiny_clip, q16_prompts=prompts, clipscore_clip=other,
                      progress=False)["found"] == 2
    assert "1-0.png has no i2p metadata" in capsys.readouterr().err
    sig = json.loads((run / "classify.json").read_text())["signature"]
    assert sig["q16"]["clip"] == str(tiny_clip) and sig["clipscore"]["clip"] == str(other)
    labels = C.read_labels(run)
    with Image.open(run / "images" / "0-0.png") as im:
        expected = clipmodels.ClipScore(other).predict(None, [im.convert("RGB")], ["a cat"])[0]
    assert float(labels[0, 0]["clipscore"]) == pytest.approx(expected, abs=1e-3)
    assert labels[1, 0]["clipscore"] == "" and labels[1, 0]["q16"] != ""  # no score against an empty prompt
    with pytest.raises(ValueError, match="clipscore clip="):  # CLIP score's CLIP changed: refused
        C.classify(run, ["q16", "clipscore"], clip=tiny_clip, q16_prompts=prompts, progress=False)
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16", "--clipscore-clip", str(other)]) \
        == cli.EXIT_USAGE


class FakeQ16:
    info = {"clip": "fake"}

    def predict(self, paths, images, prompts=None):
        return [False] * len(paths)


class FakeNudeNet:
    info = {"detector": "fake"}

    def detect(self, paths):
        return [[] for _ in paths]

    def flag(self, detections):
        return False


@pytest.fixture
def fake_models(monkeypatch):
    monkeypatch.setattr(C, "load_models", lambda classifiers, *a, **k: {
        c: {"q16": FakeQ16, "nudenet": FakeNudeNet}[c]() for c in classifiers})


def test_old_run_warning_only_where_nudenet_labelled_before(tmp_path, capsys, fake_models):
    run = make_run(tmp_path / "run", {0: ("hate", [0, 0], {})})
    (run / "labels.csv").unlink()
    assert C.classify(run, ["q16"], progress=False)["labelled"] == 2  # q16 only: no NudeNet values
    assert C.classify(run, ["q16", "nudenet"], progress=False) == {"labelled": 2, "found": 2}
    assert "cover new images only" not in capsys.readouterr().err  # NudeNet's first run here: all its detections
    (run / "detections.jsonl").unlink()  # NudeNet labelled, its detections missing (an older run)
    png(run / "images" / "1-0.png", np.zeros((8, 8, 3), np.uint8), {"prompt": "p1", "categories": ["hate"]})
    C.classify(run, ["q16", "nudenet"], progress=False)
    assert "exposed-part counts will cover new images only" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "1-0.png: not a readable image"),                      # 0 bytes
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "1-0.png: not a readable image"),      # cut short
    (lambda p: raw_png(p, '{"prompt": "p1",'), "damaged i2p metadata in .*1-0.png"),    # its JSON cut short
    (lambda p: raw_png(p, '["p1"]'), "damaged i2p metadata in .*1-0.png"),              # not an object
])
def test_classify_names_a_damaged_image_in_one_line(tmp_path, capsys, fake_models, damage, message):
    run = make_run(tmp_path / "run", {0: ("hate", [0], {}), 1: ("hate", [0], {})})
    (run / "labels.csv").unlink()
    orphan = run / ".labels.csv.999999999.0123abcd.tmp"  # left by a killed classify (no such process)
    orphan.write_text("row,k")
    png(run / "images" / "1-0.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
        {"prompt": "p1", "categories": ["hate"]})
    damage(run / "images" / "1-0.png")
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16", "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not orphan.exists()


# ----------------------------------------------------------------------------- label files are read strictly

@pytest.mark.parametrize("damage, message", [
    (lambda t: t[:t.rindex(",")], ":3: a field is missing"),                       # cut mid-line
    (lambda t: t.replace("\n0,1,", "\nx,1,", 1), ":3: row and k must be integers"),
    (lambda t: t.replace(",1,1,1,", ",7,1,1,", 1), ":2: q16, nudenet and unsafe must be"),
    (lambda t: t + t.splitlines()[1] + "\n", ":4: image 0-0 again"),
    (lambda t: t.replace("\n0,1,", "\n0,1,x,", 1), ":3: it has more fields than the header"),
    (lambda t: "row,k\n" + t, ":1: the header is not"),
])
def test_labels_csv_errors_name_the_file_and_line(tmp_path, damage, message):
    run = make_run(tmp_path / "run", {0: ("hate", [1, 0], {})})
    path = run / "labels.csv"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=f"{path}{message}"):
        C.read_labels(run)


def test_old_labels_and_damaged_detections(tmp_path):
    run = make_run(tmp_path / "run", {0: ("hate", [1], {})}, detections={(0, 0): [det("FEET_EXPOSED", 0.7)]})
    old = "row,k,prompt,categories,q16,nudenet,unsafe\n0,0,p,hate,1,0,1\n"  # before CLIP score: still read
    (run / "labels.csv").write_text(old)
    assert C.read_labels(run)[0, 0]["clipscore"] == "" and C.read_labels(run)[0, 0]["unsafe"] == "1"
    path = run / "detections.jsonl"
    path.write_text(path.read_text() + '{"row": 1, "k": 0, "detections": [{"class": "X"}]}\n{"row"\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a detection record"):
        C.read_detections(run)
