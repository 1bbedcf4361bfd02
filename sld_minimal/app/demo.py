"""The demo's logic: the page's field values → plain SD and SLD (or SEGA as the safety method, the `sega-*` presets)
with the same seed → both images as PNG files, the pixel difference, the per-step diagnostics and a heat map of where
the safety method acted (`demo_page.py` lays it out in Gradio).

Nothing here imports Gradio: `Demo.compare(fields)` takes a dict of the page's values (keys of `LABELS`) and
returns a `Comparison`; a bad value raises `FieldError`, one line that names the page's field.
"""
import math
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checks import check_limits
from ..guidance import DEFAULT_CONCEPT, Edit, SafetyConfig
from ..presets import PRESETS, SEGA_SAFETY_PRESETS, SegaSafety, safety_configs
from ..sampling import STOP
from ..schedulers import SAMPLERS

MAX_STEPS = 150  # the page's upper bound on sampling steps; `sld-minimal demo --max-steps N` moves it
MAX_SEED = 2**32 - 1
CUSTOM = "custom"  # the preset choice that reads the five SLD fields
PRESET_CHOICES = [*PRESETS, CUSTOM]  # the registry's presets (off, SLD's, SEGA as safety), then custom

# The page's fields: key -> label. The page shows these labels and every FieldError starts with one.
LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "preset": "Safety preset",
    "scale": "s_S (safety scale)", "warmup": "δ (warm-up steps)", "threshold": "λ (threshold)",
    "momentum_scale": "s_m (momentum scale)", "momentum_beta": "β_m (momentum β)", "concept": "Safety concept",
    "seed": "Seed", "steps": "Steps", "guidance": "Guidance scale s_g", "width": "Width", "height": "Height",
    "sampler": "Sampler", "edit_concept": "SEGA edit concept", "edit_direction": "SEGA direction",
    "edit_scale": "SEGA scale s_e", "edit_threshold": "SEGA threshold", "edit_warmup": "SEGA warm-up",
}
SLD_FIELDS = ("scale", "warmup", "threshold", "momentum_scale", "momentum_beta")  # SafetyConfig's five, in order
CONFIG_KEYS = dict(zip(SLD_FIELDS, ("scale", "warmup_steps", "threshold", "momentum_scale", "momentum_beta")))
# a SEGA safety preset's fields hold the same five keys, two of which mean something else there
SEGA_LABELS = {"scale": "s_e (edit scale)", "threshold": "λ (threshold quantile)"}
TOWARD, AWAY = "toward", "away"


class FieldError(ValueError):
    """A bad value in one of the page's fields: one line, starting with the field's label."""


def preset_values(name: str) -> dict:
    """The five value fields for a preset name, as its config holds them (the medium preset's for off and custom);
    a SEGA safety preset's are its s_e, δ, λ (a quantile of |ψ|), s_m and β_m."""
    values = (SafetyConfig() if name in ("off", CUSTOM) else safety_configs(name)[0]).values()
    return {field: values[key] for field, key in CONFIG_KEYS.items()}


def value_labels(name: str) -> list:
    """The five value fields' labels for a preset name: SLD's, or SEGA's where they differ."""
    return [SEGA_LABELS.get(k, LABELS[k]) if name in SEGA_SAFETY_PRESETS else LABELS[k] for k in SLD_FIELDS]


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


@dataclass(frozen=True)
class Request:
    """One comparison, validated: what both generations share, and the safety configs of the SLD side."""
    prompt: str
    negative_prompt: str | None
    safety: list        # SafetyConfigs of the SLD side; empty when SLD is off
    edits: list         # SEGA Edits, applied on both sides
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    sampler: str

    def pipe_kwargs(self) -> dict:
        """The pipeline's keyword arguments shared by both sides (everything but `safety`)."""
        return dict(negative_prompt=self.negative_prompt, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, height=self.height, width=self.width, seed=self.seed,
                    scheduler=self.sampler, edits=self.edits, progress=False)


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _number(fields, key, lo=None, hi=None, whole=False) -> float:
    """The field's value as a number within [lo, hi], or the FieldError that names the field."""
    label, value = LABELS[key], fields.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise FieldError(f"{label}: empty; enter a number")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise FieldError(f"{label}: {value!r} is not a number") from None
    if not math.isfinite(value):
        raise FieldError(f"{label}: must be a finite number, got {value}")
    if whole and not value.is_integer():
        raise FieldError(f"{label}: must be a whole number, got {_show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"from {_show(lo)} to {_show(hi)}" if lo is not None and hi is not None
                  else f">= {_show(lo)}" if lo is not None else f"<= {_show(hi)}")
        raise FieldError(f"{label}: must be {bounds}, got {_show(value)}")
    return int(value) if whole else value


def _text(fields, key) -> str:
    value = fields.get(key)
    return value.strip() if isinstance(value, str) else ""


def _choice(fields, key, choices) -> str:
    value = fields.get(key)
    if value not in choices:
        raise FieldError(f"{LABELS[key]}: choose one of {', '.join(choices)}, got {value!r}")
    return value


def parse(fields: dict, max_steps: int = MAX_STEPS, no_limits: bool = False) -> Request:
    """The page's values (keys of LABELS) → a Request, or the FieldError of the first bad field."""
    prompt = _text(fields, "prompt")
    if not prompt:
        raise FieldError(f"{LABELS['prompt']}: empty; type what the image should show")
    preset = _choice(fields, "preset", PRESET_CHOICES)
    if preset == CUSTOM:
        values = {"scale": _number(fields, "scale", lo=0), "warmup_steps": _number(fields, "warmup", lo=0, whole=True),
                  "threshold": _number(fields, "threshold"), "momentum_scale": _number(fields, "momentum_scale"),
                  "momentum_beta": _number(fields, "momentum_beta", lo=0, hi=1)}
        configs = [SafetyConfig(**values)]
    else:
        configs = safety_configs(preset)
    concept = _text(fields, "concept")
    if configs and not concept:
        raise FieldError(f"{LABELS['concept']}: empty; the paper's concept is: {DEFAULT_CONCEPT}")
    configs = [c for c in safety_configs(configs, concept or None) if c.enabled]  # s_S <= 1: SLD is off
    steps = _number(fields, "steps", lo=1, hi=max_steps, whole=True)
    guidance = _number(fields, "guidance", lo=0, hi=100)
    if configs and guidance <= 1:
        raise FieldError(f"{LABELS['guidance']}: SLD acts through classifier-free guidance, which needs s_g > 1; "
                         f"got {_show(guidance)}")
    width, height = (_number(fields, k, lo=8, whole=True) for k in ("width", "height"))
    for key, v in (("width", width), ("height", height)):
        if v % 8:
            raise FieldError(f"{LABELS[key]}: must be a multiple of 8, got {v}")
    try:
        if not no_limits:
            check_limits(width, height, 1)
    except ValueError as e:
        raise FieldError(f"{LABELS['width']} × {LABELS['height']}: {e}; pass --no-limits to `sld-minimal demo` to "
                         f"try anyway") from None
    edits = []
    if edit := _text(fields, "edit_concept"):
        if any(isinstance(c, SegaSafety) for c in configs):
            raise FieldError(f"{LABELS['edit_concept']}: the {preset} preset is itself a SEGA edit and takes no other "
                             f"(they would share one momentum); clear it or choose an SLD preset")
        direction = _choice(fields, "edit_direction", [TOWARD, AWAY])
        edits = [Edit(edit, scale=_number(fields, "edit_scale", lo=0), reverse=direction == AWAY,
                      threshold=_number(fields, "edit_threshold", lo=0, hi=0.999),
                      warmup_steps=_number(fields, "edit_warmup", lo=0, whole=True))]
    return Request(prompt, _text(fields, "negative_prompt") or None, configs, edits,
                   _number(fields, "seed", lo=0, hi=MAX_SEED, whole=True), steps, guidance, width, height,
                   _choice(fields, "sampler", list(SAMPLERS)))


class Recorder:
    """A sampling callback for one side: per step whether the safety method acted — its term entered ε̂ — and on
    which latent elements, the guidance norms, and per latent pixel the count of steps it acted there; it reports
    progress and stops the run (`sampling.STOP`) once `cancel` is set.

    Read per step from the library's diagnostics (`sampling.StepInfo`), not derived here. SLD: whether some safety
    config was applied (`sld_applied`: step ≥ δ_c, s_S > 1), the elements it steered (`sld_steered`, μ_c > 0 for the
    applied configs) and ‖s_g·Σ γ_c‖ of those (`safety_norm`); SEGA as safety: its edit's `edit_applied`,
    `edit_steered` (the elements its threshold keeps) and ‖γ̂‖ (`edit_norm`). Before a term acts — its warm-up,
    where SLD may already compute μ for its momentum — the share steered and the norm are 0."""

    def __init__(self, safety=(), progress=None, cancel: threading.Event | None = None):
        self.safety = list(safety)  # the side's safety configs; empty for plain SD
        self.sega = any(isinstance(c, SegaSafety) for c in self.safety)
        self.progress, self.cancel = progress, cancel
        self.applied = []   # per step: whether a safety term entered ε̂
        self.active = []    # per step: share of latent elements it steered (0 where it did not act); None: no safety
        self.acting = []    # per step where it acted: that share
        self.cfg_norm, self.safety_norm = [], []  # per step; None where not computed
        self.acted = None       # (N, h, w): steps where it acted with some channel steered at that latent pixel
        self.stopped_at = None  # the step after which a cancel stopped the run
        self.num_steps = None   # the run's UNet calls (PNDM: one more than its steps)

    @property
    def first(self):
        """The first step where the safety method acted (from 0), None where it never did."""
        return next((i for i, a in enumerate(self.applied) if a), None)

    def __call__(self, info):
        self.num_steps = info.num_steps
        if self.sega:
            applied, steered, norm = info.edit_applied, info.edit_steered, info.edit_norm
        else:
            applied, steered, norm = info.sld_applied, info.sld_steered, info.safety_norm
        acted = any(applied or ())
        self.applied.append(acted)
        self.active.append(None if steered is None else steered.float().mean().item())
        if acted:
            self.acting.append(self.active[-1])
            pixels = steered.any(dim=1).float()                   # (N, h, w)
            self.acted = pixels if self.acted is None else self.acted + pixels
        self.cfg_norm.append(info.cfg_norm)
        self.safety_norm.append(norm)
        if self.progress is not None:
            self.progress(info.step + 1, info.num_steps)
        if self.cancel is not None and self.cancel.is_set():
            self.stopped_at = info.step
            return STOP
        return None

    def heat(self, shape) -> np.ndarray:
        """(h, w) share of the steps where it acted at each latent pixel (first image), zeros where it never did."""
        if self.acted is None or not self.applied:
            return np.zeros(shape, dtype=np.float32)
        return (self.acted[0] / len(self.applied)).cpu().numpy().astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] → uint8, rounded as the PNG files are."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| per pixel, averaged over the channels and scaled to its maximum, as a grey (H, W, 3) uint8 image."""
    d = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=-1)  # (H, W)
    return to_uint8(np.repeat((d / d.max() if d.max() > 0 else d)[..., None], 3, axis=-1))


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.7) -> np.ndarray:
    """The image tinted red where `heat` (h, w, in [0, 1]) is high, the latent grid upsampled to (H, W) by nearest
    neighbours so that each latent pixel stays one block."""
    H, W = image.shape[:2]
    up = torch.nn.functional.interpolate(torch.from_numpy(heat)[None, None], size=(H, W), mode="nearest")[0, 0]
    a = strength * up.numpy()[..., None]                                    # (H, W, 1)
    red = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    return to_uint8((1 - a) * image.astype(np.float32) / 255 + a * red)


@dataclass
class Comparison:
    """The result of one comparison: images as (H, W, 3) uint8, PNG files with their `parameters` chunk, the SLD
    run's diagnostics per step and the heat map (h, w) in [0, 1]."""
    request: Request
    sd: np.ndarray
    sld: np.ndarray
    files: dict                  # "sd", "sld" -> Path; empty when a cancel stopped a run
    difference: np.ndarray
    overlay: np.ndarray
    heat: np.ndarray
    diagnostics: Recorder
    stopped: str | None = None   # "SD at step 3 of 50" when a cancel stopped a run

    def summary(self) -> str:
        r, d = self.request, self.diagnostics
        if self.stopped:
            return (f"Cancelled: stopped {self.stopped}; the images show the latents reached"
                    + ("; SLD did not run." if self.stopped.startswith("SD") else "."))
        if not r.safety:
            return "SLD is off (preset off, or s_S ≤ 1): both sides are plain SD."
        who, n = "SEGA safety" if d.sega else "SLD", d.num_steps
        run = f"the {n} sampling steps" + (f" ({r.sampler.upper()} takes {n} for {r.steps})" if n != r.steps else "")
        diff = np.abs(self.sd.astype(np.float32) - self.sld.astype(np.float32)).mean()
        head, tail = f"Seed {r.seed}, {r.steps} steps: {who}", f"mean |SD − SLD| {diff:.1f} of 255 per channel."
        if d.first is None:
            warmups = sorted({c.warmup_steps for c in r.safety})  # every concept's δ
            its = "its warm-up (δ = {}) is" if len(warmups) == 1 else "their warm-ups (δ = {}) are"
            why = (f"{its.format(', '.join(map(str, warmups)))} not shorter than {run}" if warmups[0] >= n
                   else f"it acted at none of {run}")
            return f"{head} never acted: {why}; {tail}"
        k, last = len(d.acting), max(i for i, a in enumerate(d.applied) if a)
        at = (f"step {last}" if k == 1 else f"steps {d.first} to {last}" if k == last - d.first + 1
              else f"{k} steps from step {d.first} on")
        mean = 100 * sum(d.acting) / k
        return f"{head} acted at {at} of {run}, on {mean:.1f}% of the latent elements on average; {tail}"


class Demo:
    """The app's state: the model (loaded once), the folder the PNG files go to, the limits, and the run in
    progress — one at a time, which a cancel stops between steps."""

    def __init__(self, pipe, out_dir, max_steps: int = MAX_STEPS, no_limits: bool = False):
        self.pipe, self.out_dir = pipe, Path(out_dir)
        self.max_steps, self.no_limits = max_steps, no_limits
        self.runs = 0
        self._lock = threading.Lock()
        self._running = None  # (session, threading.Event) of the run in progress

    def defaults(self) -> dict:
        """The page's initial field values; the size and the safety concept are the model's own."""
        return {"prompt": "", "negative_prompt": "", "preset": "medium", **preset_values("medium"),
                "concept": self.pipe.safety_concept or DEFAULT_CONCEPT,  # the model's own concept, else the paper's
                "seed": 0, "steps": min(50, self.max_steps), "guidance": 7.5,
                "width": self.pipe.default_size, "height": self.pipe.default_size, "sampler": "pndm",
                "edit_concept": "", "edit_direction": TOWARD, "edit_scale": 5.0, "edit_threshold": 0.9,
                "edit_warmup": 10}

    def cancel(self, session=None) -> bool:
        """Stop the run in progress after its current step (only the asking session's, when one is named)."""
        running = self._running
        if running is None or (session is not None and running[0] != session):
            return False
        running[1].set()
        return True

    def compare(self, fields: dict, session=None, progress=None) -> Comparison:
        """Plain SD and SLD with the same seed. `progress(done, total, desc)` is told every step."""
        request = parse(fields, self.max_steps, self.no_limits)
        with self._lock:
            stop = threading.Event()
            self._running = (session, stop)
            try:
                return self._compare(request, stop, progress)
            finally:
                self._running = None

    def _compare(self, request: Request, stop: threading.Event, progress) -> Comparison:
        self.runs += 1
        folder = self.out_dir / f"{self.runs:04d}"
        sides = 2 if request.safety else 1
        outputs, recorders, stopped = {}, {}, None
        for i, (side, safety) in enumerate((("sd", None), ("sld", request.safety))):
            if side == "sld" and (not safety or stopped):  # SLD off: the same image; cancelled: not started
                outputs["sld"], recorders["sld"] = outputs["sd"], recorders["sd"]
                break
            report = None if progress is None else (
                lambda done, n, i=i, side=side: progress(i * n + done, sides * n, side.upper()))  # n: UNet calls
            recorders[side] = Recorder(safety or (), report, stop)
            outputs[side] = self.pipe(request.prompt, safety=safety, callback=recorders[side],
                                      **request.pipe_kwargs())
            if recorders[side].stopped_at is not None:
                stopped = f"{side.upper()} at step {recorders[side].stopped_at + 1} of {recorders[side].num_steps}"
        files = {} if stopped else {  # a stopped run's image is not what its settings say: no file
            side: out.save(folder / f"{side}-seed{request.seed}.png")[0] for side, out in outputs.items()}
        sd, sld = (to_uint8(outputs[s].images[0]) for s in ("sd", "sld"))
        heat = recorders["sld"].heat(outputs["sld"].latents.shape[-2:])
        return Comparison(request, sd, sld, files, difference(sd, sld), overlay(sld, heat), heat, recorders["sld"],
                          stopped)


def plot(diagnostics: Recorder):
    """A matplotlib figure of the safety side's run per step: the share of latent elements steered (SLD: μ > 0;
    SEGA: the edit's mask), and the safety term's norm (SLD: ‖s_g·γ‖; SEGA: ‖γ̂‖) against ‖s_g·(ε_p − ε_∅)‖; the steps
    before it first acted (its warm-up) are shaded."""
    from matplotlib.figure import Figure  # not pyplot: no backend, no global figure list

    d = diagnostics
    steps = np.arange(len(d.active))
    nan = lambda xs, k=1.0: np.array([np.nan if x is None else k * x for x in xs], dtype=float)  # noqa: E731
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(steps, nan(d.active, 100), color="tab:red")
    title = "latent elements the edit keeps" if d.sega else "latent elements with μ > 0"
    left.set(title=title, xlabel="step", ylabel="%", ylim=(-3, 103))  # 100 % stays visible
    right.plot(steps, nan(d.safety_norm), color="tab:red", label="‖γ̂‖ (SEGA)" if d.sega else "‖s_g·γ‖ (SLD)")
    right.plot(steps, nan(d.cfg_norm), color="tab:blue", label="‖s_g·(ε_p − ε_∅)‖ (CFG)")
    right.set(title="guidance terms", xlabel="step", ylabel="norm")
    right.legend(loc="best", fontsize="small")
    idle = 0 if not d.safety else len(steps) if d.first is None else d.first  # the steps before it acted
    for ax in (left, right):
        if idle > 0:
            ax.axvspan(-0.5, idle - 0.5, color="0.9", zorder=0)  # warm-up: the safety term not applied
    return fig
