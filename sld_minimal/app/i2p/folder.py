"""An I2P run folder on disk, as `i2p generate`, `i2p import` and `external.generate_with` write it: run.json
created once and compared on every resume (settings, then the prompt set), images by row and k, complete-PNG
checks, and the check that an image found on resume was made for the row it stands for.

    run.json             the image-defining settings, the prompt set (`prompt_record`) and the format
                         (`outputs.SETTINGS_FORMAT`)
    images/<row>-<k>.png image k of row `row`; its `i2p` text chunk (`row_meta`) holds row, k, prompt, categories,
                         seed, batch and guidance scale (and I2P's label columns of the row, where the CSV has them)
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from ... import files
from ...outputs import SETTINGS_FORMAT
from .prompts import Row, warn


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


def open_run(folder, settings: dict, prompts: dict = None, never_acts: str = None) -> dict:
    """Create `folder/run.json` with `settings` (and the `prompt_record`, if given; `never_acts`: why the run's
    safety terms act at no step, a note outside the compared settings), or check that the one there has the same
    prompt set, then the same settings; removes the temporaries killed writers left. Images without a run.json are
    refused (they would be adopted unchecked)."""
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
    record = {"settings": settings, "version": __version__, "format": SETTINGS_FORMAT,
              **({"prompts": prompts} if prompts else {}), **({"never_acts": never_acts} if never_acts else {})}
    stored = create_once(folder / "run.json", record, "settings", "a run")
    if stored.get("version") != __version__:
        warn(f"{folder} was started by sld_minimal {stored.get('version')}, this is {__version__}")
    return stored


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


# an image's `i2p` chunk fields that a resumed run must share with the row it is for
RESUME_FIELDS = ("prompt", "seed", "categories", "guidance", "batch", "rows_per_call")


def check_made_from(path, expected: dict):
    """Refuse, in one line naming the row, the field and both values, an image whose `i2p` chunk says it was made
    for another row than `expected` (`row_meta` of the row it would be) — a prompt or seed changed in the CSV."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the chunks before the image data only, decodes nothing
            meta = json.loads(im.info.get("i2p", "null"))
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


