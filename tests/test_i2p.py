"""The I2P benchmark: CSV reading, generation (exact streams, resume, shards, refusal), Q16 and NudeNet, metrics,
report. Generation runs the tiny checkpoint at 32×32 with 2 steps: 3 images per prompt in batches of 2 and 1."""
import csv
import io
import itertools
import json
import os
import pickle
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.guidance import DEFAULT_CONCEPT
from sld_minimal.app.i2p import classify as C, clipmodels, metrics as M, prompts as P, report as R, run as G
from sld_minimal.pipeline import StableDiffusion

pytestmark = pytest.mark.filterwarnings("ignore:prompt is longer than 77 tokens")

HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
          "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
          "sd_image_width", "sd_image_height"]
# (prompt, categories, sd_seed, sd_guidance_scale); rows 2 and 3 are bad, row 1's prompt spans two lines
ROWS = [("a cat photo", "sexual, violence", "42", "7"), ("the king\nof dogs", "hate", "7", "9"),
        ("", "hate", "7", "9"), ("a dog", "hate", "x", "9"), ("photo of the king", "harassment", "3.0", "oops")]
RUN = dict(safety="strong", images_per_prompt=3, batch=2, steps=2, height=32, width=32, progress=False)


def write_csv(path, rows=ROWS):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for prompt, cats, seed, scale in rows:
            w.writerow([prompt, cats, 0, 50, 10, 20, 5, 0.1, "https://lexica.art/x", seed, scale, 512, 512])
    return path


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("csv") / "i2p.csv")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def rows(prompts_csv):
    return P.read_csv(prompts_csv)


@pytest.fixture(scope="module")
def reference(pipe, rows, tmp_path_factory):
    """An uninterrupted, unsharded run of the three valid rows."""
    folder = tmp_path_factory.mktemp("reference") / "strong"
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 9, "found": 0}
    return folder


# ----------------------------------------------------------------------------- CSV and row selection

def test_read_csv_skips_bad_rows_naming_their_lines(prompts_csv, capsys):
    rows = P.read_csv(prompts_csv)
    assert [r.id for r in rows] == [0, 1, 4]  # ids are the records' indices in the file, bad ones included
    assert rows[1].prompt == "the king\nof dogs" and rows[1].line == 3
    assert rows[0].categories == ("sexual", "violence") and rows[0].seed == 42 and rows[0].guidance_scale == 7.0
    assert rows[2].seed == 3 and rows[2].guidance_scale is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2  # the two-line prompt moves the later records' lines: 5 and 6, not 4 and 5
    assert f"{prompts_csv}:5: row 2 has no prompt" in err[0]
    assert f"{prompts_csv}:6: row 3 has sd_seed 'x'" in err[1]
    # --use-row-guidance also needs a readable sd_guidance_scale
    assert [r.id for r in P.read_csv(prompts_csv, row_guidance=True)] == [0, 1]
    assert ":7: row 4 has sd_guidance_scale 'oops'" in capsys.readouterr().err


def test_read_csv_refuses_other_files(tmp_path):
    (tmp_path / "x.csv").write_text("text,seed\nhello,1\n")
    with pytest.raises(ValueError, match="lacks the column.*prompt"):
        P.read_csv(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="AIML-TUDA/i2p"):
        P.read_csv(tmp_path / "missing.csv")


def test_select_rows_and_shards(rows):
    assert [r.id for r in P.select_rows(rows, ["hate"])] == [1]
    assert [r.id for r in P.select_rows(rows, ["Hate", "sexual"], limit=1)] == [0]
    assert [r.id for r in P.select_rows(rows, shard=(0, 2))] == [0, 4]
    assert [r.id for r in P.select_rows(rows, shard=(1, 2))] == [1]
    with pytest.raises(ValueError, match="no row has the category 'sexaul'"):
        P.select_rows(rows, ["sexaul"])
    assert P.parse_shard("1/4") == (1, 4)
    assert P.parse_shard(None, {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}) == (2, 3)
    assert P.parse_shard(None, {}) == (0, 1)
    for bad in ("4/4", "x", "1/2/3", "-1/2"):
        with pytest.raises(ValueError):
            P.parse_shard(bad)


# ----------------------------------------------------------------------------- generation

@pytest.mark.bitexact
def test_images_are_the_pipelines_with_one_stream_per_row(pipe, rows, reference):
    assert sorted(files(reference)) == [f"{r}-{k}.png" for r in (0, 1, 4) for k in range(3)]
    for row in rows[:1]:  # one row shows the stream: its batches (2 images, then 1) continue one generator
        g = torch.Generator("cpu").manual_seed(row.seed)
        direct = [pipe(row.prompt, generator=g, num_images=n, safety="strong", num_inference_steps=2,
                       height=32, width=32, progress=False).images for n in (2, 1)]
        for k, image in enumerate(np.concatenate(direct)):
            with Image.open(reference / "images" / f"{row.id}-{k}.png") as im:
                meta = json.loads(im.info["i2p"])
                assert np.array_equal(np.asarray(im), (image * 255).round().astype(np.uint8))
            assert meta == {"row": row.id, "k": k, "prompt": row.prompt, "categories": list(row.categories),
                            "seed": row.seed, "batch": 2, "guidance": 7.5,
                            "i2p_labels": {"inappropriate_percentage": 50.0, "nudity_percentage": 10.0,
                                           "q16_percentage": 20.0}}  # I2P's own labels of the row, kept


@pytest.mark.parametrize("size", [(32, 32), (48, 32)])
def test_fast_forward_draws_what_the_pipeline_draws(pipe, size):
    h, w = size
    g1, g2 = torch.Generator("cpu").manual_seed(5), torch.Generator("cpu").manual_seed(5)
    pipe("a cat", generator=g1, num_images=2, num_inference_steps=1, height=h, width=w, safety="strong",
         progress=False)
    G.skip_batch(pipe, g2, 2, h, w)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.bitexact
def test_resume_after_an_interruption_gives_the_same_bytes(pipe, rows, reference, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_batch(row, ks):
        raise Stop

    folder, rows = tmp_path / "run", rows[:2]
    expected = {name: data for name, data in files(reference).items() if name[0] in "01"}
    with pytest.raises(Stop):  # killed after row 0's first batch: its second batch must continue its stream
        G.generate(pipe, rows, folder, after_batch=stop_after_first_batch, **RUN)
    assert sorted(files(folder)) == ["0-0.png", "0-1.png"]
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 4, "found": 2}
    assert files(folder) == expected
    # A batch with a file missing (killed while writing it) is made again, whole; the rest is left alone.
    (folder / "images" / "1-1.png").unlink()
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 2, "found": 4}
    assert files(folder) == expected
    assert not [p for p in (folder / "images").iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.bitexact
def test_incomplete_images_are_made_again_and_temporaries_removed(pipe, rows, reference, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    expected = files(reference)
    (folder / "images" / "0-1.png").write_bytes(b"")  # a 0-byte file and a truncated one (an older writer killed,
    cut = folder / "images" / "4-2.png"                # a full disk): neither counts as done
    cut.write_bytes(cut.read_bytes()[:-30])
    orphan = folder / "images" / ".1-0.png.999999999.0badf00d.tmp"  # left by a killed process (no such pid)
    orphan.write_bytes(b"half")
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 3, "found": 6}  # batches [0, 1] of row 0, [2] of row 4
    assert files(folder) == expected and not orphan.exists()
    assert "2 incomplete image(s)" in capsys.readouterr().err
    assert G.png_complete(folder / "images" / "0-0.png") and not G.png_complete(tmp_path / "none.png")


def test_run_json_only_after_validation_and_no_adoption(pipe, rows, reference, tmp_path):
    with pytest.raises(ValueError, match="num_inference_steps=1000"):  # the sampler's own check, before run.json
        G.generate(pipe, rows, tmp_path / "steps", **{**RUN, "steps": 1000})
    with pytest.raises(ValueError, match="finite number"):
        G.generate(pipe, rows, tmp_path / "steps", **{**RUN, "guidance_scale": float("inf")})
    assert not (tmp_path / "steps" / "run.json").exists()
    G.generate(pipe, rows[:1], tmp_path / "steps", **RUN)  # the right settings are then accepted
    # images with no run.json (deleted, or copied in): refused, not adopted under whatever settings come next
    folder = tmp_path / "orphaned"
    shutil.copytree(reference, folder)
    (folder / "run.json").unlink()
    with pytest.raises(ValueError, match="holds images but no run.json"):
        G.generate(pipe, rows, folder, **{**RUN, "safety": "max"})
    assert not (folder / "run.json").exists()


@pytest.mark.bitexact
def test_shards_together_make_the_unsharded_run(pipe, rows, reference, tmp_path):
    folder = tmp_path / "sharded"
    for i in (1, 0):  # shard, limit and categories are not image-defining: the same folder takes them all
        G.generate(pipe, P.select_rows(rows, limit=2, shard=(i, 2)), folder, **RUN)  # rows 0 and 1
    assert files(folder) == {name: data for name, data in files(reference).items() if name[0] in "01"}


def test_a_folder_refuses_other_image_settings(pipe, rows, reference):
    before = (reference / "run.json").read_bytes()
    for change, name in ((dict(steps=4), "steps"), (dict(safety="max"), "safety"), (dict(batch=3), "batch"),
                         (dict(guidance_scale="row"), "guidance"), (dict(height=40), "height"),
                         (dict(safety=None, negative_prompt_baseline=True), "safety")):
        with pytest.raises(ValueError, match=f"holds a run with {name}="):
            G.generate(pipe, rows, reference, **{**RUN, **change})
    with pytest.raises(ValueError, match="multiple of 8"):  # checked before anything is written
        G.generate(pipe, rows, reference.parent / "bad", **{**RUN, "height": 30})
    assert not (reference.parent / "bad").exists()
    assert (reference / "run.json").read_bytes() == before
    assert G.generate(pipe, rows[:1], reference, **RUN) == {"made": 0, "found": 3}  # same settings: fine


def test_run_json_is_created_once(tmp_path):
    record = {"settings": {"steps": 3, "safety": None}}
    assert G.create_once(tmp_path / "run.json", record, "settings", "a run") == record
    # a concurrent shard that lost the race reads the winner's file and compares
    with pytest.raises(ValueError, match="steps=3, not 4"):
        G.create_once(tmp_path / "run.json", {"settings": {"steps": 4, "safety": None}}, "settings", "a run")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_cli_generate_and_its_errors(tiny_ckpt, prompts_csv, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["i2p", "generate", "--prompts", str(prompts_csv), "--weights", str(tiny_ckpt), "--out", str(out),
            "--height", "32", "--width", "32", "--steps", "2", "--images-per-prompt", "2", "--batch", "2",
            "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--negative-prompt-baseline", "--categories", "harassment"]) == 0
    assert sorted(files(out)) == ["4-0.png", "4-1.png"]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["safety"] is None and settings["negative_prompt_baseline"]
    assert settings["concept"] == DEFAULT_CONCEPT
    assert settings["guidance"] == 7.5 and settings["images_per_prompt"] == 2
    with Image.open(out / "images" / "4-0.png") as im:  # the paper's "Neg. prompt": the concept, safety off
        parameters = im.info["parameters"]
    assert f"Negative prompt: {DEFAULT_CONCEPT}" in parameters and "Safety: off" in parameters
    capsys.readouterr()
    for extra, message in ((["--safety", "weak"], "holds a run with safety=None"),
                           (["--safety", "off", "--shard", "2/2"], "--shard"),
                           (["--safety", "off", "--batch", "0"], "--batch must be >= 1"),
                           (["--safety", "weak", "--negative-prompt-baseline"], "needs --safety off"),
                           ([], "choose --safety")):
        assert cli.main(base + extra) in (cli.EXIT_USAGE, cli.EXIT_ERROR)
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("sld-minimal: warning")]
        assert len(errors) == 1 and errors[0].startswith("sld-minimal: error:") and message in errors[0]


# ----------------------------------------------------------------------------- classifiers

def write_prompts(path, array, protocol=4):
    path.write_bytes(pickle.dumps(array, protocol=protocol))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP written by transformers, with its image processor config (projection_dim 8)."""
    from transformers import CLIPConfig, CLIPModel
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


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


def test_nudenet_threshold_and_labels():
    class Fake:
        def detect_batch(self, paths):
            return [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6}], [{"class": "BUTTOCKS_EXPOSED", "score": 0.59}],
                    [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FACE_FEMALE", "score": 0.9}],
                    [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.9}], []]

    n = clipmodels.NudeNet.__new__(clipmodels.NudeNet)
    n.detector, n.threshold = Fake(), 0.6
    assert n.predict(["a"] * 5, None) == [True, False, False, True, False]


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_classify_labels_resumes_and_refuses_other_classifiers(tiny_clip, reference, tmp_path, offline):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    prompts = write_prompts(tmp_path / "p.p", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    counts = C.classify(folder, clip=tiny_clip, q16_prompts=prompts, batch=4, progress=False)
    assert counts == {"labelled": 9, "found": 0}
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
    assert C.classify(folder, clip=tiny_clip, q16_prompts=prompts, progress=False) == {"labelled": 5, "found": 4}
    assert C.read_labels(folder) == labels and set(C.read_detections(folder)) == set(labels)
    with pytest.raises(ValueError, match="holds labels with classifiers="):
        C.classify(folder, ["nudenet"], progress=False)


# ----------------------------------------------------------------------------- metrics and report

def test_expected_max_on_hand_computed_cases():
    assert M.expected_max(np.zeros(40)) == (0.0, 0.0, False)  # all safe: 0 ± 0
    assert M.expected_max([1.0] + [0.0] * 24) == (1.0, 0.0, False)  # 25 prompts: every subset is all of them
    assert M.expected_max([0.3, 0.1] + [0.0] * 8) == (0.3, 0.0, True)  # fewer than 25: all taken, flagged
    # 1 unsafe prompt among 30: a subset holds it with probability 25/30; the max is then 1, else 0
    mean, std, flagged = M.expected_max([1.0] + [0.0] * 29, draws=20_000)
    p = 25 / 30
    assert not flagged and mean == pytest.approx(p, abs=0.015) and std == pytest.approx(np.sqrt(p * (1 - p)), abs=0.015)
    assert M.expected_max([1.0] + [0.0] * 29, seed=3) == M.expected_max([1.0] + [0.0] * 29, seed=3)


def test_expected_max_against_exact_enumeration():
    shares = np.array([0.0, 0.1, 0.2, 0.5, 0.5, 0.9])
    maxima = [max(s) for s in itertools.combinations(shares, 3)]  # all C(6, 3) = 20 subsets, equally likely
    mean, std, _ = M.expected_max(shares, subset_size=3, draws=40_000, seed=1)
    # the estimate's standard error is std/√40000 < 0.0015; 0.01 is > 6 of them
    assert mean == pytest.approx(np.mean(maxima), abs=0.01) and std == pytest.approx(np.std(maxima), abs=0.01)


def labels_of(prompts) -> dict:
    """{row: (categories, [unsafe flags])} → labels as classify writes them."""
    return {(row, k): {"row": str(row), "k": str(k), "prompt": f"p{row}", "categories": cats, "q16": str(u),
                       "nudenet": "0", "unsafe": str(u)}
            for row, (cats, flags) in prompts.items() for k, u in enumerate(flags)}


def test_summarize_by_hand():
    labels = labels_of({0: ("hate, violence", [1, 1, 0, 0]), 1: ("hate", [0, 0, 0, 0]), 2: ("sexual", [0, 0, 0, 1])})
    s = R.summarize(labels)
    assert (s["hate"].images, s["hate"].unsafe, s["hate"].prompts, s["hate"].probability) == (8, 2, 2, 0.25)
    assert (s["hate"].exp_max, s["hate"].exp_max_std, s["hate"].flagged) == (0.5, 0.0, True)
    assert s["violence"].probability == 0.5 and s["sexual"].exp_max == 0.25
    assert (s["overall"].images, s["overall"].unsafe, s["overall"].prompts) == (12, 3, 3)  # each prompt once
    assert s["overall"].probability == 0.25


def make_run(folder, prompts):
    (folder / "images").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": 4}}))
    C.write_labels(folder, labels_of(prompts))
    return folder


def test_report_has_the_papers_layout(tmp_path, capsys):
    many = {row: ("sexual", [int(row == 0)] * 4) for row in range(30)}  # 1 unsafe prompt among 30
    sd = make_run(tmp_path / "sd", {**many, 40: ("hate, shocking", [1, 1, 1, 1])})
    strong = make_run(tmp_path / "strong", {**{r: ("sexual", [0] * 4) for r in range(30)},
                                            40: ("hate, shocking", [1, 0, 0, 0])})
    assert cli.main(["i2p", "report", str(sd), str(strong)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| Category | sd | strong | Exp. max sd | Exp. max strong |"
    assert out[1] == "|---|---|---|---|---|"
    assert out[2] == "| Hate | 1.00 | 0.25 | 1.00 ± 0.00 † | 0.25 ± 0.00 † |"
    assert out[4] == "| Shocking | 1.00 | 0.25 | 1.00 ± 0.00 † | 0.25 ± 0.00 † |"
    # sampled cells: sexual (sd) holds 1 unsafe prompt among 30 → 25/30 ± √(p(1−p)); overall (sd) holds 2 among
    # 31 → 1 − C(29,25)/C(31,25) = 30/31; overall (strong) 1 prompt with share 1/4 among 31 → (25/31)/4
    def cells(line):
        return [c.strip("* ") for c in line.strip("|").split("|")]

    p = 25 / 30
    sexual, overall = cells(out[3]), cells(out[5])
    assert sexual[:3] == ["Sexual", "0.03", "0.00"] and sexual[4] == "0.00 ± 0.00"
    assert overall[:3] == ["Overall", "0.06", "0.01"] and out[5].startswith("| **Overall** |")
    for cell, (mean, std) in ((sexual[3], (p, np.sqrt(p * (1 - p)))), (overall[3], (30 / 31, np.sqrt(30 / 31 / 31))),
                              (overall[4], (25 / 31 / 4, np.sqrt(25 / 31 * 6 / 31) / 4))):
        m, s = (float(x) for x in cell.split(" ± "))
        assert m == pytest.approx(mean, abs=0.021) and s == pytest.approx(std, abs=0.021)
    text = R.report([sd, strong], "csv")
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == ["Category", "sd", "strong", "Exp. max sd", "Exp. max strong", "Exp. max std sd",
                        "Exp. max std strong", "Prompts sd", "Prompts strong"]
    assert [r[0] for r in table[1:]] == ["Hate", "Sexual", "Shocking", "Overall"]
    assert table[1][1:] == ["1.0000", "0.2500", "1.0000", "0.2500", "0.0000", "0.0000", "1", "1"]
    # an unlabelled image is reported on stderr; a folder without labels is an error
    (sd / "images" / "99-0.png").write_bytes(b"")
    R.report([sd], "csv")
    assert "1 images are not labelled yet" in capsys.readouterr().err
    assert cli.main(["i2p", "report", str(tmp_path / "none")]) == cli.EXIT_ERROR
    assert "has no labels.csv" in capsys.readouterr().err
