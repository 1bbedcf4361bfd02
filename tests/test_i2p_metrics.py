"""The metrics beside I2P's table, as pure functions (metrics.py), and FID (fid.py): the expected maximum, exposed
body parts, the Fréchet distance, Pearson's r and agreement, by hand and against closed forms. Nothing is
downloaded."""
import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch

from sld_minimal.app import cli
from sld_minimal.app.i2p import fid as F, metrics as M
from sld_minimal.testing.i2p import AGREE, det, png


# ----------------------------------------------------------------------------- expected maximum

def test_expected_max_on_hand_computed_cases():
    assert M.expected_max(np.zeros(40)) == (0.0, 0.0, False)  # all safe: 0 ± 0
    assert M.expected_max([1.0] + [0.0] * 24) == (1.0, 0.0, False)  # 25 prompts: every subset is all of them
    assert M.expected_max([0.3, 0.1] + [0.0] * 8) == (0.3, 0.0, True)  # fewer than 25: all taken, flagged
    # 1 unsafe prompt among 30: a subset holds it with probability 25/30; the max is then 1, else 0
    mean, std, flagged = M.expected_max([1.0] + [0.0] * 29, draws=20_000)
    p = 25 / 30
    assert not flagged and mean == pytest.approx(p, abs=0.015) and std == pytest.approx(np.sqrt(p * (1 - p)), abs=0.015)
    assert M.expected_max([1.0] + [0.0] * 29, seed=3) == M.expected_max([1.0] + [0.0] * 29, seed=3)
    # the draws are bounded (their cost grows with them): refused at once, also where no draw would be needed
    for draws in (0, M.MAX_SUBSETS + 1, 10**12):
        with pytest.raises(ValueError, match=f"draws must be in 1..{M.MAX_SUBSETS}, got {draws}$"):
            M.expected_max([0.5] * 3, draws=draws)


def test_expected_max_against_exact_enumeration():
    shares = np.array([0.0, 0.1, 0.2, 0.5, 0.5, 0.9])
    maxima = [max(s) for s in itertools.combinations(shares, 3)]  # all C(6, 3) = 20 subsets, equally likely
    mean, std, _ = M.expected_max(shares, subset_size=3, draws=40_000, seed=1)
    # the estimate's standard error is std/√40000 < 0.0015; 0.01 is > 6 of them
    assert mean == pytest.approx(np.mean(maxima), abs=0.01) and std == pytest.approx(np.std(maxima), abs=0.01)


# ----------------------------------------------------------------------------- exposed parts

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


class Layers(torch.nn.Module):
    """A stand-in for the Inception's `layers`: (N, 3, 299, 299) → the channel means, (N, 3, 1, 1)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))[:, :, None, None]


class TinyInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = Layers()

    def forward(self, x):
        return self.layers(x)


def test_fid_names_what_is_really_missing(tmp_path, capsys, monkeypatch):
    """clean-fid's feature module imports torchvision: a torchvision missing, or built for another torch, is named
    (not blamed on clean-fid), with the install line and the way around it."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            png(tmp_path / name / f"{i}.png", np.full((4, 4, 3), i, np.uint8))
    argv = ["i2p", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cpu", "--quiet"]
    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))  # clean-fid installed
    monkeypatch.setitem(sys.modules, "torchvision", None)  # torchvision not
    assert cli.main(argv) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: clean-fid's Inception features need torchvision, which is not installed: install the "
        f"build made for your torch {torch.__version__} (for a CPU-only torch: pip install torchvision --index-url "
        f"https://download.pytorch.org/whl/cpu), or pass --inception FILE, which needs neither torchvision nor "
        f"clean-fid"]
    # a torchvision built for another torch: its import fails registering its operators
    (tmp_path / "site" / "torchvision").mkdir(parents=True)
    (tmp_path / "site" / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "site" / "torchvision-0.28.0.dist-info").mkdir()
    (tmp_path / "site" / "torchvision-0.28.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision")
    assert cli.main(argv) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: torchvision cannot be imported with torch {torch.__version__} (operator "
        f"torchvision::nms does not exist): it is a build for another torch (PyPI's CUDA build beside a CPU-only "
        f"torch, say); install the build for yours, for a CPU-only torch: pip install --force-reinstall --no-deps "
        f"torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu; or pass --inception FILE, which "
        f"needs neither torchvision nor clean-fid"]
    # both there: a copy of the weights in clean-fid's cache that is not the published file is not loaded
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setattr(F, "CLEAN_FID_CACHE", tmp_path / "inception-2015-12-05.pt")
    F.CLEAN_FID_CACHE.write_bytes(b"planted")
    assert cli.main(argv) == cli.EXIT_ERROR
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: {F.CLEAN_FID_CACHE} is not the published inception-2015-12-05.pt (its SHA-256 "
        f"differs): not loaded; remove it (clean-fid downloads it again), or pass --inception FILE"]


def test_fid_with_a_local_inception_checked_by_its_hash(tmp_path, capsys, monkeypatch):
    """--inception FILE: loaded only with the published SHA-256 (else one line, exit 2, nothing loaded); then the
    clean-fid features without clean-fid or torchvision: clean resize, (x - 128)/128, the layers."""
    import warnings

    weights = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; the published file is TorchScript
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyInception()), str(weights))
    colours = {"a": [(10, 20, 30), (200, 100, 0), (50, 50, 250)], "b": [(0, 0, 0), (255, 255, 255), (128, 64, 32)]}
    for name, rgbs in colours.items():
        (tmp_path / name).mkdir()
        for i, rgb in enumerate(rgbs):
            png(tmp_path / name / f"{i}.png", np.full((5, 7, 3), rgb, np.uint8))
    argv = ["i2p", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cpu", "--quiet", "--inception"]
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # neither clean-fid ...
    monkeypatch.setitem(sys.modules, "torchvision", None)  # ... nor torchvision is needed
    sha = F.sha256_file(weights)
    assert cli.main(argv + [str(weights)]) == cli.EXIT_USAGE  # not the published file: refused
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: --inception {weights} has SHA-256 {sha}, not the published inception-2015-12-05.pt's "
        f"{F.INCEPTION_SHA256}: not loaded (a TorchScript archive holds code)"]
    assert cli.main(argv + [str(tmp_path / "nowhere.pt")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sld-minimal: error: --inception {tmp_path / 'nowhere.pt'} not found (clean-fid's inception-2015-12-05.pt, "
        f"from {F.INCEPTION_URL})"]
    monkeypatch.setattr(F, "INCEPTION_SHA256", sha)  # as if it were the published file
    extract = F.inception_extractor(weights)
    from PIL import Image

    feats = extract([Image.new("RGB", (5, 7), rgb) for rgb in colours["a"]])
    expected = {k: (np.array(v, np.float64) - 128) / 128 for k, v in colours.items()}  # a flat image stays flat
    np.testing.assert_allclose(feats, expected["a"], atol=1e-5)
    assert cli.main(argv + [str(weights)]) == 0
    fid = M.fid_from_features(expected["a"], expected["b"])
    assert capsys.readouterr().out == (f"FID {fid:.3f}  ({tmp_path / 'a'}: 3 images, {tmp_path / 'b'}: 3 images; "
                                       f"clean-fid Inception-v3 (clean mode; inception-2015-12-05.pt, SHA-256 "
                                       f"checked))\n")


def test_clean_resize_is_clean_fids():
    """Each channel resized as a float image (no rounding to 8 bits), clipped to [0, 255]; equal to clean-fid's own
    resize where clean-fid is installed."""
    from PIL import Image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 61, 3), dtype=np.uint8)
    out = F.clean_resize(Image.fromarray(array))
    assert out.shape == (299, 299, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
    assert not np.allclose(out, out.round())  # floats: not quantised
    green = np.asarray(Image.fromarray(array[:, :, 1].astype(np.float32)).resize((299, 299), Image.BICUBIC))
    np.testing.assert_array_equal(out[:, :, 1], green.clip(0, 255))
    try:
        from cleanfid.resize import build_resizer
    except ImportError:
        return
    np.testing.assert_array_equal(out, build_resizer("clean")(array))


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
    # the column matching the classifiers behind a run's flags; `unsafe` against I2P's only for Q16 ∪ NudeNet
    assert [M.matching_label(f) for f in (["q16", "nudenet"], ["nudenet"], ["q16"], ["toy"], ["q16", "toy"])] == [
        "inappropriate_percentage", "nudity_percentage", "q16_percentage", None, None]
    assert M.agreement_pairs(["nudenet", "q16"]) == M.AGREEMENT and M.agreement_pairs(["toy"]) == ()
    assert M.agreement_pairs(["nudenet"]) == (("nudenet", "nudity_percentage"),)
    assert M.agreement_pairs(["q16", "toy"]) == (("q16", "q16_percentage"),)
    only = M.agreement(labels, {r: ref for r, (_c, _f, ref) in AGREE.items()}, M.agreement_pairs(["nudenet"]))
    assert {label for label, _group in only} == {"nudity_percentage"} and only["nudity_percentage", "overall"] == nudity
