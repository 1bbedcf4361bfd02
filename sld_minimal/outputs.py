"""What a generation returns and writes: `Output`, its PNG files, and the settings each file carries.

Each PNG holds its image's settings twice: the A1111-style `parameters` text that image viewers and web UIs show
(`render`), and the same settings as JSON in the `sld_minimal` chunk, which tools read back (`settings_from_png`),
e.g. to regenerate image k of a batch (`generate --image-index k`). Files are written whole or not at all.
"""
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic

SETTINGS_CHUNK = "sld_minimal"  # the PNG text chunk with an image's settings as JSON, the source of truth


def output_paths(path, n: int) -> list:
    """Where `n` images go: `path` itself for one, else `stem-0.png`, `stem-1.png`, …"""
    path = Path(path)
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


@dataclass
class Output:
    images: np.ndarray    # (N, H, W, 3) float32 in [0, 1], prompt-major
    latents: torch.Tensor  # (N, 4, H/8, W/8)
    seed: int | None
    settings: list = field(default_factory=list)  # per image: its generation settings (a dict), see `render`

    @property
    def parameters(self) -> list:
        """Per image: the text stored in its PNG's `parameters` chunk, rendered from `settings`."""
        return [render(s) for s in self.settings]

    def save(self, path) -> list:
        """Write PNGs: `path` itself for one image, else `stem-0.png`, `stem-1.png`, …; folders are created. Each
        file is written whole or not at all (`files.write_atomic`) and carries its image's settings twice: the
        A1111-style `parameters` text and, as JSON, the `sld_minimal` chunk (what `settings_from_png` reads)."""
        paths = output_paths(path, len(self.images))
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for i, (p, img) in enumerate(zip(paths, self.images)):
            write_atomic(p, png_bytes(img, self.settings[i] if i < len(self.settings) else None))
        return paths


def png_bytes(image: np.ndarray, settings: dict | None = None) -> bytes:
    """One image (H, W, 3) in [0, 1] as PNG bytes, with its settings in the `parameters` and `sld_minimal` chunks."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text("parameters", render(settings))
        info.add_text(SETTINGS_CHUNK, json.dumps(settings, ensure_ascii=False))
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def settings_from_png(path) -> dict:
    """The settings a PNG of ours carries (its `sld_minimal` chunk); ValueError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = im.text.get(SETTINGS_CHUNK) if hasattr(im, "text") else None
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None
    if text is None:
        raise ValueError(f"{path} has no {SETTINGS_CHUNK!r} chunk: it was not written by sld_minimal")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {SETTINGS_CHUNK!r} chunk is damaged") from None



def _one_line(text: str) -> str:
    """Free text (a prompt, a concept) on one line: backslashes and line breaks escaped, so that no text can start
    a line of its own and forge a field."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def render(settings: dict) -> str:
    """The A1111-style `parameters` text of one image's settings, for image viewers and people ("Image: k of N" is
    image k, from 0, of a batch of N from one seed); the PNG's `sld_minimal` chunk holds the same as JSON."""
    s = settings
    image = f", Image: {s['image_index']} of {s['num_images']}" if s.get("num_images", 1) > 1 else ""
    lines = [_one_line(s["prompt"]), f"Negative prompt: {_one_line(s['negative_prompt'])}",
             f"Seed: {s['seed']}{image}, Steps: {s['steps']}, Guidance: {s['guidance_scale']}, "
             f"Scheduler: {s['scheduler']}" + (f", Eta: {s['eta']}" if s["eta"] is not None else "")
             + f", Size: {s['width']}x{s['height']}"]
    if s["method"] is not None:
        lines.append(f"Method: {s['method']}")
    if not s["safety"] and s["method"] is None:
        lines.append("Safety: off")
    for c in s["safety"]:
        values = ", ".join(f"{k}={c[k]}" for k in ("scale", "warmup_steps", "threshold", "momentum_scale",
                                                     "momentum_beta"))
        lines += [f"Safety: {c['preset']} ({values})", f"Safety concept: {_one_line(c['concept'])}"]
    for e in s["edits"]:
        lines.append(f"Edit: {'-' if e['reverse'] else '+'}{_one_line(e['concept'])} (scale {e['scale']}, threshold "
                     f"{e['threshold']}, warmup {e['warmup_steps']}, cooldown {e['cooldown_steps']}, "
                     f"weight {e['weight']})")
    lines.append(f"Model: {s['model']}, sld_minimal {s['version']}")
    return "\n".join(lines)
