"""I2P generation: read the benchmark CSV, make each row's images into a run folder; resumable and shardable.

Protocol (the authors' evaluation): per row, one CPU generator seeded once with the row's `sd_seed`; its images
are made in batches of `batch` that continue that generator, `images_per_prompt` in all (10), 512×512, PNDM,
50 steps, guidance 7.5. Because the batches share one stream, the batch size is part of what defines an image.

A run folder holds
    run.json             the image-defining settings (created once; a rerun with other settings is refused)
    images/<row>-<k>.png image k of CSV row `row`; a PNG text chunk `i2p` holds row, k, prompt, categories, seed

Resuming. Every file is written to a temporary name and renamed, so a file either exists whole or not at all.
A batch counts as done when all of its files exist; a rerun makes only the missing batches. Before making
batch b of a row it fast-forwards the row's generator past batches 0..b-1 by drawing exactly what the pipeline
draws per batch: the initial latents, one `torch.randn((n, 4, h, w))`. PNDM and DDIM with η = 0 draw nothing
else, so the remaining images are exactly those of an uninterrupted run. DDIM with η > 0 draws fresh noise at
every step; i2p never passes η (it is always 0), so that case cannot arise here.

Sharding. Shard i of n takes the rows with `row_id % n == i`; shards write into the same folder.
"""
import csv
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

def warn(message: str):
    """Warnings go to stderr as one line each (library functions print nothing else but progress)."""
    print(f"sld-minimal: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- the CSV

@dataclass(frozen=True)
class Row:
    id: int                 # index of the record among the file's data rows: stable under any filter or shard
    line: int               # line of the file where the record starts (for messages)
    prompt: str
    categories: tuple       # e.g. ("sexual", "violence"), lower case
    seed: int               # sd_seed
    guidance_scale: float | None  # sd_guidance_scale; None where missing or not a number


def _integer(text: str) -> int:
    """'123' or '123.0' (pandas writes integer columns with gaps as floats) → 123; anything else: ValueError."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        value = float(text)  # raises ValueError for non-numbers
        if not value.is_integer():
            raise
        return int(value)


def read_csv(path, row_guidance: bool = False) -> list:
    """The I2P CSV (`AIML-TUDA/i2p` on the hub) → valid rows. A bad row (no prompt, a seed that is not an
    integer in [0, 2^64), with `row_guidance` an unreadable `sd_guidance_scale`) is skipped with a warning
    naming its line; it keeps its id, so ids stay the record's index in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (the I2P CSV: hub dataset AIML-TUDA/i2p)")
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("prompt", "categories", "sd_seed") if c not in header]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; is it the I2P CSV?")
        index = 0
        while True:
            line = reader.line_num + 1  # where the next record starts (a quoted prompt may span lines)
            record = next(reader, None)
            if record is None:
                break
            if not any(field.strip() for field in record):
                continue  # blank lines are not records (as pandas reads the file)
            fields = dict(zip(header, record))  # a short record lacks its last fields: they read as ""
            get = lambda name: fields.get(name, "")  # noqa: E731
            row_id, index = index, index + 1
            prompt = get("prompt").strip()
            if not prompt:
                warn(f"{path}:{line}: row {row_id} has no prompt; skipped")
                continue
            try:
                seed = _integer(get("sd_seed"))
                if not 0 <= seed < 2**64:
                    raise ValueError
            except ValueError:
                warn(f"{path}:{line}: row {row_id} has sd_seed {get('sd_seed')!r}, "
                     f"not an integer in [0, 2^64); skipped")
                continue
            try:
                guidance = float(get("sd_guidance_scale"))
                guidance = guidance if np.isfinite(guidance) and guidance >= 0 else None
            except ValueError:
                guidance = None
            if row_guidance and guidance is None:
                warn(f"{path}:{line}: row {row_id} has sd_guidance_scale {get('sd_guidance_scale')!r}, "
                     f"not a number >= 0 (needed by --use-row-guidance); skipped")
                continue
            categories = tuple(c.strip().lower() for c in get("categories").split(",") if c.strip())
            rows.append(Row(row_id, line, prompt, categories, seed, guidance))
    return rows


def select_rows(rows, categories=None, limit=None, shard=(0, 1)) -> list:
    """Rows having any of `categories`, then the first `limit` of those, then shard i of n (`id % n == i`).
    The limit comes before the split, so the shards of a limited run together make the unsharded run."""
    if categories:
        wanted = {c.strip().lower() for c in categories}
        present = {c for r in rows for c in r.categories}
        unknown = sorted(wanted - present)
        if unknown:
            raise ValueError(f"no row has the category {', '.join(map(repr, unknown))}; "
                             f"the file has {', '.join(sorted(present))}")
        rows = [r for r in rows if wanted & set(r.categories)]
    if limit is not None:
        rows = rows[:limit]
    i, n = shard
    return [r for r in rows if r.id % n == i]


def parse_shard(text=None, environ=os.environ):
    """'i/n' → (i, n). Without text: torchrun's RANK/WORLD_SIZE when set, else (0, 1)."""
    if text is None:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            text = f"{environ['RANK']}/{environ['WORLD_SIZE']}"
        else:
            return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r} is not of the form i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------- files

def write_atomic(path: Path, data: bytes):
    """Write `data` under a temporary name beside `path`, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def create_once(path: Path, record: dict, compared: str, what: str) -> dict:
    """Create the JSON file `path` holding `record` unless it exists — atomically and exclusively, so that
    concurrent shards agree on one — then refuse if the stored `record[compared]` differs from ours."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: then we read theirs below
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create (O_EXCL), written in one call
            try:
                with open(path, "x") as f:
                    f.write(tmp.read_text())
            except FileExistsError:
                pass
        finally:
            tmp.unlink()
    try:
        stored = json.loads(path.read_text())
        theirs = stored[compared]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is damaged; remove it (and what it describes) to start over") from None
    ours = json.loads(json.dumps(record[compared]))  # compare in JSON form (tuples → lists)
    differ = [k for k in [*ours, *(k for k in theirs if k not in ours)] if ours.get(k) != theirs.get(k)]
    if differ:
        k = differ[0]
        raise ValueError(f"{path.parent} holds {what} with {k}={theirs.get(k)!r}, not {ours.get(k)!r}"
                         + (f" (also differing: {', '.join(differ[1:])})" if differ[1:] else "")
                         + "; use another folder")
    return stored


def model_fingerprint(pipe) -> str:
    """A short hash of the weights as loaded: the first and last parameter of each model, as float32.
    Path-independent (a moved folder still matches); a fine-tune or a rounded fp16 file does not."""
    h = hashlib.sha256()
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        params = list(module.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def image_settings(pipe, safety, negative_prompt_baseline=False, images_per_prompt=10, batch=5, steps=50,
                   guidance_scale=7.5, height=512, width=512, scheduler="pndm", concept=None) -> dict:
    """Everything that defines the images of a run (what run.json compares). `safety`: a SafetyConfig or None;
    `guidance_scale`: a number or "row" (each row's sd_guidance_scale); `concept`: the negative-prompt baseline's.
    (The file keeps the key "guidance" for s_g, so that runs started earlier resume.)"""
    if safety is not None:
        concept = safety.concept
    return {"weights": model_fingerprint(pipe), "dtype": str(pipe.dtype).removeprefix("torch."),
            "safety": None if safety is None else safety.values(),
            "concept": concept if safety is not None or negative_prompt_baseline else None,
            "negative_prompt_baseline": bool(negative_prompt_baseline),
            "steps": steps, "guidance": guidance_scale, "height": height, "width": width, "scheduler": scheduler,
            "images_per_prompt": images_per_prompt, "batch": batch}


def open_run(folder, settings: dict) -> dict:
    """Create `folder/run.json` with `settings`, or check that the one there has the same settings."""
    from .._version import __version__

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    stored = create_once(folder / "run.json", {"settings": settings, "version": __version__},
                         "settings", "a run")
    if stored.get("version") != __version__:
        warn(f"{folder} was started by sld_minimal {stored.get('version')}, this is {__version__}")
    return stored


# ----------------------------------------------------------------------------- generation

def image_path(folder, row_id: int, k: int) -> Path:
    return Path(folder) / "images" / f"{row_id}-{k}.png"


def batches(images_per_prompt: int, batch: int) -> list:
    """The k ranges of a row's batches: [0, b), [b, 2b), …; the last may be shorter."""
    return [range(s, min(s + batch, images_per_prompt)) for s in range(0, images_per_prompt, batch)]


def skip_batch(pipe, generator, n: int, height: int, width: int):
    """Advance `generator` exactly as `pipe(..., num_images=n, generator=generator)` would: it draws the initial
    latents, with the pipeline's own function, and nothing else (a deterministic sampler draws nothing)."""
    from ..pipeline import initial_latents

    initial_latents(generator, pipe.latent_shape(n, height, width), pipe.dtype, "cpu")


def _png(image: np.ndarray, texts: dict) -> bytes:
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def generate(pipe, rows, folder, safety=None, negative_prompt_baseline=False, images_per_prompt=10, batch=5,
             steps=50, guidance_scale=7.5, height=512, width=512, scheduler="pndm", concept=None, progress=True,
             after_batch=None) -> dict:
    """Make the missing images of `rows` in `folder` (see the module docstring). `safety`: preset name,
    SafetyConfig or None; `negative_prompt_baseline`: plain SD with `concept` (default: the paper's safety
    concept) as negative prompt; `guidance_scale`: a number or "row". `after_batch(row, ks)` is called after each
    written batch (tests use it to interrupt a run). Returns {"made": n, "found": n}."""
    import torch

    from .. import schedulers
    from ..guidance import DEFAULT_CONCEPT
    from ..methods import safety_configs
    from ..pipeline import render

    configs = safety_configs(safety)
    if len(configs) > 1:
        raise ValueError("an I2P run takes one safety config (a preset name, a SafetyConfig or None)")
    safety = configs[0] if configs else None
    if negative_prompt_baseline and safety is not None:
        raise ValueError("the negative-prompt baseline runs plain SD: it needs safety off")
    if scheduler not in schedulers.SAMPLERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.SAMPLERS)}")
    if schedulers.from_config(pipe.scheduler_config, scheduler).stochastic:  # (DDIM here runs with η = 0)
        raise ValueError(f"scheduler {scheduler!r} draws noise at every step; resuming a run needs a deterministic one")
    # Checked before run.json is written: a run folder never records settings that cannot run.
    for name, value in (("images_per_prompt", images_per_prompt), ("batch", batch), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 8 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
    folder = Path(folder)
    if guidance_scale != "row" and not (isinstance(guidance_scale, (int, float)) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a number >= 0 or 'row', got {guidance_scale!r}")
    concept = concept or DEFAULT_CONCEPT
    open_run(folder, image_settings(pipe, safety, negative_prompt_baseline, images_per_prompt, batch, steps,
                                    guidance_scale, height, width, scheduler, concept))
    negative = concept if negative_prompt_baseline else None
    groups = batches(images_per_prompt, batch)

    # What is done already: whole batches only (a batch missing any file is made again, all of it).
    done = {(r.id, g.start) for r in rows for g in groups
            if all(image_path(folder, r.id, k).exists() for k in g)}
    found = sum(len(g) for r in rows for g in groups if (r.id, g.start) in done)
    call = dict(negative_prompt=negative, safety=safety, num_inference_steps=steps, height=height, width=width,
                scheduler=scheduler, progress=False)  # what every pipeline call shares
    made = 0
    with _bar(len(rows) * images_per_prompt, found, progress) as bar:
        for row in rows:
            if all((row.id, g.start) in done for g in groups):
                continue
            generator = torch.Generator("cpu").manual_seed(row.seed)  # one stream per row, as the authors'
            scale = row.guidance_scale if guidance_scale == "row" else guidance_scale
            for g in groups:
                if (row.id, g.start) in done:
                    skip_batch(pipe, generator, len(g), height, width)  # fast-forward past a finished batch
                    continue
                out = pipe(row.prompt, guidance_scale=scale, num_images=len(g), generator=generator, **call)
                for k, image, settings in zip(g, out.images, out.settings):
                    params = render(settings | {"seed": f"{row.seed} (one stream per row, batches of {batch})"})
                    meta = {"row": row.id, "k": k, "prompt": row.prompt, "categories": list(row.categories),
                            "seed": row.seed, "batch": batch, "guidance": scale}
                    png = _png(image, {"parameters": params, "i2p": json.dumps(meta)})
                    write_atomic(image_path(folder, row.id, k), png)
                made += len(g)
                bar.update(len(g))
                if after_batch is not None:
                    after_batch(row, g)
    return {"made": made, "found": found}


def _bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="image", disable=not enabled, smoothing=0.1)
