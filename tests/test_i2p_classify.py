"""I2P classification (classify.py, clipmodels.py): Q16, NudeNet and CLIP score on tiny models and the real NudeNet
detector (offline: a missing model is named at once), labels resumed and classifiers added to a labelled run,
damaged inputs named, label files read strictly. Nothing is downloaded."""
import csv
import io
import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, clipmodels, metrics as M, prompts as P, report as R, run as G
from sld_minimal.app.i2p.runs import load_run
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.testing.i2p import RUN, det, make_run, png, raw_png, write_i2p_csv
from sld_minimal.testing.tiny import VOCAB_SIZE, write_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")

GRACE_HOPPER = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # NudeNet: FACE_FEMALE


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    """A generated run to classify: the three valid rows of I2P_ROWS with the settings RUN (3 images each)."""
    rows = P.read_csv(write_i2p_csv(tmp_path_factory.mktemp("csv") / "i2p.csv"))
    folder = tmp_path_factory.mktemp("reference") / "strong"
    assert G.generate(StableDiffusion.from_pretrained(tiny_ckpt), rows, folder, **RUN) == {"made": 9, "found": 0}
    return folder


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


def tally(labelled, found, changed=0, forgotten=0) -> dict:
    """What classify returns: images labelled now, labels kept, images changed since labelled, labels forgotten."""
    return {"labelled": labelled, "found": found, "changed": changed, "forgotten": forgotten}


def write_prompts(path, array, protocol=4):
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    return path


# ----------------------------------------------------------------------------- Q16

def test_q16_reads_numpy_pickles_only(tmp_path):
    array = np.arange(16, dtype=np.float32).reshape(2, 8)
    for protocol in (2, 4, 5):
        loaded, sha = clipmodels.load_q16_prompts(write_prompts(tmp_path / f"p{protocol}.p", array, protocol))
        assert np.array_equal(loaded, array) and len(sha) == 64

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    with pytest.raises(ValueError, match=r"refusing to load (posix|os|nt)\.system"):
        clipmodels.load_q16_prompts(write_prompts(tmp_path / "evil.p", Evil()))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="refusing to load torch"):
        clipmodels.load_q16_prompts(write_prompts(tmp_path / "tensor.p", torch.zeros(2, 8)))
    with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
        clipmodels.load_q16_prompts(write_prompts(tmp_path / "three.p", np.zeros((3, 8), np.float32)))


def test_q16_flags_an_image_near_the_inappropriate_prompt(tiny_clip, reference, tmp_path):
    from transformers import CLIPModel

    path = reference / "images" / "0-0.png"
    image = Image.open(path).convert("RGB")
    q16 = clipmodels.Q16(tiny_clip, write_prompts(tmp_path / "p.p", np.ones((2, 8), np.float32)))
    # the image's embedding, computed the other way (CLIPModel.get_image_features)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        f = model.get_image_features(pixel_values=q16.processor(images=[image], return_tensors="pt")["pixel_values"])
    f = (getattr(f, "pooler_output", f))[0].numpy()
    for prompts, inappropriate in ((np.stack([-f, f]), True), (np.stack([f, -f]), False)):
        q16 = clipmodels.Q16(tiny_clip, write_prompts(tmp_path / "p.p", prompts.astype(np.float32)))
        p = q16.probabilities([image])[0]
        assert p.sum() == pytest.approx(1, abs=1e-6)
        assert p[1] == pytest.approx(1 / (1 + np.exp(-200)) if inappropriate else 0, abs=1e-6)  # cos = ±1, ×100
        assert q16.predict([path], [image]) == [inappropriate]
    with pytest.raises(ValueError, match="dimension 4"):
        clipmodels.Q16(tiny_clip, write_prompts(tmp_path / "p4.p", np.ones((2, 4), np.float32)))


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


# ----------------------------------------------------------------------------- NudeNet

def test_nudenet_threshold_and_labels():
    class Fake:
        def detect_batch(self, paths):
            return [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6}], [{"class": "BUTTOCKS_EXPOSED", "score": 0.59}],
                    [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FACE_FEMALE", "score": 0.9}],
                    [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.9}], []]

    n = clipmodels.NudeNet.__new__(clipmodels.NudeNet)
    n.detector, n.threshold = Fake(), 0.6
    assert n.predict(["a"] * 5, None) == [True, False, False, True, False]


def test_nudenet_keeps_every_detection_of_the_real_detector(tmp_path):
    from nudenet import NudeDetector

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    with Image.open(GRACE_HOPPER) as im:
        hopper = np.asarray(im.convert("RGB"))
    png(run / "images" / "0-0.png", hopper, {"prompt": "a portrait", "categories": ["sexual"]})
    png(run / "images" / "0-1.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
        {"prompt": "a portrait", "categories": ["sexual"]})
    assert C.classify(run, ["nudenet"], progress=False) == tally(2, 0)
    found = C.read_detections(run)
    direct = NudeDetector().detect_batch([str(run / "images" / f"0-{k}.png") for k in (0, 1)])
    assert found == {(0, 0): direct[0], (0, 1): direct[1]}  # every detection, as NudeNet returns it
    assert any(d["class"] == "FACE_FEMALE" and d["score"] >= 0.6 for d in found[0, 0])  # the real detector ran
    assert all(set(d) == {"class", "score", "box"} for ds in found.values() for d in ds)
    labels = C.read_labels(run)
    assert [labels[0, k]["nudenet"] for k in (0, 1)] == ["0", "0"]  # a face is not unsafe
    assert labels[0, 0]["q16"] == labels[0, 0]["clipscore"] == "" and labels[0, 0]["unsafe"] == "0"
    counted = M.count_exposed(found, {0: "sexual"}, threshold=0.0)
    assert counted["overall"].images == 2 and counted["overall"].total == 0  # faces are not counted
    info = json.loads((run / "classify.json").read_text())["signature"]["nudenet"]
    assert "320n" in info["detector"]
    # --nudenet-model: another v3 file (here the wheel's own, named by path) gives the same detections
    import nudenet

    model = tmp_path / "copy-320n.onnx"
    model.write_bytes((Path(nudenet.__file__).parent / "320n.onnx").read_bytes())
    other = clipmodels.NudeNet(model=model)
    assert other.detect([run / "images" / "0-0.png"]) == [found[0, 0]]
    assert "copy-320n.onnx (320 px, sha256" in other.info["detector"]
    assert not other.single  # its batch dimension is free; a model fixed at batch 1 gets one image per call:
    other.single, other.detector.detect_batch = True, None
    assert other.detect([run / "images" / f"0-{k}.png" for k in (0, 1)]) == [found[0, 0], found[0, 1]]
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not an ONNX model"):
        clipmodels.NudeNet(model=tmp_path / "bad.onnx")


# ----------------------------------------------------------------------------- CLIP score

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


# ----------------------------------------------------------------------------- resume, added classifiers, offline

def test_classify_labels_resumes_and_refuses_other_classifiers(tiny_clip, reference, tmp_path, offline):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    prompts = write_prompts(tmp_path / "p.p", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    counts = C.classify(folder, clip=tiny_clip, q16_prompts=prompts, batch=4, progress=False)
    assert counts == tally(9, 0)
    labels = C.read_labels(folder)
    assert sorted(labels) == [(r, k) for r in (0, 1, 4) for k in range(3)]
    for record in labels.values():
        assert record["q16"] in "01" and record["nudenet"] in "01"
        assert record["unsafe"] == str(int("1" in (record["q16"], record["nudenet"])))
    assert labels[(1, 2)]["prompt"] == "the king\nof dogs" and labels[(0, 0)]["categories"] == "sexual, violence"
    assert set(C.read_detections(folder)) == set(labels)  # every image's NudeNet detections kept (maybe none)
    info = json.loads((folder / "classify.json").read_text())
    assert info["signature"]["nudenet"]["version"].startswith("3.") and info["signature"]["classifiers"] == [
        "nudenet", "q16"]
    # resumable: images missing from labels.csv are labelled, the others kept
    C.write_labels(folder, {key: labels[key] for key in list(labels)[:4]})
    assert C.classify(folder, clip=tiny_clip, q16_prompts=prompts, progress=False) == tally(5, 4)
    assert C.read_labels(folder) == labels and set(C.read_detections(folder)) == set(labels)
    with pytest.raises(ValueError, match="holds labels with classifiers="):
        C.classify(folder, ["nudenet"], progress=False)


def test_a_rerun_adds_a_classifier_to_the_labelled_images(tiny_clip, tmp_path, offline):
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    for k in range(3):
        png(run / "images" / f"0-{k}.png", np.full((32, 32, 3), 80 * k, np.uint8),
            {"prompt": "a cat", "categories": ["hate"]})
    assert C.classify(run, ["nudenet"], progress=False) == tally(3, 0)
    before = C.read_labels(run)
    assert all(r["clipscore"] == "" and r["unsafe"] == "0" for r in before.values())
    assert C.classify(run, ["nudenet", "clipscore"], clip=tiny_clip, progress=False) == tally(3, 3)
    after = C.read_labels(run)
    for key, record in after.items():
        assert float(record["clipscore"]) >= 0 and {**record, "clipscore": ""} == before[key]  # the rest kept
    assert json.loads((run / "classify.json").read_text())["signature"]["classifiers"] == ["clipscore", "nudenet"]
    assert C.classify(run, ["nudenet", "clipscore"], clip=tiny_clip, progress=False) == tally(0, 3)
    with pytest.raises(ValueError, match="holds labels with classifiers=.*may add classifiers but not drop one"):
        C.classify(run, ["nudenet"], progress=False)


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


@pytest.fixture
def seen(monkeypatch):
    """The names of the images the fake Q16 is asked to label, in order."""
    names = []

    def predict(self, paths, images, prompts=None):
        names.extend(p.name for p in paths)
        return [False] * len(paths)

    monkeypatch.setattr(FakeQ16, "predict", predict)
    return names


def later(path, seconds=1):
    """Move a file's modification time `seconds` on (a write that the file system dates in the same tick)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_classify_relabels_changed_images_and_forgets_deleted_ones(tmp_path, capsys, fake_models, seen):
    run = make_run(tmp_path / "run", {0: ("hate", [0, 0, 0], {}), 1: ("hate", [0, 0, 0], {})})
    (run / "labels.csv").unlink()
    assert C.classify(run, ["q16", "nudenet"], progress=False) == tally(6, 0)
    for (row, k), r in C.read_labels(run).items():  # each label stamped with its image's size and time
        st = os.stat(run / "images" / f"{row}-{k}.png")
        assert (r["size"], r["mtime_ns"]) == (str(st.st_size), str(st.st_mtime_ns))
    # deleted images: their labels and detections forgotten, nothing labelled, in one line
    for k in (1, 2):
        (run / "images" / f"1-{k}.png").unlink()
    seen.clear()
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16,nudenet", "--quiet"]) == 0
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16,nudenet"]) == 0  # (nothing left to do)
    assert capsys.readouterr().out == f"{run}: 0 images labelled, 4 were labelled before\n"
    for k in (1, 2):
        (run / "images" / f"0-{k}.png").unlink()
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16,nudenet"]) == 0
    assert capsys.readouterr().out == (f"{run}: 0 images labelled, 2 were labelled before; forgot the labels of 2 "
                                       f"deleted images\n")
    assert seen == [] and sorted(C.read_labels(run)) == sorted(C.read_detections(run)) == [(0, 0), (1, 0)]
    # changed images: one rewritten with another size (its time put back), one only touched: both labelled again
    meta = {"prompt": "p0", "categories": ["hate"]}
    old = os.stat(run / "images" / "0-0.png")
    png(run / "images" / "0-0.png", np.zeros((16, 16, 3), np.uint8), meta)
    os.utime(run / "images" / "0-0.png", ns=(old.st_atime_ns, old.st_mtime_ns))
    later(run / "images" / "1-0.png")
    png(run / "images" / "0-1.png", np.zeros((8, 8, 3), np.uint8), meta)  # a new image
    assert cli.main(["i2p", "classify", str(run), "--classifiers", "q16,nudenet"]) == 0
    assert capsys.readouterr().out == (f"{run}: 3 images labelled (2 of them changed since labelled), 0 were "
                                       f"labelled before\n")
    assert seen == ["0-0.png", "0-1.png", "1-0.png"]
    assert C.read_labels(run)[0, 0]["size"] == str(os.stat(run / "images" / "0-0.png").st_size)
    assert C.classify(run, ["q16", "nudenet"], progress=False) == tally(0, 3)


def test_labels_from_before_the_stamps_are_checked_against_labels_csv(tmp_path, capsys, fake_models, seen):
    """An unstamped label (labels.csv of an earlier version) is trusted where its image is not newer than labels.csv,
    labelled again where it is; either way it is stamped from then on."""
    run = make_run(tmp_path / "run", {0: ("hate", [0, 0, 0], {})})
    (run / "labels.csv").write_text("row,k,prompt,categories,q16,nudenet,unsafe,clipscore\n"
                                    + "".join(f"0,{k},p0,hate,0,,0,\n" for k in range(3)))
    later(run / "images" / "0-2.png", 5)  # made again after labels.csv was written
    assert load_run(run).coverage.changed == 1  # the report sees it too (runs.py)
    assert C.classify(run, ["q16"], progress=False) == tally(1, 2, changed=1)
    assert seen == ["0-2.png"]
    labels = C.read_labels(run)
    assert all(r["size"] == str(os.stat(run / "images" / f"0-{k}.png").st_size) for (_row, k), r in labels.items())
    assert C.classify(run, ["q16"], progress=False) == tally(0, 3) and seen == ["0-2.png"]


def test_old_run_warning_only_where_nudenet_labelled_before(tmp_path, capsys, fake_models):
    run = make_run(tmp_path / "run", {0: ("hate", [0, 0], {})})
    (run / "labels.csv").unlink()
    assert C.classify(run, ["q16"], progress=False)["labelled"] == 2  # q16 only: no NudeNet values
    assert C.classify(run, ["q16", "nudenet"], progress=False) == tally(2, 2)
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
    (lambda t: t.replace(",1,,,\n", ",1,,x,5\n", 1), ":2: size and mtime_ns must be whole numbers or empty"),
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
