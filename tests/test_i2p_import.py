"""Images this package did not make, in a run folder (external.py): files imported and checked against the prompt
set, and a user's own `generate_fn` through kill -9, resume and shards."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sld_minimal.app import cli
from sld_minimal.app.i2p import classify as C, external as X, report as R
from sld_minimal.testing.i2p import image_bytes, write


OWN_MODEL = '''
import numpy as np
from PIL import Image

def noise_model(prompt, seed, num_images):
    """A deterministic stand-in for someone's model: the images are a function of (prompt, seed, num_images)."""
    rng = np.random.default_rng([seed, len(prompt), num_images])
    return [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(num_images)]
'''


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    write(folder / "own_model.py", OWN_MODEL)
    sys.path.insert(0, str(folder))
    import own_model

    yield own_model, folder
    sys.path.remove(str(folder))


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
    assert image_bytes(tmp_path / "run2").keys() == image_bytes(out).keys()


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

KILL_AT_5TH_RENAME = '''
import os, signal, sys
sys.path.insert(0, {model!r})
from sld_minimal import files
from sld_minimal.app.i2p.external import generate_with
from own_model import noise_model

real, calls = os.replace, []
def replace(src, dst):  # run.json is linked into place, the images renamed: the 5th rename is row 1's second
    calls.append(dst)  # image, killed before its rename
    if len(calls) == 5:
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
    script = KILL_AT_5TH_RENAME.format(model=str(model_dir), csv=str(i2p_csv), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert sorted(image_bytes(out)) == ["0-0.png", "0-1.png", "0-2.png", "1-0.png"]
    assert [p.name for p in (out / "images").iterdir() if p.name.startswith(".")]  # the killed write's temporary
    assert X.generate_with(module.noise_model, i2p_csv, out, **run) == {"made": 6, "found": 3}
    assert image_bytes(out) == image_bytes(reference)
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")]  # orphan removed

    # an image cut short (an older writer, a full disk) does not count as done: its row is made again
    cut = out / "images" / "2-1.png"
    cut.write_bytes(cut.read_bytes()[:-20])
    assert X.generate_with(module.noise_model, i2p_csv, out, **run) == {"made": 3, "found": 6}
    assert image_bytes(out) == image_bytes(reference)

    sharded = tmp_path / "sharded"
    for i in (1, 0):
        X.generate_with(module.noise_model, i2p_csv, sharded, shard=(i, 2), **run)
    assert image_bytes(sharded) == image_bytes(reference)
    with pytest.raises(ValueError, match="holds a run with model='noise', not 'other'"):
        X.generate_with(module.noise_model, i2p_csv, sharded, **{**run, "model": "other"})
    with pytest.raises(TypeError, match="returned 1 items for row 0; expected a list of 3 PIL images"):
        X.generate_with(lambda p, s, n: module.noise_model(p, s, 1), i2p_csv, tmp_path / "bad", **run)
