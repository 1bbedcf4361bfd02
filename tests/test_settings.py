"""What an image's settings record, and that it is true: a preset's name as the registry gives it (never found from
the numbers), a method object as it was before sampling (its class, module, `settings()` and the configuration of
the built-in method it extends), the schedule's steps beside the iterations a STOP left, one guidance scale; a preset
added to the registry reaches every entry point; README's research example records what it ran; settings written
in earlier formats still read back."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sld_minimal import STOP, methods, presets
from sld_minimal import guidance as G
from sld_minimal.app import cli
from sld_minimal.conditions import PROMPT, UNCOND
from sld_minimal.guidance import DEFAULT_CONCEPT, SafetyConfig
from sld_minimal.outputs import SETTINGS_FORMAT, png_bytes, render, settings_from_png
from sld_minimal.pipeline import StableDiffusion

pytestmark = [pytest.mark.filterwarnings("ignore:the safety guidance never acts"),
              pytest.mark.filterwarnings("ignore:the .* is longer than 77 tokens")]

ROOT = Path(__file__).resolve().parents[1]
KW = dict(seed=3, height=32, width=32, num_inference_steps=4, progress=False)
MINE = SafetyConfig(2000, 7, 0.025, 0.5, 0.7)  # strong's numbers, registered under a name of its own
NUDITY = SafetyConfig(scale=800, warmup_steps=1, threshold=0.02, momentum_scale=0.3, momentum_beta=0.5,
                      concept="the king")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return StableDiffusion.from_pretrained(tiny_ckpt)


@pytest.fixture
def mine(monkeypatch):
    """A preset added to the registry for one test (as `presets.register("mine", MINE)` would)."""
    monkeypatch.setitem(presets.PRESETS, "mine", (MINE,))
    return "mine"


# ----------------------------------------------------------------------------- one registry, names from it

def test_the_preset_name_comes_from_the_registry_never_from_the_numbers(pipe, mine):
    def names(safety):
        return [c["preset"] for c in pipe("a cat", safety=safety, **KW).settings[0]["safety"]]

    assert names("mine") == ["mine"]  # strong's numbers under its own name: "mine", not "strong"
    assert names("strong") == ["strong"] and names(G.PRESETS["max"]) == ["max"]  # the authors' table, named
    assert names(SafetyConfig(2000, 7, 0.025, 0.5, 0.7)) == ["custom"]  # made by hand: custom, whatever its numbers
    assert names(dataclasses.replace(G.PRESETS["strong"], scale=3000)) == ["custom"]  # changed: strong no more
    assert names(presets.safety_configs("strong", ["a dog", "the king"])) == ["strong", "strong"]  # other concepts


def test_a_registered_preset_reaches_both_command_lines_and_i2p(tiny_ckpt, mine, prompts_csv, tmp_path, capsys):
    out = tmp_path / "mine.png"  # the parser is built after the registry changed: --safety offers it
    assert cli.main(["generate", "a cat", "--weights", str(tiny_ckpt), "--out", str(out), "--safety", "MINE",
                     "--safety-concept", "a dog", "--height", "32", "--width", "32", "--steps", "3", "--seed", "1",
                     "--quiet"]) == 0, capsys.readouterr().err
    text = Image.open(out).text["parameters"]
    assert "Safety: mine (scale=2000.0, warmup_steps=7," in text and "Safety concept: a dog" in text
    run = tmp_path / "run"
    assert cli.main(["i2p", "generate", "--prompts", str(prompts_csv), "--weights", str(tiny_ckpt), "--out", str(run),
                     "--safety", "mine", "--steps", "1", "--height", "16", "--width", "16", "--images-per-prompt", "1",
                     "--limit", "1", "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["settings"]["safety"] == MINE.values()
    with Image.open(run / "images" / "0-0.png") as im:
        assert "Safety: mine (scale=2000.0" in im.info["parameters"]


def test_a_preset_registered_before_the_demo_starts_is_in_its_list():
    code = ("from sld_minimal import presets\n"
            "from sld_minimal.guidance import SafetyConfig\n"
            "presets.register('mine', SafetyConfig(300, 2, 0.0, 0.1, 0.2))\n"
            "from sld_minimal.app import demo\n"
            "assert demo.PRESET_CHOICES[-2:] == ['mine', demo.CUSTOM], demo.PRESET_CHOICES\n"
            "print(list(demo.preset_values('mine').values()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[300.0, 2, 0.0, 0.1, 0.2]"


def test_register_checks_the_name_and_the_configs():
    with pytest.raises(ValueError, match=r"^a preset name is lower case, not 'custom' and not yet taken \(off, weak, "
                                         r"medium, strong, max, sega-medium, sega-strong, sega-max\); got 'strong'$"):
        presets.register("strong", MINE)
    for name in ("Mine", "custom", ""):
        with pytest.raises(ValueError, match="a preset name is lower case"):
            presets.register(name, MINE)
    with pytest.raises(TypeError, match="preset 'mine' must be a preset name, a SafetyConfig"):
        presets.register("mine", {"scale": 3})
    assert "mine" not in presets.PRESETS


def test_build_leaves_out_configs_that_are_off():
    """s_S ≤ 1 turns a config off: `build` makes plain CFG of it (no safety term that "never acts" to warn about),
    and SEGA alone beside edits; the settings still record it as given."""
    off = SafetyConfig(scale=1.0)
    assert type(presets.build([off])) is methods.CFG and methods.never_acts(presets.build([off]), 5) is None
    assert type(presets.build([off], [G.Edit("a hat")])) is methods.SEGA
    assert presets.record([off])["safety"][0]["scale"] == 1.0


# ----------------------------------------------------------------------------- a method object, as it started

class Drifting(methods.SLD):
    """Changes its own configuration as it runs, by assignment: the record must be the configuration it started
    from, not the one it ended with."""

    def __call__(self, eps, step, num_steps, t):
        self.safety = [dataclasses.replace(c, scale=c.scale + 100) for c in self.safety]
        self.guidance_scale += 1
        return super().__call__(eps, step, num_steps, t)


class Tempered(methods.CFG):
    """A caller's method that states its own settings."""

    def __init__(self, tau):
        super().__init__(5.0)
        self.tau = tau

    def settings(self):
        return {"tau": self.tau, "schedule": ("cosine", 2)}


class Bare:
    """A method of no built-in kind, without settings(): CFG at s_g 7.5 by hand."""

    def conditions(self, step, num_steps, t):
        return [UNCOND, PROMPT]

    def __call__(self, eps, step, num_steps, t):
        return eps[UNCOND] + 7.5 * (eps[PROMPT] - eps[UNCOND]), {}


def test_a_method_object_is_recorded_as_it_was_before_sampling(pipe, tmp_path):
    out = pipe("a cat", method=Drifting(NUDITY, 6.0), **KW)
    s = out.settings[0]
    assert s["method"] == {"class": "Drifting", "module": __name__, "settings": None,
                           "description": methods.SLD(NUDITY, 6.0).describe()}  # s_g 6.0, not 10.0
    assert s["safety"] == [{"preset": "custom", **NUDITY.values(), "concept": "the king"}]  # s_S 800, not 1300
    assert s["guidance_scale"] == 6.0 and s["edits"] == [] and s["format"] == SETTINGS_FORMAT == 3
    assert f"Method: Drifting ({__name__}): SLD (s_g 6.0;" in out.parameters[0]
    assert "Guidance: 6.0," in out.parameters[0]
    assert "Safety: custom (scale=800.0," in out.parameters[0]

    own = pipe("a cat", method=Tempered(0.5), **KW)  # settings() recorded as is (in its JSON form)
    assert own.settings[0]["method"]["settings"] == {"tau": 0.5, "schedule": ["cosine", 2]}
    assert 'Method settings: {"tau": 0.5, "schedule": ["cosine", 2]}' in own.parameters[0]
    path = own.save(tmp_path / "own.png")[0]
    assert settings_from_png(path) == own.settings[0]
    bare = pipe("a cat", method=Bare(), **KW).settings[0]
    assert bare["method"] == {"class": "Bare", "module": __name__, "description": None, "settings": None}
    assert (bare["guidance_scale"], bare["safety"]) == (None, [])

    class Opaque(Tempered):
        def settings(self):
            return {"tau": object()}

    with pytest.raises(TypeError, match=r"^test_a_method_object_is_recorded_as_it_was_before_sampling.<locals>"
                                        r"\.Opaque\.settings\(\) must return a dict of JSON values"):
        pipe("a cat", method=Opaque(0.5), **KW)


def test_guidance_scale_beside_a_method_is_refused(pipe):
    message = r"^method= carries its own guidance scale \(s_g = 3.0\): set it on the method, not with guidance_scale=$"
    with pytest.raises(ValueError, match=message):
        pipe("a cat", method=methods.SLD(NUDITY, guidance_scale=3.0), guidance_scale=12, **KW)
    with pytest.raises(ValueError, match=r"s_g = 7.5"):  # the default's value, given: still a second scale
        pipe("a cat", method=methods.CFG(), guidance_scale=7.5, **KW)
    out = pipe("a cat", method=methods.SLD(NUDITY, guidance_scale=3.0), **KW)
    assert out.settings[0]["guidance_scale"] == 3.0 and "Guidance: 3.0," in out.parameters[0]


def test_a_stopped_run_records_its_schedule_and_the_iterations_it_made(pipe):
    out = pipe("a cat", safety="max", callback=lambda i: STOP if i.step == 2 else None, **KW)
    s = out.settings[0]
    assert (s["steps"], s["steps_taken"]) == (4, 3) and "Steps: 4 (stopped after 3 iterations)," in out.parameters[0]
    assert pipe("a cat", safety="max", **KW).settings[0]["steps_taken"] is None  # ran to the end
    # the record makes the run again: the same schedule, stopped after the same iteration
    again = pipe(s["prompt"], safety=s["safety"][0]["preset"], seed=s["seed"], num_inference_steps=s["steps"],
                 height=s["height"], width=s["width"], scheduler=s["scheduler"], progress=False,
                 callback=lambda i: STOP if i.step + 1 == s["steps_taken"] else None)
    assert np.array_equal(again.images, out.images) and again.settings == out.settings


def test_sega_edits_record_their_momentum(pipe):
    out = pipe("a cat", safety=None, edits=[G.Edit("a hat", warmup_steps=1)], edit_momentum_scale=0.2,
               edit_momentum_beta=0.6, **KW)
    assert out.settings[0]["edit_momentum"] == {"momentum_scale": 0.2, "momentum_beta": 0.6}
    assert "Edit momentum: momentum_scale=0.2, momentum_beta=0.6" in out.parameters[0]
    assert pipe("a cat", safety=None, **KW).settings[0]["edit_momentum"] is None


def test_readme_research_example_records_its_base_configuration_and_class(pipe):
    """README's "Change the method" code, run as it is on the tiny checkpoint: the scale it ramps is what acted,
    the configuration it started from and its class are what the image records."""
    readme = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class RampedSLD" in b)
    seen = []

    def watched(*args, callback=None, **kwargs):  # README's call, with every step's safety configs kept
        return pipe(*args, callback=lambda info: (seen.append(info.terms.get("safety")), callback(info))[1],
                    **kwargs)

    namespace = {"__name__": "readme_example", "pipe": watched, "SafetyConfig": SafetyConfig}
    exec(compile(code, "README.md", "exec"), namespace)
    s = namespace["out"].settings[0]
    assert len({c[0].scale for c in seen if c}) > 1  # the ramp acted: s_S moved during the run
    assert s["method"] == {"class": "RampedSLD", "module": "readme_example", "settings": None,
                           "description": methods.SLD(SafetyConfig()).describe()}
    assert s["safety"] == [{"preset": "custom", **SafetyConfig().values(), "concept": DEFAULT_CONCEPT}]
    assert (s["steps"], s["steps_taken"], s["guidance_scale"]) == (50, 31, 7.5)
    assert "Method: RampedSLD (readme_example)" in render(s)


# ----------------------------------------------------------------------------- earlier formats

FORMAT_2 = {"prompt": "a cat", "negative_prompt": "", "seed": 1, "image_index": 0, "num_images": 1, "steps": 3,
            "guidance_scale": 7.5, "scheduler": "pndm", "eta": None, "width": 16, "height": 16,
            "method": "SLD (s_g 7.5; 'the king': scale=800.0)", "safety": [], "edits": [], "model": "m",
            "version": "0.2.0", "format": 2, "never_acts": None}


@pytest.mark.parametrize("settings", [FORMAT_2, {k: v for k, v in FORMAT_2.items()  # format 1: no format, no index
                                                 if k not in ("format", "image_index", "num_images", "never_acts")}])
def test_settings_of_earlier_formats_read_back_and_render(settings, tmp_path):
    path = tmp_path / "old.png"
    path.write_bytes(png_bytes(np.zeros((16, 16, 3), np.float32), settings))
    assert settings_from_png(path) == settings
    text = Image.open(path).text["parameters"]
    assert "Steps: 3, Guidance: 7.5," in text and "Method: SLD (s_g 7.5; 'the king': scale=800.0)" in text
