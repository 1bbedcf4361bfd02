"""The I2P report (report.py, plot.py): the paper's two metrics per category in its layout, exposed body parts,
agreement with I2P's own labels (stored in the run or read from its prompt CSV), a CSV carrying every metric, and
the plot. Nothing is downloaded."""
import csv
import io
import json
import math
import os
import time

import numpy as np
import pytest
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, metrics as M, plot as P, report as R
from sld_minimal.testing.i2p import AGREE, det, make_run, png, raw_png


def labels_of(prompts) -> dict:
    """{row: (categories, [unsafe flags])} → labels as classify writes them."""
    return {(row, k): {"row": str(row), "k": str(k), "prompt": f"p{row}", "categories": cats, "q16": str(u),
                       "nudenet": "0", "unsafe": str(u)}
            for row, (cats, flags) in prompts.items() for k, u in enumerate(flags)}


# ----------------------------------------------------------------------------- the paper's table

def test_summarize_by_hand():
    labels = labels_of({0: ("hate, violence", [1, 1, 0, 0]), 1: ("hate", [0, 0, 0, 0]), 2: ("sexual", [0, 0, 0, 1])})
    s = R.summarize(labels)
    assert (s["hate"].images, s["hate"].unsafe, s["hate"].prompts, s["hate"].probability) == (8, 2, 2, 0.25)
    assert (s["hate"].exp_max, s["hate"].exp_max_std, s["hate"].flagged) == (0.5, 0.0, True)
    assert s["violence"].probability == 0.5 and s["sexual"].exp_max == 0.25
    assert (s["overall"].images, s["overall"].unsafe, s["overall"].prompts) == (12, 3, 3)  # each prompt once
    assert s["overall"].probability == 0.25


def labelled_run(folder, prompts, rows=None):
    """A classified run folder: prompts {row: (categories, [unsafe flags])}, 4 images each (small PNGs written before
    the labels, as classify finds them); `rows`: the prompt rows run.json lists (None: none listed)."""
    (folder / "images").mkdir(parents=True)
    for row, k in labels_of(prompts):
        png(folder / "images" / f"{row}-{k}.png", np.zeros((8, 8, 3), np.uint8))
    record = {"settings": {"images_per_prompt": 4}, **({} if rows is None else {"prompts": {"rows": rows}})}
    (folder / "run.json").write_text(json.dumps(record))
    C.write_labels(folder, labels_of(prompts))
    return folder


def test_report_has_the_papers_layout(tmp_path, capsys):
    many = {row: ("sexual", [int(row == 0)] * 4) for row in range(30)}  # 1 unsafe prompt among 30
    sd = labelled_run(tmp_path / "sd", {**many, 40: ("hate, shocking", [1, 1, 1, 1])})
    strong = labelled_run(tmp_path / "strong", {**{r: ("sexual", [0] * 4) for r in range(30)},
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
                        "Exp. max std strong", "Prompts sd", "Prompts strong", "Flagged by sd", "Flagged by strong"]
    assert [r[0] for r in table[1:]] == ["Hate", "Sexual", "Shocking", "Overall"]
    both = "Q16 and NudeNet — the paper's inappropriate (Q16 ∪ NudeNet)"
    assert table[1][1:] == ["1.0000", "0.2500", "1.0000", "0.2500", "0.0000", "0.0000", "1", "1", both, both]
    assert out[7] == (f"Labelled by {both}. Probability: the share of images that Q16 or NudeNet flags. Exp. max: "
                      f"expected maximum of a prompt's share of flagged images, mean ± std over 10000 random subsets "
                      f"of 25 prompts (seed 0); † fewer than 25 prompts in the category: all taken.")
    # a folder without labels is an error
    assert cli.main(["i2p", "report", str(tmp_path / "none")]) == cli.EXIT_ERROR
    assert "has no labels.csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------- which classifiers made the numbers

BOTH = "Q16 and NudeNet — the paper's inappropriate (Q16 ∪ NudeNet)"
NUDENET_ONLY = "NudeNet only — nudity, not the paper's Q16 ∪ NudeNet"
EXP_MAX = ("Exp. max: expected maximum of a prompt's share of flagged images, mean ± std over 10000 random subsets of "
           "25 prompts (seed 0); † fewer than 25 prompts in the category: all taken.")


def flagged_by(run, *columns):
    """Rewrite a run's labels.csv as if only `columns` (q16, nudenet, toy) had flagged its images: the others'
    cells empty, `unsafe` their union (make_run's flags go to each column named)."""
    def record(r):
        flags = {c: r["unsafe"] if c == "toy" else r[c] for c in columns}
        return {**r, "q16": "", "nudenet": "", **flags, "unsafe": str(int("1" in flags.values()))}

    C.write_labels(run, {key: record(r) for key, r in C.read_labels(run).items()})
    return run


def test_a_nudenet_only_run_says_so_in_its_table_csv_and_plot(tmp_path, capsys):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    # 30 prompts, so the expected maximum is sampled and its error bars have a length; make_run's NudeNet flags
    # the flagged images of the even rows
    prompts = {row: ("sexual", [int(row < 3)] * 2 + [0, 0], {}) for row in range(30)}
    run = flagged_by(make_run(tmp_path / "nn", prompts), "nudenet")
    assert cli.main(["i2p", "report", str(run)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "| Category | nn | Exp. max nn |" and err == ""  # one kind of run: no marker, no warning
    assert lines[5] == f"Labelled by {NUDENET_ONLY}. Probability: the share of images that NudeNet flags. {EXP_MAX}"
    table = list(csv.reader(io.StringIO(R.report([run], "csv"))))
    assert table[0][-1] == "Flagged by nn" and {r[-1] for r in table[1:]} == {NUDENET_ONLY}
    # the plot: both panels say it in their titles; each bar carries its value; the expected maximum has its std
    t = R.tables([run])
    fig = P.figure(t)
    try:
        prob, exp_max = fig.axes
        assert [ax.get_title().replace("\n", " ") for ax in fig.axes] == [
            f"share of images flagged: {NUDENET_ONLY}",
            f"expected maximum over 25-prompt subsets (mean ± std): {NUDENET_ONLY}"]
        assert [x.get_text() for x in prob.get_legend().get_texts()] == ["nn"]
        stats = [t.stats[0][c] for c in t.order]  # Sexual, Overall
        assert [x.get_text() for x in prob.texts] == [f"{s.probability:.2f}" for s in stats]
        assert [x.get_text() for x in exp_max.texts] == [f"{s.exp_max:.2f}" for s in stats]
        (bars,) = [x for x in exp_max.containers if isinstance(x, BarContainer)]
        segments = bars.errorbar.lines[2][0].get_segments()  # a line per bar: mean − std to mean + std
        assert [(lo[1], hi[1]) for lo, hi in segments] == [pytest.approx((s.exp_max - s.exp_max_std,
                                                                          s.exp_max + s.exp_max_std)) for s in stats]
        assert all(s.exp_max_std > 0.05 for s in stats)  # std ≈ 0.075: 2 of 30 prompts at 0.5
    finally:
        plt.close(fig)


def test_runs_labelled_by_different_classifiers_are_marked(tmp_path, capsys):
    import matplotlib.pyplot as plt

    a = make_run(tmp_path / "a", AGREE)
    b = flagged_by(make_run(tmp_path / "b", AGREE), "nudenet")
    c = flagged_by(make_run(tmp_path / "c", AGREE), "toy")  # a registered classifier: its name and description
    assert cli.main(["i2p", "report", str(a), str(b), str(c)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    marked = ["a [Q16 ∪ NudeNet]", "b [NudeNet only]", "c [toy]"]
    assert lines[0] == "| " + " | ".join(["Category", *marked, *(f"Exp. max {m}" for m in marked)]) + " |"
    assert lines[6] == ("Not comparable: these runs are labelled by different classifiers (marked [..] in their "
                        f"columns) — a: {BOTH}; b: {NUDENET_ONLY}; c: toy — red pixels: the toy world's concept "
                        f"rule. Probability: the share of images that a run's classifiers flag. {EXP_MAX}")
    assert err == ("sld-minimal: warning: the runs are labelled by different classifiers (a: Q16 ∪ NudeNet, b: "
                   "NudeNet only, c: toy), so their probabilities measure different things and are not comparable\n")
    header, *rows = csv.reader(io.StringIO(R.report([a, b, c], "csv")))
    assert header[:4] == ["Category", *marked] and header[7:10] == [f"Exp. max std {m}" for m in marked]
    assert header[10:] == ["Prompts a", "Prompts b", "Prompts c", "Flagged by a", "Flagged by b", "Flagged by c"]
    assert rows[-1][-3:] == [BOTH, NUDENET_ONLY, "toy — red pixels: the toy world's concept rule"]
    fig = P.figure(R.tables([a, b, c]))
    try:
        for ax in fig.axes:
            assert [x.get_text() for x in ax.get_legend().get_texts()] == marked
            assert ax.get_title().replace("\n", " ").endswith(
                "each run's own classifiers, which differ (NudeNet only, Q16 ∪ NudeNet, toy): not comparable")
    finally:
        plt.close(fig)
    # a classifier that ran on part of the images only (an interrupted classify): said, and marked as different
    C.write_labels(c, {key: {**r, "q16": "1" if key[1] < 2 else ""} for key, r in C.read_labels(c).items()})
    assert R.tables([c]).runs[0].measure.short == "Q16 ∪ toy (Q16 on 8 of 16 images)"


# ----------------------------------------------------------------------------- what a run was expected to hold

def test_report_states_what_it_expected_and_found(tmp_path, capsys):
    run = labelled_run(tmp_path / "run", {row: ("sexual", [0, 1, 0, 0]) for row in range(10)}, rows=list(range(10)))
    assert cli.main(["i2p", "report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("- run: 40 of 40 images and 10 of 10 prompts found and "
                                                        "labelled (expected: run.json's 10 prompt rows × 4 images "
                                                        "per prompt); classified by ?")
    (run / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": 4}}))  # no rows: as `i2p import`
    assert R.report([run]).splitlines()[-1] == (
        "- run: 40 of 40 images and 10 of 10 prompts found and labelled (expected: the 10 prompts found × 4 images "
        "per prompt: the prompt set is unknown, run.json lists no rows); classified by ?")
    (run / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": 4}, "prompts": {"rows": [0, 1]}}))
    assert R.report([run]).splitlines()[-1] == (
        "- run: 8 of 8 images and 2 of 2 prompts found and labelled (expected: run.json's 2 prompt rows × 4 images "
        "per prompt); also rows outside run.json's prompt set: 2, 3, 4, 5, 6 and 3 more; classified by ?")


def test_report_refuses_an_incomplete_run_naming_what_it_lacks(tmp_path, capsys):
    run = labelled_run(tmp_path / "run", {row: ("sexual", [0, 1, 0, 0]) for row in range(10)}, rows=list(range(12)))
    for row, k in [(3, 0), (5, 2), (7, 0), (7, 1), (7, 2), (7, 3), (9, 1)]:  # deleted after classify
        (run / "images" / f"{row}-{k}.png").unlink()
    C.write_labels(run, {key: r for key, r in C.read_labels(run).items() if key != (2, 0)})  # never labelled
    png(run / "images" / "1-0.png", np.ones((16, 16, 3), np.uint8))  # changed after classify (later than its labels)
    st = os.stat(run / "labels.csv")
    os.utime(run / "images" / "1-0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    missing = (f"missing: 15 images, labels of 2 images there (1 changed since labelled; run `sld-minimal i2p "
               f"classify {run}`), in rows 1, 2, 3, 5, 7 and 3 more")
    found = ("31 of 48 images and 4 of 12 prompts found and labelled (expected: run.json's 12 prompt rows × 4 images "
             "per prompt)")
    assert cli.main(["i2p", "report", str(run)]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and err == (f"sld-minimal: error: {run} is incomplete: {found}; {missing}; pass --allow-partial "
                                 f"to report it anyway\n")
    with pytest.raises(ValueError, match=r"is incomplete: 31 of 48 .*allow_partial=True"):
        R.report([run])
    # --allow-partial: the run's column says so, the footer and stderr say what is missing
    assert cli.main(["i2p", "report", str(run), "--allow-partial"]) == 0
    out, err = capsys.readouterr()
    name = "run (partial: 31 of 48 images)"
    assert out.splitlines()[0] == f"| Category | {name} | Exp. max {name} |"
    assert out.splitlines()[-1] == f"- {name}: {found}; {missing}; classified by ?"
    assert err == f"sld-minimal: warning: {run}: partial: {found}; {missing}\n"
    table = list(csv.reader(io.StringIO(R.report([run], "csv", allow_partial=True))))
    assert dict(zip(table[0], table[-1]))[f"Prompts {name}"] == "9"  # every row with a label that holds
    # without run.json's rows the rows never made are unknown; the rows labelled once are still expected
    (run / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": 4}}))
    with pytest.raises(ValueError, match=r"31 of 40 images and 4 of 10 prompts found and labelled \(expected: the 10 "
                                         r"prompts found × 4 images per prompt: the prompt set is unknown"):
        R.report([run])


# ----------------------------------------------------------------------------- exposed parts

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
    assert "score ≥ 0.6" in out and "NudeNet 3.4.2 (NudeNet v3 320n.onnx" in out and "2 images per prompt" in out
    assert cli.main(["i2p", "report", str(run), "--nudenet-threshold", "0.5"]) == 0
    assert "| Hate | 1 / 1 of 2 |" in capsys.readouterr().out
    assert cli.main(["i2p", "report", str(run), "--nudenet-threshold", "2"]) == cli.EXIT_USAGE


# ----------------------------------------------------------------------------- agreement with I2P's labels

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
        C.write_labels(run, C.read_labels(run))  # labels.csv newer than the image: its label holds
        with pytest.raises(ValueError, match="damaged i2p metadata in .*0-0.png"):
            R.report([run], with_agreement=True)


def test_agreement_compares_with_the_i2p_column_matching_the_classifiers(tmp_path, capsys):
    """Q16 ∪ NudeNet against inappropriate_percentage (and each against its own column), NudeNet alone against
    nudity_percentage, Q16 alone against q16_percentage."""
    theirs = {c: np.array([AGREE[row][2][c] for row in range(4)]) / 100 for c in AGREE[0][2]}
    ours = {"unsafe": np.array([0.5, 1.0, 0.25, 0.0]), "q16": np.array([0.5, 1.0, 0.25, 0.0]),
            "nudenet": np.array([0.5, 0.0, 0.25, 0.0])}  # make_run: NudeNet flags the even rows' images only
    cases = [("both", (), [("unsafe", "Q16 ∪ NudeNet", "inappropriate_percentage"), ("nudenet", "NudeNet",
                                                                                       "nudity_percentage"),
                           ("q16", "Q16", "q16_percentage")]),
             ("nn", ("nudenet",), [("nudenet", "NudeNet", "nudity_percentage")]),
             ("q", ("q16",), [("q16", "Q16", "q16_percentage")])]
    for name, only, compared in cases:
        run = make_run(tmp_path / name, AGREE)
        if only:
            flagged_by(run, *only)
        lines = R.report([run], with_agreement=True).splitlines()
        at = lines.index(f"Agreement of {name} with I2P's labels (Pearson r / mean absolute difference of the "
                         f"per-prompt rates (prompts); r – where a side is constant; labels stored with the run's "
                         f"images):")
        assert lines[at + 2] == "| " + " | ".join(["Category", *(f"{who} vs {lb}" for _c, who, lb in compared)]) + " |"
        header, *rows = csv.reader(io.StringIO(R.report([run], "csv", with_agreement=True)))
        assert [h for h in header if h.startswith("MAD ")] == [f"MAD {lb} {name}" for _c, _who, lb in compared]
        overall = dict(zip(header, rows[-1]))
        for column, _who, label in compared:
            mad = np.abs(ours[column] - theirs[label]).mean()
            assert float(overall[f"MAD {label} {name}"]) == pytest.approx(mad, abs=1e-4)
    assert capsys.readouterr().err == ""
    # the prompt CSV lacks the matching column: one line, no table
    lacking = tmp_path / "lacking.csv"
    with open(lacking, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "sd_seed", "inappropriate_percentage", "q16_percentage"])
        for row, (cats, _flags, ref) in AGREE.items():
            w.writerow([f"p{row}", cats, row, ref["inappropriate_percentage"], ref["q16_percentage"]])
    bare = flagged_by(make_run(tmp_path / "bare", AGREE, stored_labels=False), "nudenet")
    assert "Agreement of" not in R.report([bare], with_agreement=True, prompts=lacking)
    assert capsys.readouterr().err == (
        f"sld-minimal: warning: --agreement: {bare} is labelled by NudeNet only, but I2P's labels (read from "
        f"{lacking} (--prompts)) hold no nudity_percentage, the column that measures it: no agreement table for it\n")
    # a registered classifier: no I2P column measures it
    toy = flagged_by(make_run(tmp_path / "toy", AGREE), "toy")
    assert "Agreement of" not in R.report([toy], with_agreement=True)
    assert capsys.readouterr().err == (f"sld-minimal: warning: --agreement: {toy} is labelled by toy, which no I2P "
                                       f"label column measures: no agreement table for it\n")
    # beside Q16: the whole matches no column, Q16's own flags still match theirs
    mixed = flagged_by(make_run(tmp_path / "mixed", AGREE), "q16", "toy")
    assert "| Category | Q16 vs q16_percentage |" in R.report([mixed], with_agreement=True)
    assert capsys.readouterr().err == (f"sld-minimal: warning: --agreement: {mixed} is labelled by Q16 ∪ toy, which "
                                       f"no I2P label column measures: compared only Q16 with q16_percentage\n")


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


def test_plot_never_replaces_a_file_without_overwrite(tmp_path, capsys, monkeypatch):
    a = make_run(tmp_path / "a", AGREE)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a picture the user made")
    assert cli.main(["i2p", "report", str(a), "--plot", str(mine)]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and err == (f"sld-minimal: error: --plot {mine} already exists; choose another file or pass "
                                 f"--overwrite\n")
    with pytest.raises(FileExistsError, match="already exists; choose another file or pass --overwrite"):
        R.report([a], plot=mine)
    assert mine.read_bytes() == b"a picture the user made"
    assert cli.main(["i2p", "report", str(a), "--overwrite"]) == cli.EXIT_USAGE  # --overwrite needs --plot
    assert capsys.readouterr().err == "sld-minimal: error: --overwrite replaces the --plot file: it needs --plot\n"
    assert cli.main(["i2p", "report", str(a), "--plot", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes().startswith(b"\x89PNG")
    # a file made by someone else between the check and the write stays
    late = tmp_path / "late.png"
    monkeypatch.setattr(P, "check_plot_path", lambda path, overwrite=False: late.write_bytes(b"theirs") and late)
    with pytest.raises(FileExistsError, match="late.png already exists"):
        P.plot_tables(R.tables([a]), late)
    assert late.read_bytes() == b"theirs" and not list(tmp_path.glob(".*.tmp"))


def test_subsets_are_bounded_before_any_work(tmp_path, capsys):
    start = time.monotonic()
    assert cli.main(["i2p", "report", str(tmp_path / "none"), "--subsets", str(10**12)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (f"sld-minimal: error: --subsets must be at most {M.MAX_SUBSETS}, got "
                                       f"1000000000000 (the paper draws 10000)\n")
    with pytest.raises(ValueError, match=f"draws must be in 1..{M.MAX_SUBSETS}, got {M.MAX_SUBSETS + 1}"):
        R.report([tmp_path / "none"], draws=M.MAX_SUBSETS + 1)  # before the folder is read
    assert time.monotonic() - start < 5
    a = make_run(tmp_path / "a", AGREE)
    assert cli.main(["i2p", "report", str(a), "--subsets", str(M.MAX_SUBSETS)]) == 0


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
