"""I2P prompt sets (prompts.py): reading I2P's CSV (bad rows named by their line) and any other prompt CSV (columns
named by the caller, I2P's own labels kept), choosing rows and shards, prompt templates and seed lists."""
import csv

import pytest

from sld_minimal.app import cli
from sld_minimal.app.i2p import prompts as P
from sld_minimal.testing.i2p import ERASURE, write


# ----------------------------------------------------------------------------- I2P's CSV

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


def test_i2p_label_columns_are_kept_per_row(i2p_csv):
    rows = P.read_csv(i2p_csv)
    assert rows[1].labels == {"inappropriate_percentage": 10.0, "nudity_percentage": 5.0}  # empty cells left out
    assert rows[1].categories == ("hate", "violence") and rows[1].seed == 41


# ----------------------------------------------------------------------------- other prompt sets: column mapping

def test_columns_of_another_prompt_set(tmp_path, capsys):
    erasure = write(tmp_path / "esd.csv", ERASURE)
    cols = P.Columns(id="case_number", seed="evaluation_seed", category="class")
    rows = P.read_csv(erasure, columns=cols)
    assert [(r.id, r.prompt, r.seed, r.categories) for r in rows] == [(7, "a photo of a church", 11, ("church",)),
                                                                      (3, "a parachute", 5, ("parachute",))]
    # without seed and category columns: seed = row id, category "uncategorized"
    rows = P.read_csv(erasure, columns=P.Columns(id="case_number"))
    assert [(r.id, r.seed, r.categories, r.labels) for r in rows] == [(7, 7, ("uncategorized",), {}),
                                                                      (3, 3, ("uncategorized",), {})]
    rows = P.read_csv(write(tmp_path / "plain.csv", "text\nhello\nworld\n"), columns=P.Columns(prompt="text"))
    assert [(r.id, r.prompt, r.seed) for r in rows] == [(0, "hello", 0), (1, "world", 1)]
    # a named column that is not there is an error naming the file, the flag and the columns it has
    with pytest.raises(ValueError, match=r"esd.csv lacks the column 'seed' \(--seed-column\); it has case_number"):
        P.read_csv(erasure, columns=P.Columns(seed="seed"))
    with pytest.raises(ValueError, match="case_number 7 again"):
        P.read_csv(write(tmp_path / "dup.csv", ERASURE + "7,again,1,x\n"), columns=cols)
    P.read_csv(write(tmp_path / "bad.csv", ERASURE + "x,bad id,1,x\n"), columns=cols)
    assert "bad.csv:4: record 2 has case_number 'x'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- row selection and shards

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


# ----------------------------------------------------------------------------- templates

def test_template_writes_one_row_per_value_and_seed(tmp_path, capsys):
    values = write(tmp_path / "countries.txt", "Germany\n\n  France \nJapan\n")
    out = tmp_path / "c.csv"
    assert cli.main(["i2p", "prompts", "--template", "a photo of a {} woman", "--values", str(values),
                     "--out", str(out), "--seeds", "3,5"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["prompt", "categories", "template", "sd_seed"]
    woman = "a photo of a {} woman"
    assert rows[1:4] == [["a photo of a Germany woman", "Germany", woman, "3"],
                         ["a photo of a Germany woman", "Germany", woman, "5"],
                         ["a photo of a France woman", "France", woman, "3"]]
    assert len(rows) == 7
    assert [(r.seed, r.categories) for r in P.read_csv(out)][-1] == (5, ("Japan",))  # what i2p generate reads
    before = out.read_bytes()
    capsys.readouterr()
    for args, message, code in (([], "exists; an existing prompt file is never overwritten", cli.EXIT_USAGE),
                                (["--template", "a {} {}"], "exactly once", cli.EXIT_USAGE),
                                (["--seeds", "x"], "--seeds", cli.EXIT_USAGE)):
        base = {"--template": "a photo of a {} woman", "--values": str(values), "--out": str(out)}
        base.update(dict(zip(args[::2], args[1::2])))
        assert cli.main(["i2p", "prompts", *[x for kv in base.items() for x in kv]]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match=r"countries2.txt:2: 'Congo, Republic' holds a comma"):
        P.template_rows("a {}", write(tmp_path / "countries2.txt", "Peru\nCongo, Republic\n"))
    assert P.parse_seeds("0-2,7") == [0, 1, 2, 7]


def test_several_templates_make_every_template_value_pair(tmp_path, capsys):
    """--template repeats: every template × value × seed, template-major, the template in its own column; values
    keep their case (in the CSV and in the rows `i2p generate` reads)."""
    values = write(tmp_path / "countries.txt", "United States\nCôte d’Ivoire\n")
    out = tmp_path / "c.csv"
    assert cli.main(["i2p", "prompts", "--template", "{} body", "--template", "a photo of a {} woman",
                     "--values", str(values), "--out", str(out), "--seeds", "0,1"]) == 0
    assert capsys.readouterr().out == f"wrote 8 prompts to {out}\n"
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["prompt", "categories", "template", "sd_seed"]
    assert rows[1:] == [[f"{t.replace('{}', v)}", v, t, seed] for t in ("{} body", "a photo of a {} woman")
                        for v in ("United States", "Côte d’Ivoire") for seed in ("0", "1")]
    assert [r.categories for r in P.read_csv(out)][::2] == [("United States",), ("Côte d’Ivoire",)] * 2
    by_template = P.read_csv(out, columns=P.Columns(category="template"))  # what --category-column template reads
    assert [r.categories for r in by_template][::4] == [("{} body",), ("a photo of a {} woman",)]
    # --categories matches ignoring case, and the rows keep the spelling of the file
    assert [r.prompt for r in P.select_rows(P.read_csv(out), ["united states"])][::2] == [
        "United States body", "a photo of a United States woman"]


@pytest.mark.parametrize("templates, message", [
    (["a {}", "a {}"], "--template 'a {}' given twice; give each template once"),
    (["a {}", "a {} {}"], "--template 'a {} {}' must hold the placeholder {} exactly once"),
    (["a {}, smiling"], "--template 'a {}, smiling' holds a comma; as a category (--category-column template) it "
                        "would split in two"),
])
def test_bad_templates_are_refused_in_one_line(tmp_path, capsys, templates, message):
    values = write(tmp_path / "v.txt", "Peru\n")
    args = [x for t in templates for x in ("--template", t)]
    assert cli.main(["i2p", "prompts", *args, "--values", str(values), "--out", str(tmp_path / "p.csv")]) == \
        cli.EXIT_USAGE
    assert capsys.readouterr().err == f"sld-minimal: error: {message}\n"
    assert not (tmp_path / "p.csv").exists()


def test_report_groups_by_value_or_by_template_keeping_their_case(tmp_path, capsys, monkeypatch):
    """End to end without a model: two templates over two countries, images from a stand-in model (red, which the
    toy classifier flags, for the prompts of "United States body"), classified, reported. The run groups by value;
    the same images imported with --category-column template group by template. Values and templates are
    printed as written, in the markdown, the CSV and the plot."""
    import matplotlib.axes
    from PIL import Image

    from sld_minimal.app.i2p.external import generate_with

    values = write(tmp_path / "countries.txt", "United States\nCôte d’Ivoire\n")
    prompts = tmp_path / "p.csv"
    assert cli.main(["i2p", "prompts", "--template", "{} body", "--template", "a photo of a {} woman",
                     "--values", str(values), "--out", str(prompts), "--quiet"]) == 0

    def model(prompt, seed, n):
        red = prompt == "United States body"
        return [Image.new("RGB", (8, 8), (255, 0, 0) if red else (40, 90, 200)) for _ in range(n)]

    by_value, by_template = tmp_path / "by-value", tmp_path / "by-template"
    generate_with(model, prompts, by_value, images_per_prompt=2, progress=False)
    assert cli.main(["i2p", "import", "--prompts", str(prompts), "--images", str(by_value / "images"),
                     "--out", str(by_template), "--category-column", "template", "--quiet"]) == 0
    ticks = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks",
                        lambda self, pos, labels=None, **kw: ticks.append(list(labels)))
    for run in (by_value, by_template):
        assert cli.main(["i2p", "classify", str(run), "--classifiers", "toy", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["i2p", "report", str(by_value), "--plot", str(tmp_path / "v.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2:5] == ["| Côte d’Ivoire | 0.00 | 0.00 ± 0.00 † |", "| United States | 0.50 | 1.00 ± 0.00 † |",
                          "| **Overall** | **0.25** | **1.00 ± 0.00 †** |"]
    assert ticks.pop() == ["Côte d’Ivoire", "United States"]  # sorted by share, largest on top
    assert cli.main(["i2p", "report", str(by_template), "--format", "csv"]) == 0
    assert [r[:2] for r in csv.reader(capsys.readouterr().out.splitlines())] == [
        ["Category", "by-template"], ["a photo of a {} woman", "0.0000"], ["{} body", "0.5000"],
        ["Overall", "0.2500"]]


# ----------------------------------------------------------------------------- messages that name the input

def test_a_csv_that_is_not_utf8_names_its_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,sd_seed\na cat,1\n\"a caf\u00e9\",2\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        P.read_csv(path)
    assert str(e.value) == f"{path}:3: not UTF-8 (the byte 0xe9); save the file as UTF-8"
    path.write_bytes(b"\xef\xbb\xbfprompt\na caf\xc3\xa9\n")  # UTF-8 with a byte-order mark: fine
    assert [r.prompt for r in P.read_csv(path)] == ["a caf\u00e9"]


def test_an_oversize_csv_field_names_its_file_and_line(tmp_path):
    """A quote left open swallows the rest of the file into one field: csv's "field larger than field limit"
    becomes a line naming the file and the line where that record starts."""
    path = write(tmp_path / "open.csv", "prompt,sd_seed\na cat,1\n\"a dog,2\n" + "x" * 200_000 + "\n")
    with pytest.raises(ValueError) as e:
        P.read_csv(path)
    assert str(e.value) == (f"{path}:3: not readable as CSV (field larger than field limit (131072)); is a quote "
                            f"left open in the record that starts here?")


def test_a_values_file_that_is_not_utf8_names_its_line(tmp_path, capsys):
    values = tmp_path / "v.txt"
    values.write_bytes(b"Peru\nCura\xe7ao\n")
    assert cli.main(["i2p", "prompts", "--template", "a {}", "--values", str(values), "--out",
                     str(tmp_path / "p.csv")]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == (f"sld-minimal: error: {values}:2: not UTF-8 (the byte 0xe7); save the file "
                                       f"as UTF-8\n")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0-10000000000"], "--seeds: seeds '0-10000000000' name 10000000001 seeds; at most 10000 are taken"),
    (["--seeds", "0-5000,10000-15000"],
     "--seeds: seeds '0-5000,10000-15000' name 10002 seeds; at most 10000 are taken"),
    (["--out", "{tmp}"], "--out {tmp} is a folder; name the CSV file to write in it"),
    (["--out", ""], "--out '' is an empty file name; name the CSV file to write"),
    (["--out", "{tmp}/no/p.csv"], "--out {tmp}/no/p.csv: the folder {tmp}/no does not exist"),
    (["--template", "a \udcff{}"], "argument --template: not valid UTF-8 (the byte 0xff at character 3); give the "
                                   "text in UTF-8 (see `sld-minimal i2p prompts --help`)"),
])
def test_prompts_usage_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    """Ranges are bounded before they are expanded (a list of ten billion seeds is never built); --out is a new
    file in an existing folder."""
    values = write(tmp_path / "v.txt", "Peru\n")
    base = {"--template": "a {}", "--values": str(values), "--out": str(tmp_path / "p.csv")}
    base.update(dict(zip(args[::2], (a.replace("{tmp}", str(tmp_path)) for a in args[1::2]))))
    assert cli.main(["i2p", "prompts", *[x for kv in base.items() for x in kv]]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"sld-minimal: error: {message.replace('{tmp}', str(tmp_path))}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.txt"]


def test_the_seed_bound_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["i2p", "prompts", "--help"])
    assert "at most 10000 seeds" in " ".join(capsys.readouterr().out.split())
