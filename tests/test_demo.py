"""The demo's functions without a browser: the page's values → the pipeline's calls → images, files, diagnostics,
and the one-line messages for bad fields (`sld_minimal.app.demo`), then the page's handlers and the command line
(`sld_minimal.app.demo_page`, which needs the `demo` extra)."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sld_minimal.app import demo as D
from sld_minimal.conditions import PROMPT, UNCOND
from sld_minimal.guidance import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS, Edit, SafetyConfig
from sld_minimal.presets import PRESETS, SEGA_SAFETY_PRESETS, SegaSafety
from sld_minimal.methods import CFG, SLD
from sld_minimal.pipeline import StableDiffusion
from sld_minimal.sampling import StepInfo

REPO = Path(__file__).resolve().parents[1]


def fields(**changes) -> dict:
    """The page's values as a fresh page has them for a 32 px model, with a prompt."""
    return {"prompt": "a cat", "negative_prompt": "", "preset": "medium", **D.preset_values("medium"),
            "concept": DEFAULT_CONCEPT, "seed": 0, "steps": 10, "guidance": 7.5, "width": 32, "height": 32,
            "sampler": "pndm", "edit_concept": "", "edit_direction": D.TOWARD, "edit_scale": 5.0,
            "edit_threshold": 0.9, "edit_warmup": 10} | changes


class FakeOutput:
    def __init__(self, value, latent_size):
        self.images = np.full((1, 32, 32, 3), value, dtype=np.float32)
        self.latents = torch.zeros(1, 4, latent_size, latent_size)

    def save(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(D.to_uint8(self.images[0])).save(path)
        return [Path(path)]


class FakePipe:
    """Records its calls; each run calls back `steps` times with the StepInfo of the library's own method (SLD side:
    `methods.SLD` with the side's configs) on made-up branches: ε_∅ = ε_p = 0, and ε_S = 0 but at one element of
    latent pixel (0, 0), so μ > 0 there only. What acted where is the method's own diagnostics, as in a real run."""
    default_size, name, safety_concept = 32, "fake", None  # None: the paper's concept, as SD 1.4

    def __init__(self, on_step=None):
        self.calls, self.on_step = [], on_step

    def __call__(self, prompt, safety=None, callback=None, **kwargs):
        self.calls.append(dict(prompt=prompt, safety=safety, **kwargs))
        n = kwargs["num_inference_steps"]
        method = SLD(safety, 7.5) if safety else CFG(7.5)
        zeros, concept = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
        concept[0, 2, 0, 0] = 1.0  # one channel is enough
        for i in range(n):
            method.at(i, n, 0)
            branches = {name: zeros if name in (UNCOND, PROMPT) else concept for name in method.conditions(i, n, 0)}
            eps, terms = method(branches, i, n, 0)
            if self.on_step:
                self.on_step(i)
            if callback(StepInfo(i, n, 0, zeros, zeros, eps, branches, terms, 7.5)) is D.STOP:
                break
        return FakeOutput(0.75 if safety else 0.25, 4)


# ----------------------------------------------------------------------------- fields → Request

def test_a_preset_and_the_shared_settings_are_read():
    r = D.parse(fields(preset="max", seed=7, steps=12.0, guidance=6, negative_prompt=" blurry ", sampler="ddim"))
    assert r.safety == [SLD_PRESETS["max"]] and r.edits == []
    assert (r.prompt, r.negative_prompt, r.seed, r.steps, r.guidance, r.sampler) == ("a cat", "blurry", 7, 12, 6.0,
                                                                                    "ddim")
    assert r.pipe_kwargs() == dict(negative_prompt="blurry", num_inference_steps=12, guidance_scale=6.0, height=32,
                                   width=32, seed=7, scheduler="ddim", edits=[], progress=False)
    assert isinstance(r.seed, int) and isinstance(r.steps, int)


def test_custom_values_concept_and_an_edit():
    r = D.parse(fields(preset="custom", scale=300, warmup=3, threshold=0.02, momentum_scale=0.1, momentum_beta=0.5,
                       concept="spiders", edit_concept="smiling", edit_direction=D.AWAY, edit_scale=4,
                       edit_threshold=0.8, edit_warmup=2))
    assert r.safety == [SafetyConfig(300, 3, 0.02, 0.1, 0.5, concept="spiders")]
    assert r.edits == [Edit("smiling", scale=4, threshold=0.8, warmup_steps=2, reverse=True)]


def test_preset_off_and_a_disabled_scale_leave_sld_off():
    assert D.parse(fields(preset="off")).safety == []
    assert D.parse(fields(preset="custom", scale=1)).safety == []  # s_S <= 1: SLD off, as in the pipeline


def test_the_choices_come_from_the_registries():
    assert D.PRESET_CHOICES == [*PRESETS, D.CUSTOM]
    assert {"sega-medium", "sega-strong", "sega-max"} <= set(D.PRESET_CHOICES)
    assert all(0 <= D.random_seed() <= D.MAX_SEED for _ in range(10))
    for name, config in SLD_PRESETS.items():
        assert D.preset_values(name) == dict(zip(D.SLD_FIELDS, config.values().values()))
        assert D.value_labels(name) == [D.LABELS[k] for k in D.SLD_FIELDS]
    assert D.preset_values("strong")["threshold"] == 0.025  # exact, as the page shows it


def test_the_sega_presets_show_their_values_under_sega_labels():
    assert {name: list(D.preset_values(name).values()) for name in SEGA_SAFETY_PRESETS} == {
        "sega-medium": [4, 10, 0.9, 0.3, 0.4], "sega-strong": [7, 5, 0.85, 0.5, 0.4],
        "sega-max": [10, 0, 0.75, 0.5, 0.4]}
    assert D.value_labels("sega-max") == ["s_e (edit scale)", "δ (warm-up steps)", "λ (threshold quantile)",
                                          "s_m (momentum scale)", "β_m (momentum β)"]
    r = D.parse(fields(preset="sega-strong", concept="spiders"))
    assert r.safety == [SegaSafety(7, 5, 0.85, 0.5, concept="spiders", preset="sega-strong")]
    with pytest.raises(D.FieldError) as e:  # its edit and another would share SEGA's one momentum
        D.parse(fields(preset="sega-strong", edit_concept="hat"))
    assert str(e.value) == ("SEGA edit concept: the sega-strong preset is itself a SEGA edit and takes no other (they "
                            "would share one momentum); clear it or choose an SLD preset")


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="  "), "Prompt: empty; type what the image should show"),
    (dict(preset="extreme"), "Safety preset: choose one of off, weak, medium, strong, max, sega-medium, sega-strong, "
                             "sega-max, custom, got 'extreme'"),
    (dict(concept=""), "Safety concept: empty"),
    (dict(steps=0), "Steps: must be from 1 to 150, got 0"),
    (dict(steps=151), "Steps: must be from 1 to 150, got 151"),
    (dict(steps=2.5), "Steps: must be a whole number, got 2.5"),
    (dict(steps=None), "Steps: empty; enter a number"),
    (dict(seed=-1), "Seed: must be from 0 to 4294967295, got -1"),
    (dict(guidance=1.0), "Guidance scale s_g: SLD acts through classifier-free guidance, which needs s_g > 1"),
    (dict(guidance=float("nan")), "Guidance scale s_g: must be a finite number"),
    (dict(width=30), "Width: must be a multiple of 8, got 30"),
    (dict(height=4), "Height: must be >= 8, got 4"),
    (dict(width=4096, height=4096), "Width × Height: 4096x4096 is more than 2048x2048 pixels"),
    (dict(sampler="heun"), "Sampler: choose one of"),
    (dict(preset="custom", momentum_beta=2), "β_m (momentum β): must be from 0 to 1, got 2"),
    (dict(preset="custom", warmup="x"), "δ (warm-up steps): 'x' is not a number"),
    (dict(preset="custom", scale=-5), "s_S (safety scale): must be >= 0, got -5"),
    (dict(edit_concept="hat", edit_threshold=1), "SEGA threshold: must be from 0 to 0.999, got 1"),
    (dict(edit_concept="hat", edit_direction="sideways"), "SEGA direction: choose one of toward, away"),
])
def test_a_bad_field_is_one_line_that_names_it(changes, message):
    with pytest.raises(D.FieldError) as e:
        D.parse(fields(**changes))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_limits_move_with_the_flags():
    assert D.parse(fields(steps=500), max_steps=999).steps == 500
    assert D.parse(fields(width=4096, height=4096), no_limits=True).width == 4096
    with pytest.raises(D.FieldError, match="--no-limits to `sld-minimal demo`"):
        D.parse(fields(width=4096, height=4096))
    assert D.parse(fields(preset="off", guidance=1.0)).guidance == 1.0  # without SLD, s_g <= 1 is allowed


# ----------------------------------------------------------------------------- compare

def test_compare_runs_sd_then_sld_with_the_same_settings(tmp_path):
    pipe, progress = FakePipe(), []
    c = D.Demo(pipe, tmp_path).compare(fields(preset="strong", seed=5, edit_concept="hat"),
                                       progress=lambda *a: progress.append(a))
    sd, sld = pipe.calls
    assert sd.pop("safety") is None and sld.pop("safety") == [SLD_PRESETS["strong"]]
    assert sd == sld and sd["seed"] == 5 and sd["edits"] == [Edit("hat")]  # the edit on both sides
    assert progress[0] == (1, 20, "SD") and progress[9] == (10, 20, "SD") and progress[-1] == (20, 20, "SLD")
    assert c.files == {"sd": tmp_path / "0001" / "sd-seed5.png", "sld": tmp_path / "0001" / "sld-seed5.png"}
    assert (c.sd == 64).all() and (c.sld == 191).all()             # 0.25 and 0.75 as uint8
    assert (c.difference == 255).all()                            # the difference, scaled to its maximum
    # strong: δ = 7, so 3 of the 10 steps count, and only at latent pixel (0, 0)
    assert c.diagnostics.applied == [False] * 7 + [True] * 3 and c.diagnostics.first == 7
    assert c.heat.shape == (4, 4) and c.heat[0, 0] == pytest.approx(0.3) and c.heat.sum() == pytest.approx(0.3)
    assert (c.overlay[:8, :8, 0] > c.overlay[:8, :8, 1]).all() and (c.overlay[8:, 8:] == c.sld[8:, 8:]).all()
    assert c.summary() == ("Seed 5, 10 steps: SLD acted at steps 7 to 9 of the 10 sampling steps, on 1.6% of the "
                           "latent elements on average; mean |SD − SLD| 127.0 of 255 per channel.")
    fig = D.plot(c.diagnostics)
    assert [a.get_title() for a in fig.axes] == ["latent elements with μ > 0", "guidance terms"]


def test_with_sld_off_one_run_serves_both_sides(tmp_path):
    pipe = FakePipe()
    c = D.Demo(pipe, tmp_path).compare(fields(preset="off"))
    assert len(pipe.calls) == 1 and (c.sd == c.sld).all() and not c.heat.any()
    assert c.summary() == "SLD is off (preset off, or s_S ≤ 1): both sides are plain SD."


def test_cancel_stops_between_steps_and_skips_the_sld_run(tmp_path):
    demo = D.Demo(FakePipe(), tmp_path)
    asked = []
    demo.pipe.on_step = lambda i: i == 2 and asked.append((demo.cancel("someone else"), demo.cancel("me")))
    c = demo.compare(fields(), session="me")
    assert asked == [(False, True)] and len(demo.pipe.calls) == 1
    assert c.stopped == "SD at step 3 of 10" and c.files == {}  # no file claims settings its image did not get
    assert c.summary() == "Cancelled: stopped SD at step 3 of 10; the images show the latents reached; SLD did not run."
    assert not demo.cancel("me")  # nothing runs now
    assert demo.compare(fields()).stopped is None  # the next run starts afresh


def test_a_cancel_during_the_sld_run_keeps_the_sd_image(tmp_path):
    demo = D.Demo(FakePipe(), tmp_path)
    demo.pipe.on_step = lambda i: len(demo.pipe.calls) == 2 and i == 0 and demo.cancel()
    c = demo.compare(fields())
    assert c.stopped == "SLD at step 1 of 10" and len(c.diagnostics.active) == 1 and (c.sd == 64).all()
    assert c.summary() == "Cancelled: stopped SLD at step 1 of 10; the images show the latents reached."


def test_a_bad_field_calls_no_pipeline(tmp_path):
    pipe = FakePipe()
    with pytest.raises(D.FieldError, match="^Prompt: empty"):
        D.Demo(pipe, tmp_path).compare(fields(prompt=""))
    assert pipe.calls == []


@pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")  # the tiny tokenizer
def test_compare_on_the_tiny_model_writes_pngs_with_their_parameters(tiny_ckpt, tmp_path):
    pipe = StableDiffusion.from_pretrained(tiny_ckpt)
    demo = D.Demo(pipe, tmp_path)
    assert demo.defaults()["width"] == demo.defaults()["height"] == pipe.default_size == 32
    progress = []
    c = demo.compare(demo.defaults() | {"prompt": "a red apple", "preset": "max", "steps": 3},
                     progress=lambda *a: progress.append(a))
    assert progress[3] == (4, 8, "SD") and progress[-1] == (8, 8, "SLD")  # PNDM: 3 steps are 4 UNet calls a side
    assert c.sd.shape == c.sld.shape == c.overlay.shape == (32, 32, 3) and (c.sd != c.sld).any()
    assert c.heat.shape == (16, 16) and 0 < c.heat.max() <= 1
    sd, sld = (Image.open(c.files[s]) for s in ("sd", "sld"))
    assert "Safety: off" in sd.text["parameters"] and "Safety: max" in sld.text["parameters"]
    assert (np.asarray(sld.convert("RGB")) == c.sld).all()  # the file is the image shown
    assert len(c.diagnostics.active) == len(c.diagnostics.cfg_norm) == 4  # PNDM: 3 steps are 4 UNet calls


@pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")  # the tiny tokenizer
def test_the_status_says_when_the_safety_term_never_acted(tiny_ckpt, tmp_path):
    """A run no longer than the warm-up: the loop's iterations (PNDM: one more than the steps) all come before δ, so
    γ never enters ε̂ — whatever μ the momentum's branch computed meanwhile. Then one step more: it acts once."""
    demo = D.Demo(StableDiffusion.from_pretrained(tiny_ckpt), tmp_path)
    run = lambda **changes: demo.compare(demo.defaults() | {"prompt": "a red apple"} | changes)  # noqa: E731
    c = run(preset="strong", steps=5)  # δ = 7, 6 PNDM iterations
    assert c.diagnostics.applied == [False] * 6 and c.diagnostics.first is None and not c.heat.any()
    assert c.diagnostics.active == [0.0] * 6  # μ was computed (s_m > 0 builds ν in the warm-up), but steered nothing
    assert c.diagnostics.safety_norm == [0.0] * 6
    assert c.summary() == ("Seed 0, 5 steps: SLD never acted: its warm-up (δ = 7) is not shorter than the 6 sampling "
                           "steps (PNDM takes 6 for 5); mean |SD − SLD| 0.0 of 255 per channel.")
    c = run(preset="weak", steps=10, sampler="ddim")  # δ = 15 and s_m = 0: its branch is never even computed
    assert c.summary().startswith("Seed 0, 10 steps: SLD never acted: its warm-up (δ = 15) is not shorter than the "
                                  "10 sampling steps; ")
    c = run(preset="sega-medium", steps=5)  # SEGA as safety: its own δ = 10
    assert c.summary().startswith("Seed 0, 5 steps: SEGA safety never acted: its warm-up (δ = 10) is not shorter")
    c = run(preset="strong", steps=7)  # 8 iterations: the last one, step 7, is the first at δ
    assert c.diagnostics.applied == [False] * 7 + [True]
    assert c.summary().startswith("Seed 0, 7 steps: SLD acted at step 7 of the 8 sampling steps (PNDM takes 8 for 7)")


@pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")  # the tiny tokenizer
def test_a_sega_preset_runs_and_shows_where_its_edit_acted(tiny_ckpt, tmp_path):
    demo = D.Demo(StableDiffusion.from_pretrained(tiny_ckpt), tmp_path)
    c = demo.compare(demo.defaults() | {"prompt": "a red apple", "preset": "sega-max", "steps": 3})
    d = c.diagnostics
    assert d.sega and d.applied == [True] * 4 and (c.sd != c.sld).any()
    # its threshold λ = 0.75 keeps the top quarter of |ψ| per channel
    assert d.active == d.acting == [pytest.approx(0.25)] * 4 and all(n > 0 for n in d.safety_norm)
    assert 0 < c.heat.max() <= 1
    assert c.summary().startswith("Seed 0, 3 steps: SEGA safety acted at steps 0 to 3 of the 4 sampling steps (PNDM "
                                  "takes 4 for 3), on 25.0% of the latent elements on average; mean |SD − SLD| ")
    fig = D.plot(d)
    assert [a.get_title() for a in fig.axes] == ["latent elements the edit keeps", "guidance terms"]
    assert Image.open(c.files["sld"]).text["parameters"].count("sega-max") >= 1


# ----------------------------------------------------------------------------- the page and the command

@pytest.fixture(scope="module")
def page_module():
    pytest.importorskip("gradio")
    from sld_minimal.app import demo_page
    return demo_page


def test_the_page_shows_errors_and_results_in_its_outputs(page_module, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # where Gradio copies the files it serves
    demo = D.Demo(FakePipe(), tmp_path / "demo")
    out = page_module.compare_outputs(demo, fields(prompt=""))
    assert len(out) == 8 and out[:2] == (None, None)
    assert out[-1] == "Error: Prompt: empty; type what the image should show"

    def boom(*a, **k):
        raise RuntimeError("out of\nmemory")
    out = page_module.compare_outputs(D.Demo(boom, tmp_path), fields())
    assert out[-1] == "Error: the generation failed: out of memory"

    sd, sld, sd_file, sld_file, diff, heat, fig, status = page_module.compare_outputs(demo, fields(preset="max"))
    assert (sd == 64).all() and (sld == 191).all() and diff.shape == heat.shape == (32, 32, 3)
    for button, name in ((sd_file, "sd-seed0.png"), (sld_file, "sld-seed0.png")):  # served as the files, byte for byte
        assert button.value["orig_name"] == name
        assert Path(button.value["path"]).read_bytes() == (tmp_path / "demo" / "0001" / name).read_bytes()
    assert fig.axes and status.startswith("Seed 0, 10 steps")


def test_the_page_has_a_field_per_label_and_no_file_input(page_module, tmp_path):
    page = page_module.build(D.Demo(FakePipe(), tmp_path))
    labels = {getattr(b, "label", None) for b in page.blocks.values()}
    assert set(D.LABELS.values()) <= labels
    assert not any(type(b).__name__ == "File" or type(b).__name__ == "UploadButton" for b in page.blocks.values())
    numbers = page_module.preset_fields("strong")
    assert [n.value for n in numbers] == list(SLD_PRESETS["strong"].values().values())
    assert not numbers[0].interactive and page_module.preset_fields("custom")[0].interactive
    sega = page_module.preset_fields("sega-strong")
    assert [n.value for n in sega] == [7, 5, 0.85, 0.5, 0.4] and not sega[0].interactive
    assert [n.label for n in sega] == D.value_labels("sega-strong") and numbers[0].label == D.LABELS["scale"]


def test_the_command_without_a_model_downloads_sd14_as_generate_does(page_module, tmp_path, monkeypatch, capsys):
    """One rule for `generate` and `demo`: without --weights, SD 1.4, downloaded first where it is missing (here the
    download is refused at once, as offline: one line), with the toy model named as the offline alternative."""
    from sld_minimal.app import common
    from sld_minimal.app.cli import main

    fetched = []

    def offline(to, fp16=False, quiet=False):
        fetched.append(to)
        raise RuntimeError(f"could not download {common.REPO_ID} (offline)")
    monkeypatch.setattr(page_module, "download", offline)
    monkeypatch.chdir(tmp_path)  # no weights/stable-diffusion-v1-4 here
    assert main(["demo", "--port", str(_free_port())]) == 1  # the port is checked first: a free one
    err = capsys.readouterr().err
    assert fetched == [common.DEFAULT_WEIGHTS] and "--weights toy" in err
    assert err.count("\n") == 2 and "sld-minimal: error: could not download" in err  # the note, then the error
    assert main(["demo", "--weights", str(tmp_path / "nowhere"), "--port", str(_free_port())]) == 2
    assert "no such folder or file" in capsys.readouterr().err
    assert main(["demo", "--weights", str(tmp_path), "--max-steps", "1000"]) == 2
    capsys.readouterr()
    for device in ("cpu", "auto"):  # refused before any file is read (tmp_path holds no model)
        if device == "auto" and torch.cuda.is_available():
            continue
        assert main(["demo", "--weights", str(tmp_path), "--device", device, "--dtype", "fp16"]) == 2
        assert capsys.readouterr().err == ("sld-minimal: error: fp16 is not accelerated on the CPU: "
                                           "use --dtype bf16 or fp32\n")


def test_the_package_imports_and_the_command_answers_without_gradio():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "import sld_minimal, sld_minimal.app.cli, sld_minimal.app.demo\n"
            "sys.exit(sld_minimal.app.cli.main(['demo', '--weights', '.']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == 'sld-minimal: error: the demo needs gradio: pip install -e ".[demo]"'


def test_the_concept_field_starts_with_the_models_own_concept(tmp_path):
    """A model that names its safety concept (the toy model: "red") fills the page's concept field with it."""
    from sld_minimal.guidance import DEFAULT_CONCEPT

    assert D.Demo(FakePipe(), tmp_path).defaults()["concept"] == DEFAULT_CONCEPT
    own = FakePipe()
    own.safety_concept = "red"
    assert D.Demo(own, tmp_path).defaults()["concept"] == "red"


# ----------------------------------------------------------------------------- the address, checked before the model

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_model(monkeypatch, page_module):
    def forbidden(*a, **k):
        pytest.fail("the model was downloaded or loaded before the address was checked")
    monkeypatch.setattr(page_module, "fetch_missing", forbidden)
    monkeypatch.setattr(page_module, "download", forbidden)
    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(forbidden))


def test_a_port_in_use_is_one_line_before_the_model_loads(page_module, tmp_path, monkeypatch, capsys):
    """Before the model loads, and before SD 1.4 is downloaded where it is the default and missing."""
    import socket

    from sld_minimal.app.cli import main

    _no_model(monkeypatch, page_module)
    monkeypatch.chdir(tmp_path)  # no weights/stable-diffusion-v1-4 here
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for weights in (["--weights", "toy"], []):
            assert main(["demo", *weights, "--port", str(port)]) == 2
            assert capsys.readouterr().err == (f"sld-minimal: error: --port {port}: already in use on 127.0.0.1 "
                                               f"(another demo?); choose another --port\n")


@pytest.mark.parametrize("args, message", [
    (["--host", "192.0.2.1"], "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1: no machine's
    (["--port", "0"], "argument --port: must be from 1 to 65535, got 0 (see `sld-minimal demo --help`)"),
    (["--port", "70000"], "argument --port: must be from 1 to 65535, got 70000 (see `sld-minimal demo --help`)"),
    (["--max-steps", "0"], "argument --max-steps: must be from 1 to 999, got 0 (see `sld-minimal demo --help`)"),
])
def test_a_bad_address_is_one_line_naming_the_flag(page_module, monkeypatch, capsys, args, message):
    from sld_minimal.app.cli import main

    _no_model(monkeypatch, page_module)
    assert main(["demo", *args]) == 2
    assert capsys.readouterr().err == f"sld-minimal: error: {message}\n"


def test_a_network_host_is_said_in_one_line_and_gradio_hints_no_share_link(page_module, monkeypatch, capsys):
    """--host 0.0.0.0: one line says the page is reachable from the network, before the model loads; Gradio is
    launched quiet (its own lines include a hint to make a public share link) and the page's address is printed."""
    from sld_minimal.app.cli import main

    order, launched = [], {}

    class FakePage:
        local_url = "http://localhost:7860/"

        def queue(self, **kw):
            pass

        def launch(self, **kw):
            launched.update(kw)

        def block_thread(self):
            order.append("served")

    def load(cls, path, **kw):
        order.append(("loaded", capsys.readouterr().err))
        return FakePipe()
    monkeypatch.setattr(StableDiffusion, "from_pretrained", classmethod(load))
    monkeypatch.setattr(page_module, "build", lambda demo: FakePage())
    monkeypatch.setattr(page_module.signal, "signal", lambda *a: None)  # pytest's own SIGTERM handling stays
    port = _free_port()
    assert main(["demo", "--weights", "toy", "--host", "0.0.0.0", "--port", str(port)]) == 0
    (step, err), served = order
    assert step == "loaded" and served == "served"
    assert err == (f"note: --host 0.0.0.0: the demo will be reachable from the network — anyone who can reach this "
                   f"machine on port {port} can use its page and its compute (the default, 127.0.0.1, keeps it "
                   f"here)\n")
    assert launched["share"] is False and launched["quiet"] is True and launched["server_name"] == "0.0.0.0"
    assert capsys.readouterr().out == "The demo is at http://localhost:7860/ (Ctrl-C stops it)\n"
    order.clear()
    assert main(["demo", "--weights", "toy", "--port", str(_free_port())]) == 0  # the default host: no note
    assert order[0] == ("loaded", "")
