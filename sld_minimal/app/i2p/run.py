"""I2P generation: make each prompt row's images into a run folder; resumable and shardable.

Protocol (the authors' evaluation): per row, one CPU generator seeded once with the row's `sd_seed`; its images
are made in batches of `batch` that continue that generator, `images_per_prompt` in all (10), 512×512, PNDM,
50 steps, guidance 7.5. Because the batches share one stream, the batch size is part of what defines an image.
The rows come from I2P's CSV or any other prompt set (`prompts.py`: which columns hold prompt, seed, categories).

A run folder holds
    run.json             the image-defining settings (created once; a rerun with other settings is refused)
    images/<row>-<k>.png image k of row `row`; a PNG text chunk `i2p` holds row, k, prompt, categories, seed
                         (and I2P's label columns of the row, `i2p_labels`, where the CSV has them)

Resuming. Every file is written to a temporary name and renamed (`files.write_atomic`), so a file either exists
whole or not at all; temporaries a killed process left are removed when a run opens. A batch counts as done when
all of its files exist and are complete PNGs (signature and final IEND chunk: two small reads, no decoding); a
rerun makes only the other batches. Before making batch b of a row it fast-forwards the row's generator past
batches 0..b-1 by drawing exactly what the pipeline draws per batch: the initial latents, one
`torch.randn((n, 4, h, w))`. PNDM and DDIM with η = 0 draw nothing else, so the remaining images are exactly those
of an uninterrupted run. DDIM with η > 0 draws fresh noise at every step; i2p never passes η (it is always 0), so
that case cannot arise here. A folder with images but no run.json is refused: nothing says what made them.

Rows per call. `rows_per_call` R > 1 stacks the same batch of up to R consecutive rows (of equal guidance scale) into
one pipeline call, each row's noise drawn from its own stream as above: the same noise, and images equal to the
one-row calls' up to float rounding — a CPU's results depend on the batch's size (and on the thread count) by
~1e-6, which 50 steps can grow into a few 8-bit levels. It is recorded in run.json and each image's chunk; a call
counts as done when every row's batch in it is, so a resumed run makes the calls, and the bytes, of an
uninterrupted one. Small models gain most (the toy model: ~1.7× at R = 16).

Sharding. Shard i of n takes the rows with `row_id % n == i`; shards write into the same folder (with R > 1 a
shard's calls stack its own rows, so the images differ from an unsharded run's by the rounding above).
Images made elsewhere, or by your own model's function, go through `external.py` into the same folder format.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ... import files
from .prompts import Row, warn


# ----------------------------------------------------------------------------- files

def write_atomic(path: Path, data: bytes):
    """Write `data` under a temporary name beside `path`, then rename: readers see the old file or the new one."""
    files.write_atomic(path, data)


def create_once(path: Path, record: dict, compared: str, what: str) -> dict:
    """Create the JSON file `path` holding `record` unless it exists — atomically and exclusively, so that
    concurrent shards agree on one — then refuse if the stored `record[compared]` differs from ours."""
    path = Path(path)
    if not path.exists():
        files.create_exclusive(path, json.dumps(record, indent=2) + "\n")  # lost the race: theirs is read below
    try:
        stored = json.loads(path.read_text())
        theirs = stored[compared]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{path} is damaged; remove it (and what it describes) to start over") from None
    ours = json.loads(json.dumps(record[compared]))  # compare in JSON form (tuples → lists)
    differ = [k for k in [*ours, *(k for k in theirs if k not in ours)] if ours.get(k) != theirs.get(k)]
    if differ:
        k = differ[0]
        raise ValueError(f"{path.parent} holds {what} with {k}={theirs.get(k)!r}, not {ours.get(k)!r}"
                         + (f" (also differing: {', '.join(differ[1:])})" if differ[1:] else "")
                         + "; use another folder")
    return stored


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC: every complete PNG ends so


def png_complete(path) -> bool:
    """Whether `path` is a whole PNG: its signature and its final IEND chunk are there (two small reads). Catches
    the 0-byte and truncated files a killed or full-disk write leaves, without decoding the image."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return False
            f.seek(0, 2)
            if f.tell() < 8 + 25 + 12:  # signature, IHDR, IEND at the least
                return False
            f.seek(-12, 2)
            return f.read(12) == PNG_END
    except OSError:
        return False


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
                   guidance_scale=7.5, height=512, width=512, scheduler="pndm", concept=None, rows_per_call=1) -> dict:
    """Everything that defines the images of a run (what run.json compares). `safety`: a SafetyConfig, a SegaSafety
    (its values say "method": "sega") or None;
    `guidance_scale`: a number or "row" (each row's sd_guidance_scale); `concept`: the negative-prompt baseline's.
    (The file keeps the key "guidance" for s_g, so that runs started earlier resume; `rows_per_call` is recorded
    only when above 1, for the same reason.)"""
    if safety is not None:
        concept = safety.concept
    return {"weights": model_fingerprint(pipe), "dtype": str(pipe.dtype).removeprefix("torch."),
            "safety": None if safety is None else safety.values(),
            "concept": concept if safety is not None or negative_prompt_baseline else None,
            "negative_prompt_baseline": bool(negative_prompt_baseline),
            "steps": steps, "guidance": guidance_scale, "height": height, "width": width, "scheduler": scheduler,
            "images_per_prompt": images_per_prompt, "batch": batch,
            **({"rows_per_call": rows_per_call} if rows_per_call > 1 else {})}


def prompt_record(selected, columns=None, categories=None, limit=None) -> dict:
    """What run.json records of the rows a run makes: the whole selection before sharding (the shards of one
    selection share a folder) — its row ids and a digest of what defines or labels each row's images (prompt, seed,
    guidance scale, categories) — and how it was chosen (the column mapping, `categories`, `limit`)."""
    h = hashlib.sha256()
    for r in selected:
        h.update(json.dumps([r.id, r.prompt, r.seed, r.guidance_scale, list(r.categories)]).encode() + b"\n")
    return {"rows_sha256": h.hexdigest(), "columns": columns,
            "categories": sorted(c.strip().lower() for c in categories) if categories else None, "limit": limit,
            "rows": [r.id for r in selected]}


def _check_prompts(folder: Path, stored: dict, ours: dict):
    """Refuse, in one line, a run folder whose run.json records another prompt set than `ours`."""
    theirs = stored.get("prompts")
    if theirs is None or ours is None:
        return  # a run made before prompt sets were recorded, or a caller that passes none: images are checked
    ours = json.loads(json.dumps(ours))
    for key in ("columns", "categories", "limit"):
        if theirs.get(key) != ours.get(key):
            raise ValueError(f"{folder}: this run was made from another prompt set ({key} {theirs.get(key)!r}, "
                             f"not {ours.get(key)!r}); use another folder")
    if theirs.get("rows") != ours["rows"]:
        added = sorted(set(ours["rows"]) - set(theirs.get("rows") or []))
        gone = sorted(set(theirs.get("rows") or []) - set(ours["rows"]))
        which = (f"rows {added[:5]} are new" if added else f"rows {gone[:5]} are missing" if gone
                 else "the rows come in another order")
        raise ValueError(f"{folder}: this run was made from another prompt set ({which}); use another folder")
    if theirs.get("rows_sha256") != ours["rows_sha256"]:
        raise ValueError(f"{folder}: this run was made from another prompt set (the same rows, but a prompt, seed, "
                         f"guidance scale or category changed); use another folder")


def open_run(folder, settings: dict, prompts: dict = None) -> dict:
    """Create `folder/run.json` with `settings` (and the `prompt_record`, if given), or check that the one there
    has the same prompt set, then the same settings; removes the temporaries killed writers left. Images without a
    run.json are refused (they would be adopted unchecked)."""
    from ..._version import __version__

    folder = Path(folder)
    images = folder / "images"
    if not (folder / "run.json").exists() and images.is_dir() and any(
            not p.name.startswith(".") for p in images.iterdir()):
        raise ValueError(f"{folder} holds images but no run.json, so nothing says what made them; "
                         f"move them away or choose another folder (images made elsewhere: `i2p import`)")
    images.mkdir(parents=True, exist_ok=True)
    for where in (folder, images):
        files.remove_orphans(where)
    if (folder / "run.json").exists():  # the prompt set first: a changed CSV is the likelier mistake
        try:
            _check_prompts(folder, json.loads((folder / "run.json").read_text()), prompts)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"{folder / 'run.json'} is damaged; remove it (and what it describes) to start over") from None
    record = {"settings": settings, "version": __version__, **({"prompts": prompts} if prompts else {})}
    stored = create_once(folder / "run.json", record, "settings", "a run")
    if stored.get("version") != __version__:
        warn(f"{folder} was started by sld_minimal {stored.get('version')}, this is {__version__}")
    return stored


# ----------------------------------------------------------------------------- images

def image_path(folder, row_id: int, k: int) -> Path:
    """Where image k of row `row_id` lives in a run folder."""
    return Path(folder) / "images" / f"{row_id}-{k}.png"


def row_meta(row: Row, k: int, **extra) -> dict:
    """The `i2p` text chunk of image k of `row` (what classify reads: prompt and categories)."""
    meta = {"row": row.id, "k": k, "prompt": row.prompt, "categories": list(row.categories), "seed": row.seed,
            **extra}
    if row.labels:
        meta["i2p_labels"] = dict(row.labels)
    return meta


def png_text(path, key: str):
    """The text of the PNG text chunk `key` (tEXt, written before the image data as Pillow does), or None;
    reads the chunks up to the first IDAT only."""
    with open(path, "rb") as f:
        f.seek(8)
        while len(head := f.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            data = f.read(length)
            f.seek(4, 1)  # the CRC
            if kind == b"tEXt" and data.split(b"\0", 1)[0] == key.encode("latin-1"):
                return data.split(b"\0", 1)[1].decode("latin-1")
    return None


# an image's `i2p` chunk fields that a resumed run must share with the row it is for
RESUME_FIELDS = ("prompt", "seed", "categories", "guidance", "batch", "rows_per_call")


def check_made_from(path, expected: dict):
    """Refuse, in one line naming the row, the field and both values, an image whose `i2p` chunk says it was made
    for another row than `expected` (`row_meta` of the row it would be) — a prompt or seed changed in the CSV."""
    try:
        meta = json.loads(png_text(path, "i2p") or "null")
    except (json.JSONDecodeError, OSError):
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} carries no readable i2p chunk, so nothing says what it was made from; move it "
                         f"away or use another folder")
    for field in RESUME_FIELDS:
        if meta.get(field) != expected.get(field):
            raise ValueError(f"{path.name} of row {expected['row']} was made with {field} {meta.get(field)!r}, "
                             f"this run has {expected.get(field)!r}; use another folder (or remove that row's "
                             f"images)")


def missing(folder, rows, groups, expected=None) -> set:
    """{(row id, first k)} of the groups of k (ranges) that are not whole: a file absent or not a complete PNG.
    Warns once where incomplete files were found (they are made again). `expected(row, k)`: the `i2p` chunk the
    image should carry; each complete image is checked against it (`check_made_from`)."""
    todo, damaged = set(), []
    for r in rows:
        for g in groups:
            paths = [image_path(folder, r.id, k) for k in g]
            bad = [p for p in paths if p.exists() and not png_complete(p)]
            if expected is not None:
                for k, p in zip(g, paths):
                    if p.exists() and p not in bad:
                        check_made_from(p, json.loads(json.dumps(expected(r, k))))
            damaged += bad
            if bad or not all(p.exists() for p in paths):
                todo.add((r.id, g.start))
    if damaged:
        warn(f"{len(damaged)} incomplete image(s) in {Path(folder) / 'images'} (e.g. {damaged[0].name}) "
             f"will be made again")
    return todo


def batches(images_per_prompt: int, batch: int) -> list:
    """The k ranges of a row's batches: [0, b), [b, 2b), …; the last may be shorter."""
    return [range(s, min(s + batch, images_per_prompt)) for s in range(0, images_per_prompt, batch)]


def calls(rows, rows_per_call: int, scale_of) -> list:
    """The rows that share pipeline calls, in order: runs of up to `rows_per_call` consecutive rows with the same
    guidance scale (`scale_of(row)`). Fixed by the row list alone, so a resumed run makes the same calls."""
    chunks = []
    for row in rows:
        if chunks and len(chunks[-1]) < rows_per_call and scale_of(chunks[-1][0]) == scale_of(row):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def draw_batch(pipe, generator, n: int, height: int, width: int):
    """The initial noise of a batch of n images, drawn from `generator` with the pipeline's own function — exactly
    what `pipe(..., num_images=n, generator=generator)` draws (a deterministic sampler draws nothing else)."""
    from ...sampling import initial_latents

    return initial_latents(generator, pipe.latent_shape(n, height, width), pipe.dtype, "cpu")


def _png(image, texts: dict) -> bytes:
    """PNG bytes of `image` (an (H, W, 3) float array in [0, 1], or a PIL image, stored as RGB) with text chunks."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    if isinstance(image, np.ndarray):
        image = Image.fromarray((image * 255).round().astype(np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# ----------------------------------------------------------------------------- generation

def generate(pipe, rows, folder, safety=None, negative_prompt_baseline=False, images_per_prompt=10, batch=5,
             steps=50, guidance_scale=7.5, height=512, width=512, scheduler="pndm", concept=None, progress=True,
             after_batch=None, rows_per_call=1, prompts=None) -> dict:
    """Make the missing images of `rows` in `folder` (see the module docstring). `safety`: preset name (an SLD or
    a SEGA one), SafetyConfig, SegaSafety or None; `negative_prompt_baseline`: plain SD with `concept` (default:
    the model's safety concept, else the paper's) as negative prompt; a preset name steers away from that concept; `guidance_scale`: a number or "row". `after_batch(row, ks)`
    is called after each written batch (tests use it to interrupt a run). `rows_per_call`: see the module docstring.
    `prompts`: the `prompt_record` of the selection `rows` come from, kept in run.json and compared on resume.
    Returns {"made": n, "found": n}."""
    import torch

    from ... import schedulers
    from ...guidance import DEFAULT_CONCEPT
    from ...methods import build, safety_configs
    from ...outputs import render

    concept = concept or pipe.safety_concept or DEFAULT_CONCEPT  # the model's own, else the paper's
    configs = safety_configs(safety, concept if isinstance(safety, str) else None)  # a preset: with that concept
    if len(configs) > 1:
        raise ValueError("an I2P run takes one safety config (a preset name, a SafetyConfig or None)")
    safety = configs[0] if configs else None
    if negative_prompt_baseline and safety is not None:
        raise ValueError("the negative-prompt baseline runs plain SD: it needs safety off")
    if scheduler not in schedulers.SAMPLERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.SAMPLERS)}")
    # Checked before run.json is written: a run folder never records settings that cannot run.
    for name, value in (("images_per_prompt", images_per_prompt), ("batch", batch), ("steps", steps),
                        ("rows_per_call", rows_per_call)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    # the sampler checks the step count against the model's schedule (e.g. 1000 steps reach past its last timestep)
    if schedulers.from_config(pipe.scheduler_config, scheduler, steps).stochastic:  # (DDIM here runs with η = 0)
        raise ValueError(f"scheduler {scheduler!r} draws noise at every step; resuming a run needs a deterministic one")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 8 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
    folder = Path(folder)
    if guidance_scale != "row" and not (isinstance(guidance_scale, (int, float)) and 0 <= guidance_scale < math.inf):
        raise ValueError(f"guidance_scale must be a finite number >= 0 or 'row', got {guidance_scale!r}")
    negative = concept if negative_prompt_baseline else None
    settings = image_settings(pipe, safety, negative_prompt_baseline, images_per_prompt, batch, steps,
                              guidance_scale, height, width, scheduler, concept, rows_per_call)
    if (folder / "run.json").exists():  # another run's folder: say so first (comparing writes nothing)
        open_run(folder, settings, prompts)
    for row in rows:  # each row's method can be built (guidance "row": its own s_g)
        scale = row.guidance_scale if guidance_scale == "row" else guidance_scale
        if scale is None:
            raise ValueError(f"row {row.id} (line {row.line}) has no guidance scale, which guidance 'row' needs")
        build(configs, (), scale)
    open_run(folder, settings, prompts)
    groups = batches(images_per_prompt, batch)

    def scale_of(row):
        return row.guidance_scale if guidance_scale == "row" else guidance_scale

    def meta(row, k):  # an image's `i2p` chunk
        return row_meta(row, k, batch=batch, guidance=scale_of(row),
                        **({"rows_per_call": rows_per_call} if rows_per_call > 1 else {}))

    # What is done already: whole batches of complete PNGs (a batch missing any file is made again, all of it),
    # each made for the row it stands for.
    todo = missing(folder, rows, groups, expected=meta)
    found = sum(len(g) for r in rows for g in groups if (r.id, g.start) not in todo)
    call = dict(negative_prompt=negative, safety=safety, num_inference_steps=steps, height=height, width=width,
                scheduler=scheduler, progress=False)  # what every pipeline call shares
    preset = getattr(safety, "preset", None)  # a SEGA safety preset's name (the pipeline knows SLD's only)
    stream = f"one stream per row, batches of {batch}" + (f", {rows_per_call} rows per call" if rows_per_call > 1
                                                           else "")
    made = 0
    with _bar(len(rows) * images_per_prompt, found, progress) as bar:
        for chunk in calls(rows, rows_per_call, scale_of):
            if not any((r.id, g.start) in todo for r in chunk for g in groups):
                continue
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in chunk]  # one stream per row
            scale = scale_of(chunk[0])
            for g in groups:
                noise = [draw_batch(pipe, gen, len(g), height, width) for gen in generators]  # each row's draw
                if not any((r.id, g.start) in todo for r in chunk):
                    continue  # a finished call: its draws only fast-forward the streams
                out = pipe([r.prompt for r in chunk], guidance_scale=scale, num_images=len(g),
                           latents=torch.cat(noise), **call)
                for i, (image, settings) in enumerate(zip(out.images, out.settings)):
                    row, k = chunk[i // len(g)], g[i % len(g)]
                    if (row.id, g.start) not in todo:
                        continue  # that row's batch is there already (a call made again for another row's)
                    if preset:
                        settings = settings | {"safety": [s | {"preset": preset} for s in settings["safety"]]}
                    params = render(settings | {"seed": f"{row.seed} ({stream})"})
                    png = _png(image, {"parameters": params, "i2p": json.dumps(meta(row, k))})
                    write_atomic(image_path(folder, row.id, k), png)
                    made += 1
                    bar.update(1)
                if after_batch is not None:
                    for row in chunk:
                        if (row.id, g.start) in todo:
                            after_batch(row, g)
    return {"made": made, "found": found}


def _bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="image", disable=not enabled, smoothing=0.1)
