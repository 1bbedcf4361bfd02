"""The demo's page: `sld-minimal demo`, a local Gradio app that lays out `demo.py`'s comparison of plain SD and SLD
(fields, both images with their PNG downloads, the difference, the heat map, the per-step plots, progress, cancel).

Nothing leaves the machine: Gradio's analytics are off, the theme uses the system's fonts (no font CDN), no
server-side rendering, no share link, and the server binds 127.0.0.1 unless told otherwise. No field names a file.
"""
import errno
import ipaddress
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no usage reports, no version check

import gradio as gr  # noqa: E402
import matplotlib  # noqa: E402,F401  (demo.plot draws with it: missing, the command fails at start)

from ..loading import model_path  # noqa: E402
from .common import DEFAULT_WEIGHTS, UsageError, download, pick_device, pick_dtype, writable_folder  # noqa: E402
from .demo import (AWAY, CUSTOM, LABELS, MAX_STEPS, PRESET_CHOICES, SLD_FIELDS, TOWARD, Demo,  # noqa: E402
                   FieldError, plot, preset_values, random_seed, value_labels)
from ..schedulers import SAMPLERS  # noqa: E402

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
IMAGE_HEIGHT = 240  # px of each image box: Compare, the status and all four images fit a 1280×720 window
# the value fields' spin-button steps (custom); precision None keeps each value exact (0.025 stays 0.025)
STEPS = {"scale": 100, "warmup": 1, "threshold": 0.005, "momentum_scale": 0.1, "momentum_beta": 0.1}
# small images (the tiny model makes 32 px ones) fill their boxes, one block per pixel
CSS = ".result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"

INTRO = """# Safe Latent Diffusion: SD and SLD side by side
Model: `{model}`. **Compare** runs plain Stable Diffusion and SLD (Schramowski et al., CVPR 2023; `sega-*`: SEGA as the
safety method) with the same seed and settings; a SEGA edit applies to both sides. The heat map marks, per latent
pixel, the share of steps where the safety term acted (from its warm-up δ on); the plots show its run step by step."""


def one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def compare_outputs(demo: Demo, fields: dict, session=None, progress=None) -> tuple:
    """The page's outputs for one press of Compare — SD image, SLD image, their download buttons, difference, heat
    map, plot, status — with any error as one line in the status and the rest cleared."""
    try:
        c = demo.compare(fields, session, progress)
    except FieldError as e:
        return _cleared(f"Error: {e}")
    except Exception as e:  # noqa: BLE001 — a failed generation is a message on the page, never a dead server
        return _cleared(f"Error: the generation failed: {one_line(e)}")
    downloads = [gr.DownloadButton(f"Download {side.upper()} PNG", value=str(c.files[side]) if c.files else None,
                                   interactive=bool(c.files)) for side in ("sd", "sld")]
    return (c.sd, c.sld, *downloads, c.difference, c.overlay, plot(c.diagnostics), c.summary())


def _cleared(status: str) -> tuple:
    downloads = [gr.DownloadButton(f"Download {side} PNG", value=None, interactive=False) for side in ("SD", "SLD")]
    return (None, None, *downloads, None, None, None, status)


def preset_fields(name: str) -> list:
    """The five value fields for a chosen preset: its values and labels (SEGA's for `sega-*`), editable only with
    `custom`."""
    return [gr.Number(value=v, label=label, interactive=name == CUSTOM)
            for v, label in zip(preset_values(name).values(), value_labels(name))]


def _value_field(key: str, value) -> gr.Number:
    """One of the five value fields, wide enough for any preset's value in full (three to a row)."""
    return gr.Number(value, label=LABELS[key], interactive=False, min_width=120, step=STEPS[key],
                     precision=0 if key == "warmup" else None, elem_id=f"value-{key}")


def _result(label: str, elem_id: str) -> gr.Image:
    """An output image box (shown as PNG; its own download button is off: the PNG files are the downloads)."""
    return gr.Image(label=label, format="png", interactive=False, buttons=["fullscreen"], height=IMAGE_HEIGHT,
                    elem_id=elem_id, elem_classes="result")


def build(demo: Demo) -> gr.Blocks:
    """The page: fields on the left, results on the right; Compare queues (one generation at a time)."""
    d = demo.defaults()
    with gr.Blocks(title="sld_minimal: SD and SLD side by side", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown(INTRO.format(model=Path(demo.pipe.name).name or demo.pipe.name))
        f = {}  # field key -> component
        with gr.Row():
            with gr.Column(scale=2):
                f["prompt"] = gr.Textbox(d["prompt"], label=LABELS["prompt"], lines=2, elem_id="prompt")
                f["negative_prompt"] = gr.Textbox(d["negative_prompt"], label=LABELS["negative_prompt"])
                f["preset"] = gr.Dropdown(PRESET_CHOICES, value=d["preset"], label=LABELS["preset"],
                                          elem_id="preset", info="off: both sides plain SD; sega-*: SEGA as the "
                                          "safety method; custom: SLD with the values below")
                with gr.Row():  # Compare and its status above the settings: in view beside the images
                    run = gr.Button("Compare", variant="primary", elem_id="compare")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status", lines=2)
                with gr.Accordion("Safety values and concept", open=True):
                    for keys in (SLD_FIELDS[:3], SLD_FIELDS[3:]):
                        with gr.Row():
                            for k in keys:
                                f[k] = _value_field(k, d[k])
                    f["concept"] = gr.Textbox(d["concept"], label=LABELS["concept"], lines=3,
                                              info="the text the safety term steers away from (the paper's by default)")
                with gr.Row():
                    f["seed"] = gr.Number(d["seed"], label=LABELS["seed"], elem_id="seed")
                    dice = gr.Button("Random seed", size="sm")
                with gr.Row():
                    f["steps"] = gr.Number(d["steps"], label=LABELS["steps"], elem_id="steps",
                                           info=f"1 to {demo.max_steps}")
                    f["guidance"] = gr.Number(d["guidance"], label=LABELS["guidance"])
                    f["sampler"] = gr.Dropdown(list(SAMPLERS), value=d["sampler"], label=LABELS["sampler"])
                with gr.Row():
                    f["width"] = gr.Number(d["width"], label=LABELS["width"], elem_id="width")
                    f["height"] = gr.Number(d["height"], label=LABELS["height"], elem_id="height")
                with gr.Accordion("SEGA edit (optional; on both sides; not with sega-*)", open=False):
                    f["edit_concept"] = gr.Textbox(d["edit_concept"], label=LABELS["edit_concept"],
                                                   placeholder="e.g. smiling; empty: no edit")
                    f["edit_direction"] = gr.Radio([TOWARD, AWAY], value=d["edit_direction"],
                                                   label=LABELS["edit_direction"])
                    with gr.Row():
                        for k in ("edit_scale", "edit_threshold", "edit_warmup"):
                            f[k] = gr.Number(d[k], label=LABELS[k], min_width=90)
            with gr.Column(scale=3):
                with gr.Row():
                    sd, sld = _result("Plain SD", "sd-image"), _result("SLD", "sld-image")
                with gr.Row():
                    sd_file = gr.DownloadButton("Download SD PNG", interactive=False, elem_id="sd-download")
                    sld_file = gr.DownloadButton("Download SLD PNG", interactive=False, elem_id="sld-download")
                with gr.Row():
                    diff = _result("|SD − SLD| per pixel (scaled to its maximum)", "difference")
                    heat = _result("Where the safety term acted (red: share of steps)", "heat")
                curves = gr.Plot(label="The safety term per step", show_label=False, format="png", elem_id="plot")

        keys = {component: key for key, component in f.items()}

        def on_compare(values: dict, request: gr.Request, progress=gr.Progress()):
            report = lambda done, total, side: progress((done, total), desc=f"{side} step", unit="steps")  # noqa: E731
            return compare_outputs(demo, {keys[c]: v for c, v in values.items()}, request.session_hash, report)

        def on_cancel(request: gr.Request):
            demo.cancel(request.session_hash)

        run.click(on_compare, inputs=set(f.values()), outputs=[sd, sld, sd_file, sld_file, diff, heat, curves, status],
                  concurrency_limit=1, concurrency_id="generate")
        cancel.click(on_cancel, concurrency_limit=None, show_progress="hidden")
        dice.click(random_seed, outputs=f["seed"], concurrency_limit=None, show_progress="hidden")
        f["preset"].change(preset_fields, inputs=f["preset"], outputs=[f[k] for k in SLD_FIELDS],
                           concurrency_limit=None, show_progress="hidden")
    return page


def resolve_weights(weights) -> Path:
    """The model to serve: `--weights` (a folder, a file or a packaged model's name; a UsageError where there is
    none), else SD 1.4 under weights/, which `fetch_missing` downloads where it is missing."""
    if weights is None:
        return DEFAULT_WEIGHTS
    path = model_path(weights)  # a folder or file, or a packaged model's name (toy)
    if not path.exists():
        raise UsageError(f"--weights {weights}: no such folder or file")
    return path


def fetch_missing(path: Path):
    """As `generate`: SD 1.4 downloaded into the default weights' folder `path` first, where it is missing."""
    if not path.exists():
        writable_folder(path.parent, "--weights")
        print(f"{path} not found: downloading Stable Diffusion 1.4 there first (or try the toy model shipped with "
              f"the package: `sld-minimal demo --weights toy`).", file=sys.stderr)
        download(path)


def check_address(host: str, port: int) -> bool:
    """UsageError (one line naming the flag) unless the server can listen on `host`:`port` — checked before the model
    loads, by binding it for a moment; returns whether `host` is this machine only (a loopback address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UsageError(f"--host {host}: not an address of this machine ({reason})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closing port is free
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port}: already in use on {host} (another demo?); choose another "
                                 f"--port") from None
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: not allowed (ports under 1024 need privileges); choose another "
                                 f"--port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host}: not an address of this machine") from None
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def serve(weights=None, host="127.0.0.1", port=7860, device="auto", dtype="auto", max_steps=MAX_STEPS,
          no_limits=False):
    """Check every flag (steps, device, dtype, weights, address), then load the model once (downloading SD 1.4
    first where it is the default and missing) and serve the page until interrupted (Ctrl-C or SIGTERM)."""
    from ..pipeline import StableDiffusion

    if not 1 <= max_steps <= 999:
        raise UsageError(f"--max-steps must be from 1 to 999, got {max_steps}")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    path = resolve_weights(weights)
    if not check_address(host, port):
        print(f"note: --host {host}: the demo will be reachable from the network — anyone who can reach this "
              f"machine on port {port} can use its page and its compute (the default, 127.0.0.1, keeps it here)",
              file=sys.stderr)
    fetch_missing(path)
    pipe = StableDiffusion.from_pretrained(path, device=device, dtype=dtype)
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped server closes cleanly and removes its files
    with tempfile.TemporaryDirectory(prefix="sld-demo-") as out_dir:
        page = build(Demo(pipe, out_dir, max_steps, no_limits))
        page.queue(default_concurrency_limit=1, max_size=32)
        # quiet: Gradio's own lines include a hint to make a public share link, which this demo never makes
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
                    mcp_server=False, enable_monitoring=False, footer_links=[], allowed_paths=[out_dir],
                    max_file_size="1mb", css=CSS, theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),
                    quiet=True, prevent_thread_lock=True)
        print(f"The demo is at {page.local_url} (Ctrl-C stops it)", flush=True)
        page.block_thread()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
