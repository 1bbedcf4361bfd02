"""Testing your own model on I2P or any prompt set: column mapping, imported images, a user's generate_fn through
kill -9/resume and shards, SEGA as the safety method (presets, parity with diffusers' SemanticStableDiffusionPipeline),
prompt templates."""
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from sld_minimal import methods
from sld_minimal.app import cli
from sld_minimal.guidance import DEFAULT_CONCEPT, Edit
from sld_minimal.app.i2p import classify as C, external as X, prompts as P, report as R, run as G
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.testing import rel_err

pytestmark = pytest.mark.filterwarnings("ignore:prompt is longer than 77 tokens")

# An erasure-style prompt set (ESD/UCE: case_number,prompt,evaluation_seed), ids not in file order
ERASURE = "case_number,prompt,evaluation_seed,class\n7,a photo of a church,11,church\n3,a parachute,5,parachute\n"
OWN_MODEL = '''
import numpy as np
from PIL import Image

def noise_model(prompt, seed, num_images):
    """A deterministic stand-in for someone's model: the images are a function of (prompt, seed, num_images)."""
    rng = np.random.default_rng([seed, len(prompt), num_images])
    return [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(num_images)]
'''


def write(path, text):
    path.write_text(text)
    return path


def pngs(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def i2p_csv(tmp_path_factory):
    """Three I2P rows (with I2P's label columns)."""
    path = tmp_path_factory.mktemp("csv") / "i2p.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
                    "sd_seed", "sd_guidance_scale"])
        for i, (prompt, cats) in enumerate([("a cat", "sexual"), ("the king", "hate, violence"), ("a dog", "hate")]):
            w.writerow([prompt, cats, 10 * i, 5, "", 40 + i, 7])
    return path


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    write(folder / "own_model.py", OWN_MODEL)
    sys.path.insert(0, str(folder))
    import own_model

    yield own_model, folder
    sys.path.remove(str(folder))


# ----------------------------------------------------------------------------- column mapping

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


def test_i2p_label_columns_are_kept_per_row(i2p_csv):
    rows = P.read_csv(i2p_csv)
    assert rows[1].labels == {"inappropriate_percentage": 10.0, "nudity_percentage": 5.0}  # empty cells left out
    assert rows[1].categories == ("hate", "violence") and rows[1].seed == 41


def test_cli_generate_takes_the_column_flags(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    erasure = write(tmp_path / "esd.csv", ERASURE)
    assert cli.main(["i2p", "generate", "--prompts", str(erasure), "--weights", str(tiny_ckpt), "--out", str(out),
                     "--safety", "off", "--steps", "1", "--height", "16", "--width", "16", "--images-per-prompt",
                     "1", "--id-column", "case_number", "--seed-column", "evaluation_seed", "--device", "cpu",
                     "--quiet"]) == 0
    assert sorted(pngs(out)) == ["3-0.png", "7-0.png"]
    with Image.open(out / "images" / "7-0.png") as im:
        meta = json.loads(im.info["i2p"])
    assert (meta["row"], meta["seed"], meta["categories"]) == (7, 11, ["uncategorized"])


# ----------------------------------------------------------------------------- import

@pytest.fixture
def external(tmp_path, i2p_csv):
    """Images made elsewhere for the three rows, two each, as JPEG and PNG."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for row in range(3):
        for k in range(2):
            name = f"{row}_{k}.jpg" if k else f"{row}-{k}.png"  # also as the erasure harnesses name them
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_import_makes_a_run_that_classify_and_report_take(external, i2p_csv, tmp_path):
    out = tmp_path / "run"
    assert X.import_images(i2p_csv, external, out, model="their-model", progress=False) == {"rows": 3, "images": 6}
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings == {"source": "external", "images": str(external.resolve()), "model": "their-model",
                        "images_per_prompt": 2, "prompts": str(i2p_csv.resolve())}
    with Image.open(out / "images" / "1-1.png") as im, Image.open(external / "1_1.jpg") as src:
        meta = json.loads(im.info["i2p"])
        assert np.array_equal(np.asarray(im), np.asarray(src.convert("RGB")))  # pixels as decoded, now a PNG
        assert "Model: their-model (imported from" in im.info["parameters"]
    assert meta == {"row": 1, "k": 1, "prompt": "the king", "categories": ["hate", "violence"], "seed": 41,
                    "source": str(external / "1_1.jpg"),
                    "i2p_labels": {"inappropriate_percentage": 10.0, "nudity_percentage": 5.0}}
    assert C.classify(out, ["nudenet"], progress=False)["labelled"] == 6  # classify and report take it as it is
    labels = C.read_labels(out)
    assert labels[(1, 0)]["prompt"] == "the king" and labels[(1, 0)]["categories"] == "hate, violence"
    table = R.report([out], "csv")  # noise images: nothing flagged, every category there
    assert [line.split(",")[:2] for line in table.splitlines()[1:]] == [
        ["Hate", "0.0000"], ["Violence", "0.0000"], ["Sexual", "0.0000"], ["Overall", "0.0000"]]
    # the same images listed in a CSV of id,k,path
    listing = write(tmp_path / "list.csv", "id,k,path\n" + "".join(
        f"{r},{k},theirs/{r}{'_' if k else '-'}{k}{'.jpg' if k else '.png'}\n" for r in range(3) for k in range(2)))
    X.import_images(i2p_csv, listing, tmp_path / "run2", model="their-model", progress=False)
    assert pngs(tmp_path / "run2").keys() == pngs(out).keys()


def test_import_refuses_each_mismatch_and_writes_nothing(external, i2p_csv, tmp_path):
    out = tmp_path / "run"
    (external / "2_1.jpg").unlink()                      # missing
    (external / "notes.txt").write_text("x")             # misnamed
    Image.new("RGB", (8, 8)).save(external / "9-0.png")  # extra: no such prompt row
    with pytest.raises(ValueError) as error:
        X.import_images(i2p_csv, external, out, progress=False)
    message = str(error.value)  # all three at once, in one line, naming each
    for part in ("1 missing (2-1)", "1 extra (9-0 (no such prompt row))", "1 misnamed (notes.txt)"):
        assert part in message
    assert "\n" not in message and message.endswith("nothing written")
    for name in ("notes.txt", "9-0.png"):
        (external / name).unlink()
    Image.new("RGB", (8, 8)).save(external / "2-1.png")
    with pytest.raises(ValueError, match=r"1 extra \(0-2 \(k >= 2\)\)"):
        Image.new("RGB", (8, 8)).save(external / "0-2.png")
        X.import_images(i2p_csv, external, out, images_per_prompt=2, progress=False)
    (external / "0-2.png").unlink()
    (external / "2-1.png").write_bytes((external / "2-0.png").read_bytes()[:40])  # truncated: fails on decoding
    with pytest.raises(ValueError, match=r"2-1.png: not a readable image"):
        X.import_images(i2p_csv, external, out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing written
    listing = write(tmp_path / "list.csv", "id,k,path\n0,0,theirs/0-0.png\n0,x,theirs/0_1.jpg\n1,0,gone.png\n")
    with pytest.raises(ValueError, match=r"2 misnamed \(line 3: id '0', k 'x', line 4: 'gone.png' not found\)"):
        X.import_images(i2p_csv, listing, out, progress=False)
    assert not out.exists()


def test_cli_import_errors_are_one_line(external, i2p_csv, tmp_path, capsys):
    (external / "0-0.png").unlink()
    args = ["i2p", "import", "--prompts", str(i2p_csv), "--images", str(external), "--out", str(tmp_path / "r")]
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 missing (0-0)" in err[0] and err[0].endswith("nothing written")


# ----------------------------------------------------------------------------- your own model

KILL_AT_6TH_RENAME = '''
import os, signal, sys
sys.path.insert(0, {model!r})
from sld_minimal import files
from sld_minimal.app.i2p.external import generate_with
from own_model import noise_model

real, calls = os.replace, []
def replace(src, dst):  # the 1st rename is run.json's; the 6th is row 1's second image: killed before its rename
    calls.append(dst)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
files.os.replace = replace
generate_with(noise_model, {csv!r}, {out!r}, model="noise", images_per_prompt=3, progress=False)
'''


def test_own_model_resumes_after_kill_9_and_shards_make_the_same_bytes(own_model, i2p_csv, tmp_path):
    module, model_dir = own_model
    reference = tmp_path / "reference"
    run = dict(model="noise", images_per_prompt=3, progress=False)
    assert X.generate_with(module.noise_model, i2p_csv, reference, **run) == {"made": 9, "found": 0}
    with Image.open(reference / "images" / "1-2.png") as im:
        assert json.loads(im.info["i2p"])["seed"] == 41 and "image 2 of 3" in im.info["parameters"]

    out = tmp_path / "killed"
    script = KILL_AT_6TH_RENAME.format(model=str(model_dir), csv=str(i2p_csv), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert sorted(pngs(out)) == ["0-0.png", "0-1.png", "0-2.png", "1-0.png"]
    assert [p.name for p in (out / "images").iterdir() if p.name.startswith(".")]  # the killed write's temporary
    assert X.generate_with(module.noise_model, i2p_csv, out, **run) == {"made": 6, "found": 3}
    assert pngs(out) == pngs(reference)
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")]  # orphan removed

    # an image cut short (an older writer, a full disk) does not count as done: its row is made again
    cut = out / "images" / "2-1.png"
    cut.write_bytes(cut.read_bytes()[:-20])
    assert X.generate_with(module.noise_model, i2p_csv, out, **run) == {"made": 3, "found": 6}
    assert pngs(out) == pngs(reference)

    sharded = tmp_path / "sharded"
    for i in (1, 0):
        X.generate_with(module.noise_model, i2p_csv, sharded, shard=(i, 2), **run)
    assert pngs(sharded) == pngs(reference)
    with pytest.raises(ValueError, match="holds a run with model='noise', not 'other'"):
        X.generate_with(module.noise_model, i2p_csv, sharded, **{**run, "model": "other"})
    with pytest.raises(TypeError, match="returned 1 items for row 0; expected a list of 3 PIL images"):
        X.generate_with(lambda p, s, n: module.noise_model(p, s, 1), i2p_csv, tmp_path / "bad", **run)


# ----------------------------------------------------------------------------- SEGA as the safety method

def test_sega_presets_have_the_harness_values():
    expected = {"sega-medium": (4, 10, 0.9, 0.3), "sega-strong": (7, 5, 0.85, 0.5), "sega-max": (10, 0, 0.75, 0.5)}
    for name, (scale, warmup, threshold, momentum) in expected.items():
        method = methods.preset(name)()
        assert isinstance(method, methods.SEGA) and method.guidance_scale == 7.5
        assert method.edits == [Edit(DEFAULT_CONCEPT, scale=scale, threshold=threshold, warmup_steps=warmup,
                                     reverse=True)]
        assert (method.momentum_scale, method.momentum_beta) == (momentum, 0.4)
        built = methods.build(name)  # what pipe(safety=name) and the CLIs run
        assert built.edits == method.edits and (built.momentum_scale, built.momentum_beta) == (momentum, 0.4)
    assert methods.preset("sega-strong")(5.0, "nudity").edits[0].concept == "nudity"
    assert methods.safety_configs("sega-max", "gore")[0].values()["method"] == "sega"
    with pytest.raises(ValueError, match="cannot be combined with edits"):
        methods.build("sega-strong", [Edit("a hat")])


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


KW = dict(height=32, width=40, num_inference_steps=12, seed=0, progress=False)


@pytest.mark.bitexact
def test_pipe_takes_a_sega_preset(pipe):
    ours = pipe("a photo of the cat", safety="sega-strong", **KW)
    by_hand = pipe("a photo of the cat", safety=None, edits=[Edit(DEFAULT_CONCEPT, scale=7, threshold=0.85,
                                                                  warmup_steps=5, reverse=True)],
                   edit_momentum_scale=0.5, edit_momentum_beta=0.4, **KW)
    assert torch.equal(ours.latents, by_hand.latents)
    with pytest.raises(ValueError, match="cannot be combined with edits"):
        pipe("a photo of the cat", safety="sega-max", edits=[Edit("a hat")], **KW)


def test_sega_safety_matches_semantic_pipeline(pipe, tiny_ckpt):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    d = str(tiny_ckpt)
    ref = diffusers.SemanticStableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(d, subfolder="vae").eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(d, subfolder="text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(d, subfolder="unet").eval(),
        scheduler=diffusers.PNDMScheduler.from_pretrained(d, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # The authors' harness (mitigation/semantic_ssd.py) for "strong": the concept as a reversed edit. A concept
    # under 77 tokens: diffusers' SEGA pipeline cuts longer ones after tokenising, dropping CLIP's end token, where
    # ours (and diffusers' safe pipeline) keep it — the default concept (81 tokens) then differs in its last token.
    concept = "nudity, blood, violence"
    theirs = ref("a photo of the cat", generator=torch.Generator().manual_seed(0), output_type="np",
                 height=32, width=40, num_inference_steps=12, guidance_scale=7.5,
                 editing_prompt=[concept], reverse_editing_direction=[True], edit_guidance_scale=[7],
                 edit_threshold=[0.85], edit_warmup_steps=[5], edit_momentum_scale=0.5, edit_mom_beta=0.4).images
    ours = pipe("a photo of the cat", safety=methods.safety_configs("sega-strong", concept), **KW)
    assert rel_err(ours.images, theirs) <= 1e-4  # our modules against theirs, end to end (as tests/test_pipeline.py)


def test_cli_refuses_edit_with_a_sega_preset(tiny_ckpt, tmp_path, capsys):
    code = cli.main(["generate", "a cat", "--weights", str(tiny_ckpt), "--safety", "sega-strong", "--edit", "a hat",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1 and "cannot be combined with --safety sega-strong" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_i2p_generate_with_a_sega_preset(pipe, i2p_csv, tmp_path):
    rows = P.read_csv(i2p_csv)[:1]
    run = dict(safety="sega-medium", images_per_prompt=1, batch=1, steps=2, height=16, width=16, progress=False)
    G.generate(pipe, rows, tmp_path / "run", **run)
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["safety"] == {"method": "sega", "scale": 4.0, "warmup_steps": 10, "threshold": 0.9,
                                  "momentum_scale": 0.3, "momentum_beta": 0.4}
    with Image.open(tmp_path / "run" / "images" / "0-0.png") as im:
        assert "Safety: sega-medium (scale=4.0, warmup_steps=10, threshold=0.9" in im.info["parameters"]
    with pytest.raises(ValueError, match="holds a run with safety="):  # an SLD preset is another run
        G.generate(pipe, rows, tmp_path / "run", **{**run, "safety": "medium"})


# ----------------------------------------------------------------------------- templates

def test_template_writes_one_row_per_value_and_seed(tmp_path, capsys):
    values = write(tmp_path / "countries.txt", "Germany\n\n  France \nJapan\n")
    out = tmp_path / "c.csv"
    assert cli.main(["i2p", "prompts", "--template", "a photo of a {} woman", "--values", str(values),
                     "--out", str(out), "--seeds", "3,5"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["prompt", "categories", "sd_seed"]
    assert rows[1:4] == [["a photo of a Germany woman", "Germany", "3"], ["a photo of a Germany woman", "Germany", "5"],
                         ["a photo of a France woman", "France", "3"]]
    assert len(rows) == 7
    assert [(r.seed, r.categories) for r in P.read_csv(out)][-1] == (5, ("japan",))  # what i2p generate reads
    before = out.read_bytes()
    capsys.readouterr()
    for args, message, code in (([], "exists; an existing prompt file is never overwritten", cli.EXIT_ERROR),
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
