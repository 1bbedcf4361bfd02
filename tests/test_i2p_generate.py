"""I2P generation (run.py): each row's images from one generator stream, exactly the pipeline's; resume after an
interruption, incomplete images made again, shards that together make the unsharded run, a run folder refusing
other settings; `i2p generate` on the command line. Generation runs the tiny checkpoint at 32×32 with 2 steps: 3
images per prompt in batches of 2 and 1."""
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sld_minimal import methods, schedulers
from sld_minimal.app import cli
from sld_minimal.app.i2p import folder as F, prompts as P, run as G
from sld_minimal.conditions import PROMPT, UNCOND
from sld_minimal.guidance import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS
from sld_minimal.presets import safety_configs
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.testing.i2p import ERASURE, RUN, image_bytes, write

pytestmark = pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def reference(pipe, rows, tmp_path_factory):
    """An uninterrupted, unsharded run of the three valid rows."""
    folder = tmp_path_factory.mktemp("reference") / "strong"
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 9, "found": 0}
    return folder


# ----------------------------------------------------------------------------- images and their streams

@pytest.mark.bitexact
def test_images_are_the_pipelines_with_one_stream_per_row(pipe, rows, reference):
    assert sorted(image_bytes(reference)) == [f"{r}-{k}.png" for r in (0, 1, 4) for k in range(3)]
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
    G.draw_batch(pipe, g2, 2, h, w)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.bitexact
def test_given_latents_are_the_seeds_draw(pipe):
    """pipe(latents=…) with the noise a generator would draw gives that generator's images, bit for bit."""
    run = dict(num_images=2, num_inference_steps=2, height=32, width=32, safety="strong", progress=False)
    drawn = pipe("a cat", generator=torch.Generator("cpu").manual_seed(5), **run)
    given = pipe("a cat", latents=G.draw_batch(pipe, torch.Generator("cpu").manual_seed(5), 2, 32, 32), **run)
    assert torch.equal(drawn.latents, given.latents) and np.array_equal(drawn.images, given.images)
    assert given.settings[0]["seed"] is None  # the noise came from the caller, not from a seed
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(2, 4, 16, 16\)"):
        pipe("a cat", latents=torch.zeros(1, 4, 4, 4), **run)


def test_calls_stack_consecutive_rows_of_one_scale():
    rows = [P.Row(id=i, line=i + 2, prompt="p", categories=(), seed=i, guidance_scale=s) for i, s in enumerate([7, 7, 7, 5, 5, 7])]
    ids = [[r.id for r in c] for c in G.calls(rows, 2, lambda r: r.guidance_scale)]
    assert ids == [[0, 1], [2], [3, 4], [5]]
    assert [[r.id for r in c] for c in G.calls(rows, 1, lambda r: 7.5)] == [[i] for i in range(6)]


def test_rows_per_call_same_noise_recorded_and_resumed(pipe, rows, reference, tmp_path):
    """Rows stacked into one call: each image from its row's own noise (equal to the one-row run's up to float
    rounding), recorded in run.json and the chunk; an interrupted run resumes to the bytes of an uninterrupted one."""
    class Stop(Exception):
        pass

    def stop(row, ks):
        raise Stop

    stacked = {**RUN, "rows_per_call": 2}
    whole = tmp_path / "whole"
    assert G.generate(pipe, rows, whole, **stacked) == {"made": 9, "found": 0}
    for name, data in image_bytes(reference).items():  # the same noise: the same image up to rounding
        a, b = (np.asarray(Image.open(f / "images" / name), dtype=float) for f in (reference, whole))
        assert np.abs(a - b).max() <= 2, name
    assert json.loads((whole / "run.json").read_text())["settings"]["rows_per_call"] == 2
    with Image.open(whole / "images" / "1-0.png") as im:
        assert json.loads(im.info["i2p"])["rows_per_call"] == 2
        assert "batches of 2, 2 rows per call" in im.info["parameters"]
    with pytest.raises(ValueError, match="holds a run with rows_per_call=2, not None"):
        G.generate(pipe, rows, whole, **RUN)
    part = tmp_path / "part"
    with pytest.raises(Stop):  # stopped after the first call (rows 0 and 1, batch [0, 1])
        G.generate(pipe, rows, part, after_batch=stop, **stacked)
    assert sorted(image_bytes(part)) == ["0-0.png", "0-1.png", "1-0.png", "1-1.png"]
    (part / "images" / "1-0.png").unlink()  # as if killed while writing the call's images: the call is made again
    assert G.generate(pipe, rows, part, **stacked)["found"] == 2
    assert image_bytes(part) == image_bytes(whole)


# ----------------------------------------------------------------------------- resume and shards

@pytest.mark.bitexact
def test_resume_after_an_interruption_gives_the_same_bytes(pipe, rows, reference, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_batch(row, ks):
        raise Stop

    folder, rows = tmp_path / "run", rows[:2]
    expected = {name: data for name, data in image_bytes(reference).items() if name[0] in "01"}
    with pytest.raises(Stop):  # killed after row 0's first batch: its second batch must continue its stream
        G.generate(pipe, rows, folder, after_batch=stop_after_first_batch, **RUN)
    assert sorted(image_bytes(folder)) == ["0-0.png", "0-1.png"]
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 4, "found": 2}
    assert image_bytes(folder) == expected
    # A batch with a file missing (killed while writing it) is made again, whole; the rest is left alone.
    (folder / "images" / "1-1.png").unlink()
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 2, "found": 4}
    assert image_bytes(folder) == expected
    assert not [p for p in (folder / "images").iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.bitexact
def test_incomplete_images_are_made_again_and_temporaries_removed(pipe, rows, reference, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    expected = image_bytes(reference)
    (folder / "images" / "0-1.png").write_bytes(b"")  # a 0-byte file and a truncated one (an older writer killed,
    cut = folder / "images" / "4-2.png"                # a full disk): neither counts as done
    cut.write_bytes(cut.read_bytes()[:-30])
    orphan = folder / "images" / ".1-0.png.999999999.0badf00d.tmp"  # left by a killed process (no such pid)
    orphan.write_bytes(b"half")
    assert G.generate(pipe, rows, folder, **RUN) == {"made": 3, "found": 6}  # batches [0, 1] of row 0, [2] of row 4
    assert image_bytes(folder) == expected and not orphan.exists()
    assert "2 incomplete image(s)" in capsys.readouterr().err
    assert F.png_complete(folder / "images" / "0-0.png") and not F.png_complete(tmp_path / "none.png")


@pytest.mark.bitexact
def test_shards_together_make_the_unsharded_run(pipe, rows, reference, tmp_path):
    folder = tmp_path / "sharded"
    for i in (1, 0):  # shard, limit and categories are not image-defining: the same folder takes them all
        G.generate(pipe, P.select_rows(rows, limit=2, shard=(i, 2)), folder, **RUN)  # rows 0 and 1
    assert image_bytes(folder) == {name: data for name, data in image_bytes(reference).items() if name[0] in "01"}


# ----------------------------------------------------------------------------- run.json: the settings a folder holds

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
    assert F.create_once(tmp_path / "run.json", record, "settings", "a run") == record
    # a concurrent shard that lost the race reads the winner's file and compares
    with pytest.raises(ValueError, match="steps=3, not 4"):
        F.create_once(tmp_path / "run.json", {"settings": {"steps": 4, "safety": None}}, "settings", "a run")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


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


def test_several_safety_concepts_and_a_run_that_never_acts(pipe, i2p_csv, tmp_path, capsys):
    """Two concepts: multi-concept SLD, the pipeline's images bit for bit, recorded as lists; 2 PNDM steps (3 loop
    iterations) against δ = 0 acts, against strong's δ = 7 never: run.json says so beside the compared settings."""
    rows = P.read_csv(i2p_csv)[:1]
    run = dict(safety="max", concept=["a dog", "the king"], images_per_prompt=1, batch=1, steps=2, height=16,
               width=16, progress=False)
    G.generate(pipe, rows, tmp_path / "two", **run)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["settings"]["concept"] == ["a dog", "the king"] and len(record["settings"]["safety"]) == 2
    assert "never_acts" not in record  # max: δ = 0
    direct = pipe(rows[0].prompt, generator=torch.Generator("cpu").manual_seed(rows[0].seed), safety=[
        dataclasses.replace(safety_configs("max")[0], concept=c) for c in ("a dog", "the king")],
        num_inference_steps=2, height=16, width=16, progress=False).images[0]
    with Image.open(tmp_path / "two" / "images" / "0-0.png") as im:
        assert np.array_equal(np.asarray(im), (direct * 255).round().astype(np.uint8))
    G.generate(pipe, rows, tmp_path / "idle", **(run | {"safety": "strong", "concept": None}))
    record = json.loads((tmp_path / "idle" / "run.json").read_text())
    assert record["never_acts"].startswith("the safety guidance never acts: its warm-up (δ = 7) is not shorter "
                                           "than the run's 3 sampling iterations")
    G.generate(pipe, rows, tmp_path / "idle", **(run | {"safety": "strong", "concept": None}))  # resumes
    with pytest.raises(ValueError, match="the negative-prompt baseline takes one concept"):
        G.generate(pipe, rows, tmp_path / "neg", **(run | {"safety": None, "negative_prompt_baseline": True}))
    code = cli.main(["i2p", "generate", "--prompts", str(i2p_csv), "--out", str(tmp_path / "c"), "--safety", "off",
                     "--negative-prompt-baseline", "--safety-concept", "a", "--safety-concept", "b"])
    assert (code, capsys.readouterr().err) == (2, "sld-minimal: error: --negative-prompt-baseline takes one "
                                                  "--safety-concept (it is the negative prompt); write the concepts "
                                                  "as one text\n")


# ----------------------------------------------------------------------------- the command line

def test_cli_generate_and_its_errors(tiny_ckpt, prompts_csv, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["i2p", "generate", "--prompts", str(prompts_csv), "--weights", str(tiny_ckpt), "--out", str(out),
            "--height", "32", "--width", "32", "--steps", "2", "--images-per-prompt", "2", "--batch", "2",
            "--device", "cpu", "--quiet", "--categories", "harassment"]
    assert cli.main(base + ["--negative-prompt-baseline"]) == 0
    assert sorted(image_bytes(out)) == ["4-0.png", "4-1.png"]
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
        argv = base[:base.index("--batch")] + base[base.index("--batch") + 2:] if "--batch" in extra else base
        assert cli.main(argv + extra) in (cli.EXIT_USAGE, cli.EXIT_ERROR)  # (a flag given twice is refused)
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("sld-minimal: warning")]
        assert len(errors) == 1 and errors[0].startswith("sld-minimal: error:") and message in errors[0]


def test_cli_generate_takes_the_column_flags(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    erasure = write(tmp_path / "esd.csv", ERASURE)
    assert cli.main(["i2p", "generate", "--prompts", str(erasure), "--weights", str(tiny_ckpt), "--out", str(out),
                     "--safety", "off", "--steps", "1", "--height", "16", "--width", "16", "--images-per-prompt",
                     "1", "--id-column", "case_number", "--seed-column", "evaluation_seed", "--device", "cpu",
                     "--quiet"]) == 0
    assert sorted(image_bytes(out)) == ["3-0.png", "7-0.png"]
    with Image.open(out / "images" / "7-0.png") as im:
        meta = json.loads(im.info["i2p"])
    assert (meta["row"], meta["seed"], meta["categories"]) == (7, 11, ["uncategorized"])


# ----------------------------------------------------------------------------- resume checks what it resumes

@pytest.mark.parametrize("field, change", [("prompt", dict(prompt="a changed prompt")), ("seed", dict(seed=999)),
                                           ("categories", dict(categories=("violence",)))])
def test_resume_refuses_images_made_for_another_row(pipe, rows, reference, tmp_path, field, change):
    """Without a recorded prompt set (an older run, or the Python API), each image's chunk is compared with the
    row it would stand for: the first mismatch is refused in one line naming the image, the row, field and values."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    before = image_bytes(folder)
    changed = [dataclasses.replace(rows[0], **change), *rows[1:]]
    old = {"prompt": rows[0].prompt, "seed": rows[0].seed, "categories": list(rows[0].categories)}[field]
    new = {"prompt": "a changed prompt", "seed": 999, "categories": ["violence"]}[field]
    with pytest.raises(ValueError, match=re.escape(f"0-0.png of row 0 was made with {field} {old!r}, this run has "
                                                   f"{new!r}; use another folder")):
        G.generate(pipe, changed, folder, **RUN)
    assert image_bytes(folder) == before  # nothing made, nothing lost


def test_cli_resume_compares_the_prompt_set_first(tiny_ckpt, prompts_csv, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["i2p", "generate", "--weights", str(tiny_ckpt), "--out", str(out), "--safety", "off", "--steps", "1",
            "--height", "16", "--width", "16", "--images-per-prompt", "1", "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--prompts", str(prompts_csv), "--limit", "2"]) == 0
    record = json.loads((out / "run.json").read_text())["prompts"]
    assert record["rows"] == [0, 1] and record["limit"] == 2 and record["categories"] is None
    assert record["columns"]["prompt"] == "prompt" and len(record["rows_sha256"]) == 64
    # shards of the same selection share the folder (the record is the selection before sharding)
    assert cli.main(base + ["--prompts", str(prompts_csv), "--limit", "2", "--shard", "1/2"]) == 0
    capsys.readouterr()
    edited = write(tmp_path / "edited.csv", prompts_csv.read_text().replace("a cat photo", "a dog photo"))
    for extra, message in (
            (["--prompts", str(edited), "--limit", "2"], "this run was made from another prompt set (the same "
                                                         "rows, but a prompt, seed, guidance scale or category"),
            (["--prompts", str(prompts_csv), "--limit", "3"], "another prompt set (limit 2, not 3)"),
            (["--prompts", str(prompts_csv), "--limit", "2", "--categories", "hate"],
             "another prompt set (categories None, not ['hate'])")):
        assert cli.main(base + extra) == cli.EXIT_ERROR
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("sld-minimal: warning")]
        assert len(err) == 1 and message in err[0], err  # (the warnings: the fixture's CSV has invalid rows)


def test_cli_i2p_generate_checks_the_size_before_loading(tmp_path, prompts_csv, capsys):
    missing = tmp_path / "no-model"  # nothing to load: the size is refused first
    assert cli.main(["i2p", "generate", "--prompts", str(prompts_csv), "--weights", str(missing), "--out",
                     str(tmp_path / "run"), "--safety", "off", "--height", "36"]) == cli.EXIT_USAGE
    assert "--height must be a multiple of 8, got 36" in capsys.readouterr().err


def test_the_settings_format_is_recorded_and_older_folders_resume(pipe, rows, reference, tmp_path):
    from sld_minimal.outputs import SETTINGS_FORMAT

    assert json.loads((reference / "run.json").read_text())["format"] == SETTINGS_FORMAT == 3
    assert pipe("a cat", num_inference_steps=1, height=16, width=16, progress=False).settings[0]["format"] == 3
    for older in (1, 2):  # run folders as formats 1 (no "format", no prompt set) and 2 wrote them
        folder = tmp_path / f"format-{older}"
        shutil.copytree(reference, folder)
        record = json.loads((folder / "run.json").read_text())
        if older == 1:
            del record["format"]
        else:
            record["format"] = 2
        (folder / "run.json").write_text(json.dumps(record))
        assert G.generate(pipe, rows, folder, **RUN) == {"made": 0, "found": 9}


# ----------------------------------------------------------------------------- your own method through the benchmark

class Shared(methods.SLD):
    """A caller's SLD variant with settings of its own (a stand-in for a research method)."""

    def __init__(self, safety, guidance_scale=7.5, share=0.5):
        super().__init__(safety, guidance_scale)
        self.share = share

    def settings(self):
        return {"share": self.share}


METHOD_RUN = dict(images_per_prompt=3, batch=2, height=32, width=32, progress=False)


def test_generate_runs_a_method_object_with_a_sampler_object(pipe, rows, tmp_path):
    """A method object and a Sampler object through `generate`: the row's stream and batches as for a preset, the
    method recorded in run.json (class, module, settings(), its SLD configuration, s_g), a resume with the same
    record finds everything, one with other settings is refused naming both."""
    folder = tmp_path / "run"
    sampler = schedulers.from_config(pipe.scheduler_config, "ddim", 2)
    assert G.generate(pipe, rows[:1], folder, method=Shared(SLD_PRESETS["max"]), scheduler=sampler,
                      **METHOD_RUN) == {"made": 3, "found": 0}
    record = json.loads((folder / "run.json").read_text())["settings"]
    assert record["method"]["method"] == {"class": "Shared", "module": __name__, "settings": {"share": 0.5},
                                          "description": methods.SLD(SLD_PRESETS["max"]).describe()}
    assert record["method"]["safety"] == [{"preset": "max", **SLD_PRESETS["max"].values(), "concept": DEFAULT_CONCEPT}]
    assert (record["scheduler"], record["steps"], record["guidance"], record["safety"]) == ("ddim", 2, 7.5, None)
    g = torch.Generator("cpu").manual_seed(rows[0].seed)  # the row's one stream: a batch of 2, then 1
    direct = [pipe(rows[0].prompt, generator=g, num_images=n, method=Shared(SLD_PRESETS["max"]), scheduler="ddim",
                   num_inference_steps=2, height=32, width=32, progress=False).images for n in (2, 1)]
    for k, image in enumerate(np.concatenate(direct)):
        with Image.open(folder / "images" / f"{rows[0].id}-{k}.png") as im:
            assert np.array_equal(np.asarray(im), (image * 255).round().astype(np.uint8))
            assert "Method: Shared (" in im.info["parameters"] and 'Method settings: {"share": 0.5}' in im.info[
                "parameters"]
    assert G.generate(pipe, rows[:1], folder, method=Shared(SLD_PRESETS["max"]), scheduler=sampler,
                      **METHOD_RUN) == {"made": 0, "found": 3}
    with pytest.raises(ValueError, match=r"holds a run with method=\{.*'share': 0.5\}.*\}, not \{.*'share': 0.25\}"):
        G.generate(pipe, rows[:1], folder, method=Shared(SLD_PRESETS["max"], share=0.25), scheduler=sampler,
                   **METHOD_RUN)


def test_generate_refuses_what_a_method_run_cannot_resume(pipe, rows, tmp_path):
    method = Shared(SLD_PRESETS["max"])
    stochastic = schedulers.from_config(pipe.scheduler_config, "ddim", 2, eta=1.0)
    for kwargs, message in (
            (dict(scheduler=stochastic), "^scheduler 'ddim' draws noise at every step; resuming a run replays only "
                                         "each batch's initial noise, so it needs a deterministic one$"),
            (dict(guidance_scale=7.5), r"^method= carries its own guidance scale \(s_g = 7.5\): set it on the method"),
            (dict(safety="strong"), "^method= replaces safety= and the negative-prompt baseline"),
            (dict(scheduler=schedulers.from_config(pipe.scheduler_config, "ddim", 2), steps=3),
             "^steps=3, but the scheduler object takes 2 steps: leave steps unset$")):
        with pytest.raises(ValueError, match=message):
            G.generate(pipe, rows[:1], tmp_path / "x", method=method, **(METHOD_RUN | kwargs))
    assert not (tmp_path / "x").exists()  # refused before run.json is written

    class Drifting(Shared):  # changes its configuration by assignment: its later images would not be its record's
        def __call__(self, eps, step, num_steps, t):
            self.share += 1
            return super().__call__(eps, step, num_steps, t)

    with pytest.raises(ValueError, match="^the method's settings changed during the run"):
        G.generate(pipe, rows[:1], tmp_path / "drift", method=Drifting(SLD_PRESETS["max"]), steps=2, **METHOD_RUN)

    class Own:  # of no built-in kind, with no guidance_scale to say: run, and recorded as such
        def conditions(self, step, num_steps, t):
            return [UNCOND, PROMPT]

        def __call__(self, eps, step, num_steps, t):
            return eps[UNCOND] + 3 * (eps[PROMPT] - eps[UNCOND]), {}

    G.generate(pipe, rows[:1], tmp_path / "own", method=Own(), steps=1, **(METHOD_RUN | {"images_per_prompt": 1}))
    record = json.loads((tmp_path / "own" / "run.json").read_text())["settings"]
    assert record["guidance"] is None and record["method"]["method"]["class"].endswith("<locals>.Own")


def test_row_guidance_needs_every_row_to_have_one(pipe, tmp_path):
    rows = [P.Row(0, 2, "a cat", ("hate",), 1, 9.0), P.Row(1, 3, "a dog", ("hate",), 2, None)]
    with pytest.raises(ValueError, match=r"^row 1 \(line 3\) has no guidance scale, which guidance 'row' needs$"):
        G.generate(pipe, rows, tmp_path / "run", safety="max", guidance_scale="row", images_per_prompt=1, batch=1,
                   steps=2, height=16, width=16, progress=False)
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the folder records anything
