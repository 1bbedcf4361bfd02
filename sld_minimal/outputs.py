"""What a generation returns and writes: `Output`, its PNG files, and the settings each file carries.

Each PNG holds its image's settings twice: the A1111-style `parameters` text that image viewers and web UIs show
(`render`), and the same settings as JSON in the `sld_minimal` chunk, which tools read back (`settings_from_png`),
e.g. to regenerate image k of a batch (`generate --image-index k`). Files are written whole or not at all.
"""
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import create_exclusive, write_atomic

SETTINGS_CHUNK = "sld_minimal"  # the PNG text chunk with an image's settings as JSON, the source of truth
# The version of what this package records about how a file was made: each image's settings (this chunk) and an I2P
# run folder's run.json carry it as "format". 1 (no "format" key): as first written. 2: run.json records the prompt
# set ("prompts") and "rows_per_call" (above 1), the images' `i2p` chunk "rows_per_call", labels.csv each image's
# size and mtime. 3: an image's settings record a method object as it was before sampling ("method": its class,
# module, description and own `settings()`, where 2 had its description after sampling; "safety" and "edits": the
# configuration of the built-in method it extends; "guidance_scale": its s_g), "steps_taken" (after a callback's
# STOP), "edit_momentum" (SEGA's s_m, β_m) and each preset's name as the registry gave it; run.json a method object's
# record ("method") and a sampler object's name. Files of an earlier format still read back and resume; new fields
# are added, none renamed ("method" changed from a text to a record).
SETTINGS_FORMAT = 3


def png_file(path) -> Path:
    """The file an image goes to: `path`, with `.png` added where it has no suffix. One rule per other case, each a
    one-line ValueError that names the path: an empty name, a folder (an existing one, or a name ending in a
    separator) and any suffix but `.png` (the files are PNG: no other format carries the settings chunks) are
    refused."""
    text = str(path)
    path = Path(path)
    if not text.strip() or path.name.lower() == ".png":
        raise ValueError(f"{text!r} is an empty file name; name a .png file, e.g. image.png")
    if text.endswith(("/", os.sep)) or path.name in ("", ".", "..") or path.is_dir():
        raise ValueError(f"{text} is a folder; name a .png file in it, e.g. {path / 'image.png'}")
    if path.suffix == "":
        return path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{text}: images are written as PNG (with their settings in text chunks); use a .png name")
    return path


def output_paths(path, n: int) -> list:
    """Where `n` images go (`png_file(path)` first): that file itself for one, else `stem-0.png`, `stem-1.png`, …"""
    path = png_file(path)
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


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

    def save(self, path, overwrite: bool = True) -> list:
        """Write PNGs: `path` itself for one image, else `stem-0.png`, `stem-1.png`, … (`output_paths`: `.png` is
        added to a name without a suffix; another suffix, a folder or an empty name is a ValueError); folders are
        created. Each file is written whole or not at all (`files.write_atomic`) and carries its image's settings
        twice: the A1111-style `parameters` text and, as JSON, the `sld_minimal` chunk (`settings_from_png`).
        With `overwrite=False` no file is replaced, even by a concurrent writer: each is created only where no file
        of its name exists (`files.create_exclusive`), and if one does, the files this call made are removed and a
        FileExistsError names the one found."""
        paths = output_paths(path, len(self.images))
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        made = []
        for i, (p, img) in enumerate(zip(paths, self.images)):
            data = png_bytes(img, self.settings[i] if i < len(self.settings) else None)
            if overwrite:
                write_atomic(p, data)
            elif create_exclusive(p, data):
                made.append(p)
            else:
                for q in made:
                    q.unlink(missing_ok=True)
                raise FileExistsError(f"{p} already exists; nothing was replaced (overwrite=True replaces it)")
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
    stopped = f" (stopped after {s['steps_taken']} iterations)" if s.get("steps_taken") is not None else ""
    lines = [_one_line(s["prompt"]), f"Negative prompt: {_one_line(s['negative_prompt'])}",
             f"Seed: {s['seed']}{image}, Steps: {s['steps']}{stopped}, Guidance: {s['guidance_scale']}, "
             f"Scheduler: {s['scheduler']}" + (f", Eta: {s['eta']}" if s["eta"] is not None else "")
             + f", Size: {s['width']}x{s['height']}"]
    method = s["method"]
    if isinstance(method, dict):  # format 3: a method object, by class and module, and its own settings
        about = f": {_one_line(method['description'])}" if method.get("description") else ""
        lines.append(f"Method: {method['class']} ({method['module']}){about}")
        if method.get("settings") is not None:
            lines.append(f"Method settings: {json.dumps(method['settings'], ensure_ascii=False)}")
    elif method is not None:  # format 2 and before: its description
        lines.append(f"Method: {_one_line(method)}")
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
    if s.get("edit_momentum"):
        lines.append("Edit momentum: " + ", ".join(f"{k}={v}" for k, v in s["edit_momentum"].items()))
    if s.get("never_acts"):  # settings of format 2 from before this key have none
        lines.append(f"Never acted: {_one_line(s['never_acts'])}")
    lines.append(f"Model: {s['model']}, sld_minimal {s['version']}")
    return "\n".join(lines)
