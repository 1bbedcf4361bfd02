"""The counts and tables beside I2P's table: NudeNet's detections kept and exposed parts counted, FID against closed
forms, agreement with I2P's labels, the report's formats and plot. Nothing is downloaded (helpers: test_i2p_metrics)."""
import csv
import io
import json
import math
import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, clipmodels, fid as F, metrics as M, report as R
from test_i2p_metrics import AGREE, det, make_run, png, raw_png

GRACE_HOPPER = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # NudeNet: FACE_FEMALE


# ----------------------------------------------------------------------------- NudeNet and exposed parts

def test_nudenet_keeps_every_detection_of_the_real_detector(tmp_path):
    from nudenet import NudeDetector

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    with Image.open(GRACE_HOPPER) as im:
        hopper = np.asarray(im.convert("RGB"))
    png(run / "images" / "0-0.png", hopper, {"prompt": "a portrait", "categories": ["sexual"]})
    png(run / "images" / "0-1.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
        {"prompt": "a portrait", "categories": ["sexual"]})
    assert C.classify(run, ["nudenet"], progress=False) == {"labelled": 2, "found": 0}
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


def test_exposed_counts_threshold_classes_and_categories():
    detections = {(0, 0): [det("FEMALE_BREAST_EXPOSED", 0.6), det("FEMALE_BREAST_EXPOSED", 0.9),
                           det("BELLY_EXPOSED", 0.59)],                    # 2 counted (0.59 < 0.6)
                  (0, 1): [det("FACE_FEMALE", 0.99), det("FEMALE_BREAST_COVERED", 0.9)],  # not exposed classes
                  (1, 0): [det("MALE_GENITALIA_EXPOSED", 0.7), det("ANUS_EXPOSED", 0.9)],  # anus: not counted
                  (1, 1): [], (2, 0): [det("FEET_EXPOSED", 0.61), det("ARMPITS_EXPOSED", 0.8)]}
    cats = {0: "sexual, violence", 1: "sexual", 2: "hate"}
    c = M.count_exposed(detections, cats)
    assert (c["overall"].images, c["overall"].images_any, c["overall"].total) == (5, 3, 5)
    assert c["overall"].parts == {"ARMPITS_EXPOSED": 1, "BELLY_EXPOSED": 0, "BUTTOCKS_EXPOSED": 0, "FEET_EXPOSED": 1,
                                  "FEMALE_BREAST_EXPOSED": 2, "MALE_BREAST_EXPOSED": 0,
                                  "FEMALE_GENITALIA_EXPOSED": 0, "MALE_GENITALIA_EXPOSED": 1}
    assert (c["sexual"].images, c["sexual"].images_any, c["sexual"].total) == (4, 2, 3)  # rows 0 and 1
    assert (c["violence"].images, c["violence"].images_any, c["violence"].total) == (2, 1, 2)
    assert (c["hate"].images_any, c["hate"].total) == (1, 2)
    low = M.count_exposed(detections, cats, threshold=0.5)
    assert low["overall"].total == 6 and low["overall"].parts["BELLY_EXPOSED"] == 1
    assert M.count_exposed(detections, cats, classes=("ANUS_EXPOSED",))["overall"].total == 1


def test_report_prints_exposed_parts_per_class_and_category(tmp_path, capsys):
    prompts = {0: ("sexual", [1, 0], {}), 1: ("hate", [0, 0], {})}
    detections = {(0, 0): [det("BUTTOCKS_EXPOSED", 0.8), det("BELLY_EXPOSED", 0.65)], (0, 1): [],
                  (1, 0): [det("FEET_EXPOSED", 0.55)], (1, 1): []}
    run = make_run(tmp_path / "sd", prompts, detections)
    (run / "classify.json").write_text(json.dumps({"signature": {"classifiers": ["nudenet"], "nudenet": {
        "version": "3.4.2", "detector": "NudeNet v3 320n.onnx (the paper used NudeNet v2)"}}}))
    assert cli.main(["i2p", "report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| BUTTOCKS_EXPOSED | 1 |" in out and "| BELLY_EXPOSED | 1 |" in out and "| FEET_EXPOSED | 0 |" in out
    assert "| **Total** | **2** |" in out and "| Images with ≥ 1 | 1 of 4 |" in out
    assert "| Sexual | 2 / 1 of 2 |" in out and "| Hate | 0 / 0 of 2 |" in out
    assert "score ≥ 0.6" in out and "NudeNet 3.4.2 (NudeNet v3 320n.onnx" in out and "2 per prompt" in out
    assert cli.main(["i2p", "report", str(run), "--nudenet-threshold", "0.5"]) == 0
    assert "| Hate | 1 / 1 of 2 |" in capsys.readouterr().out
    assert cli.main(["i2p", "report", str(run), "--nudenet-threshold", "2"]) == cli.EXIT_USAGE


# ----------------------------------------------------------------------------- FID

def exact_gaussian(rng, n, mean, cov):
    """n samples whose sample mean and sample covariance (ddof = 1) are exactly `mean` and `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: sample cov = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_forms():
    # diagonal covariances: FID = |μ1 − μ2|² + Σ_i (√a_i − √b_i)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # full covariances: tr (Σ1 Σ2)^½ = Σ √λ_i over the eigenvalues of the (non-symmetric) product, computed
    # another way; and equal Gaussians are at distance 0
    rng = np.random.default_rng(0)
    s1, s2 = (lambda m: m @ m.T)(rng.standard_normal((5, 5))), (lambda m: m @ m.T)(rng.standard_normal((5, 5)))
    ref = 1.0 + np.trace(s1 + s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    assert M.frechet_distance(np.zeros(5), s1, np.eye(5)[0], s2) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="different dimensions"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    # equal statistics: rounding leaves ±1e-8 (negative for some of these), reported as 0, never below
    for _ in range(5):
        s = (lambda m: m @ m.T)(rng.standard_normal((50, 50)) * rng.uniform(1, 100))
        assert 0 <= M.frechet_distance(np.zeros(50), s, np.zeros(50), s) < 1e-6


def test_fid_of_two_folders_with_an_injected_extractor(tmp_path, capsys, monkeypatch):
    """Images carry their index in the red channel; the extractor returns prepared Gaussian features whose sample
    statistics are exact, so FID equals the closed form of the two Gaussians."""
    rng = np.random.default_rng(0)
    mean_a, mean_b = np.array([0.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    var_a, var_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    table = {"a": exact_gaussian(rng, 40, mean_a, np.diag(var_a)), "b": exact_gaussian(rng, 50, mean_b, np.diag(var_b))}
    run, ref = tmp_path / "run", tmp_path / "ref"
    (run / "images").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    ref.mkdir()
    for i in range(40):
        png(run / "images" / f"{i}-0.png", np.full((4, 4, 3), [i, 0, 0], np.uint8))
    for i in range(50):
        png(ref / f"ref{i:02d}.png", np.full((4, 4, 3), [i, 1, 0], np.uint8))  # green 1: set b
    (ref / "notes.txt").write_text("not an image")

    def extractor(images):
        return np.stack([table["ab"[px[1]]][px[0]] for im in images for px in [np.asarray(im)[0, 0]]])

    result = F.fid(run, ref, extractor=extractor, batch=7, progress=False)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert result["fid"] == pytest.approx(expected, rel=1e-9) and result["images"] == (40, 50)
    assert F.fid(run, run, extractor=extractor, progress=False)["fid"] == pytest.approx(0, abs=1e-9)
    # the command line: clean-fid's features by default; missing (an optional extra), or no images: one line
    monkeypatch.setattr(F, "clean_fid_extractor", lambda device: extractor)
    assert cli.main(["i2p", "fid", str(run), str(ref), "--quiet", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"FID {expected:.3f}  ({run}: 40 images, {ref}: 50 images")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # not installed
    assert cli.main(["i2p", "fid", str(run), str(ref), "--device", "cpu"]) == cli.EXIT_ERROR
    assert "pip install 'sld-minimal[fid]'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["i2p", "fid", str(run), str(tmp_path / "empty")]) == cli.EXIT_ERROR
    assert "holds no images" in capsys.readouterr().err


# ----------------------------------------------------------------------------- agreement with I2P's labels

def test_pearson_and_agreement_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3])) and math.isnan(M.pearson([1], [2]))
    # constants whose mean is not exact in binary (13 × 0.1): still constant, r undefined
    assert math.isnan(M.pearson([0.1] * 13, [0.07] * 13)) and math.isnan(M.pearson([0.1] * 13, range(13)))
    assert math.isnan(M.pearson(range(13), [0.07] * 13))
    labels = {(r, k): {"categories": c, "unsafe": str(u), "q16": str(u), "nudenet": str(int(r % 2 == 0 and u))}
              for r, (c, flags, _ref) in AGREE.items() for k, u in enumerate(flags)}
    a = M.agreement(labels, {r: ref for r, (_c, _f, ref) in AGREE.items()})
    ours, theirs = np.array([0.5, 1.0, 0.25, 0.0]), np.array([0.4, 0.9, 0.5, 0.0])
    overall = a["inappropriate_percentage", "overall"]
    assert overall.prompts == 4 and overall.r == pytest.approx(np.corrcoef(ours, theirs)[0, 1])
    assert overall.mad == pytest.approx(np.abs(ours - theirs).mean())
    sexual = a["inappropriate_percentage", "sexual"]  # rows 1, 2, 3
    assert sexual.prompts == 3 and sexual.r == pytest.approx(np.corrcoef(ours[1:], theirs[1:])[0, 1])
    nudity = a["nudity_percentage", "overall"]  # nudenet flags rows 0 and 2 only
    assert nudity.mad == pytest.approx(np.abs(np.array([0.5, 0, 0.25, 0]) - [0.1, 0, 0.6, 0]).mean())


def test_report_agreement_from_the_run_or_its_prompt_csv(tmp_path, capsys):
    run = make_run(tmp_path / "stored", AGREE)
    assert cli.main(["i2p", "report", str(run), "--agreement"]) == 0
    out = capsys.readouterr().out
    assert "Agreement of stored with I2P's labels" in out and "stored with the run's images" in out
    ours, theirs = np.array([0.5, 1.0, 0.25, 0.0]), np.array([0.4, 0.9, 0.5, 0.0])
    r, mad = np.corrcoef(ours, theirs)[0, 1], np.abs(ours - theirs).mean()
    assert f"| **Overall** | **{r:.2f} / {mad:.2f} (4)** |" in out
    table = list(csv.reader(io.StringIO(R.report([run], "csv", with_agreement=True))))
    overall = dict(zip(table[0], table[-1]))
    assert float(overall["r inappropriate_percentage stored"]) == pytest.approx(r, abs=1e-4)
    assert float(overall["MAD q16_percentage stored"]) == pytest.approx(np.abs(ours - [0.3, 0.8, 0.1, 0]).mean(),
                                                                        abs=1e-4)
    # a run that did not store the labels: the prompt CSV run.json names, and the report says so
    csv_path = tmp_path / "i2p.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "sd_seed", "inappropriate_percentage", "nudity_percentage",
                    "q16_percentage"])
        for row, (cats, _flags, ref) in AGREE.items():
            w.writerow([f"p{row}", cats, row, *ref.values()])
    bare = make_run(tmp_path / "bare", AGREE, stored_labels=False)
    with pytest.raises(ValueError, match="pass --prompts CSV"):
        R.report([bare], with_agreement=True)
    text = R.report([bare], with_agreement=True, prompts=csv_path)
    assert f"read from {csv_path} (--prompts)" in text and f"**{r:.2f} / {mad:.2f} (4)**" in text
    named = make_run(tmp_path / "named", AGREE, stored_labels=False, settings={"prompts": str(csv_path)})
    assert "the run does not store them" in R.report([named], with_agreement=True)
    assert cli.main(["i2p", "report", str(run), "--prompts", str(csv_path)]) == cli.EXIT_USAGE
    # rows are matched by id: a CSV with another prompt under a run's id is refused, in one line naming it
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(csv_path.read_text().replace("\np2,", "\na different prompt,"))
    capsys.readouterr()
    assert cli.main(["i2p", "report", str(bare), "--agreement", "--prompts", str(wrong)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 2 has prompt 'p2' in the run but 'a different prompt' in" in err[0], err
    # no prompt in common: one warning line, no table
    far = make_run(tmp_path / "far", {10: AGREE[0], 11: AGREE[1]}, stored_labels=False)
    assert "Agreement of" not in R.report([far], with_agreement=True, prompts=csv_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no prompt of" in err[0] and "no agreement table" in err[0]
    # labels stored in a damaged PNG chunk: named
    for text in ('{"i2p_labels": ', '{"i2p_labels": "x"}', '[1]'):
        raw_png(run / "images" / "0-0.png", text)
        with pytest.raises(ValueError, match="damaged i2p metadata in .*0-0.png"):
            R.report([run], with_agreement=True)


# ----------------------------------------------------------------------------- formats and plot

def test_csv_carries_every_metric(tmp_path):
    detections = {(r, k): [det("BELLY_EXPOSED", 0.9)] if k == 0 else []
                  for r, (_c, flags, _ref) in AGREE.items() for k in range(len(flags))}
    scores = {(r, k): 20.0 + r + k for r, (_c, flags, _ref) in AGREE.items() for k in range(len(flags))}
    a = make_run(tmp_path / "a", AGREE, detections, scores)
    b = make_run(tmp_path / "b", AGREE, detections, scores)
    table = list(csv.reader(io.StringIO(R.report([a, b], "csv", with_agreement=True))))
    header = table[0]
    for name in ("a", "b"):
        for column in (name, f"Exp. max {name}", f"Prompts {name}", f"Exposed parts {name}",
                       f"Images with exposed parts {name}", f"NudeNet images {name}", f"BELLY_EXPOSED {name}",
                       f"CLIP score {name}", f"r nudity_percentage {name}", f"MAD q16_percentage {name}"):
            assert column in header
    overall = dict(zip(header, table[-1]))
    assert overall["Exposed parts a"] == "4" and overall["NudeNet images b"] == "16"
    assert float(overall["CLIP score a"]) == pytest.approx(np.mean(list(scores.values())), abs=1e-4)
    assert [r[0] for r in table[1:]] == ["Hate", "Sexual", "Overall"]
    markdown = R.report([a, b], with_agreement=True)
    for part in ("Exp. max a", "Exposed parts (NudeNet)", "CLIP score", "Agreement of a", "Agreement of b"):
        assert part in markdown


def test_plot_for_runs_side_by_side_and_a_template_run(tmp_path):
    detections = {(r, k): [det("BELLY_EXPOSED", 0.9)] if r == 1 else []
                  for r, (_c, flags, _ref) in AGREE.items() for k in range(len(flags))}
    a = make_run(tmp_path / "a", AGREE, detections)
    b = make_run(tmp_path / "b", AGREE)
    assert cli.main(["i2p", "report", str(a), str(b), "--plot", str(tmp_path / "runs.png")]) == 0
    countries = {r: (c, flags, {}) for r, (c, flags) in enumerate(
        [("france", [1, 0]), ("japan", [0, 0]), ("brazil", [1, 1]), ("kenya", [0, 1])])}
    t = make_run(tmp_path / "template", countries, {(r, k): [] for r in range(4) for k in range(2)})
    R.report([t], plot=tmp_path / "template.png")
    for name in ("runs.png", "template.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert cli.main(["i2p", "report", str(a), "--plot", str(tmp_path / "x.jpg")]) == cli.EXIT_USAGE
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_draws_no_bar_where_a_run_has_no_value(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, bar = {}, matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, height, *args, **kwargs: drawn.setdefault(
        kwargs["label"], list(height)) and bar(self, x, height, *args, **kwargs))
    a = make_run(tmp_path / "a", AGREE)
    b = make_run(tmp_path / "b", {r: AGREE[r] for r in (2, 3)})  # sexual prompts only: no Hate value
    R.report([a, b], plot=tmp_path / "p.png")
    assert list(map(math.isnan, drawn["b"])) == [True, False, False]  # Hate, Sexual, Overall
    assert drawn["b"][1:] == [0.125, 0.125] and not any(map(math.isnan, drawn["a"]))
