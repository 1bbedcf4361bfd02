"""Images this package did not make, in a run folder that `classify` and `report` take unchanged.

Two ways in:

    import_images(prompts, images, out)       images made elsewhere: a folder of {id}-{k}.png ({id}_{k}, .jpg …),
                                              or a CSV of id,k,path; all checked first, then copied as PNGs into a
                                              new run folder at once (`files.atomic_folder`): whole or nothing
    generate_with(generate_fn, prompts, out)  your own model, through the run machinery: generate_fn(prompt, seed,
                                              num_images) -> [PIL.Image] once per row; resumable and shardable

Each image becomes a PNG (RGB) carrying the `i2p` text chunk that generated images carry (row, k, prompt,
categories, seed, I2P's label columns) and a `parameters` text; run.json records the source ("external" with where
from, or "generate_fn" with the model's name) and `images_per_prompt`, which `report` reads.

Resuming `generate_with`: a row counts as done when all its images are complete PNGs; any other row is made again,
whole, by one call. With a deterministic generate_fn (its images a function of prompt, seed and num_images) a run
killed at any point and resumed, or split into shards, gives the bytes of an uninterrupted run.
"""
import csv
import json
import re
from pathlib import Path

from ... import files
from ...outputs import SETTINGS_FORMAT
from .prompts import Columns, read_csv, select_rows
from .folder import _png, image_path, missing, open_run, row_meta, write_atomic
from .run import _bar

# {id}-{k}.png, or {id}_{k}.png as the erasure harnesses (ESD, UCE, …) name their images; any image suffix
NAME = re.compile(r"^(\d+)[-_](\d+)\.(png|jpe?g|webp|bmp|tiff?)$", re.IGNORECASE)
SHOWN = 5  # names shown per kind of mismatch in an error


def _rows(prompts, columns, categories, limit, shard=(0, 1)) -> list:
    """Rows from a CSV path (read with `columns`) or a list of `Row`s, then selected."""
    rows = prompts if isinstance(prompts, (list, tuple)) else read_csv(prompts, columns=columns)
    return select_rows(rows, categories, limit, shard)


def _parameters(row, k: int, n: int, model: str, how: str) -> str:
    """The A1111-style `parameters` text of an image this package did not generate (newlines in the prompt
    escaped, so that no line can be forged)."""
    from ..._version import __version__

    prompt = row.prompt.replace("\\", "\\\\").replace("\n", "\\n")
    return f"{prompt}\nSeed: {row.seed}, image {k} of {n}\nModel: {model} ({how}), sld_minimal {__version__}"


# ----------------------------------------------------------------------------- import

def _listed(images: Path) -> tuple:
    """({(id, k): source path}, [misnamed entries]) from a folder of {id}-{k}.<ext> or a CSV of id,k,path."""
    found, bad = {}, []
    if images.is_dir():
        for p in sorted(images.iterdir()):
            if p.name.startswith("."):
                continue  # hidden files (a viewer's thumbnails, our own temporaries)
            m = NAME.match(p.name)
            if not m or not p.is_file():
                bad.append(p.name + ("/" if p.is_dir() else ""))
            elif (int(m[1]), int(m[2])) in found:
                bad.append(f"{p.name} (a second image {m[1]}-{m[2]})")
            else:
                found[int(m[1]), int(m[2])] = p
        return found, bad
    if not images.is_file():
        raise FileNotFoundError(f"--images {images} not found (a folder of {{id}}-{{k}}.png or a CSV of id,k,path)")
    with open(images, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"id", "k", "path"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{images} lacks the column(s) id,k,path (it has {','.join(reader.fieldnames or [])})")
        for record in reader:
            line = f"line {reader.line_num}"
            try:
                key = int(record["id"]), int(record["k"])
                if min(key) < 0:
                    raise ValueError
            except (TypeError, ValueError):
                bad.append(f"{line}: id {record['id']!r}, k {record['k']!r}")
                continue
            path = images.parent / (record["path"] or "").strip()
            if key in found:
                bad.append(f"{line}: a second image {key[0]}-{key[1]}")
            elif not path.is_file():
                bad.append(f"{line}: {record['path']!r} not found")
            else:
                found[key] = path
    return found, bad


def _some(items) -> str:
    """The first few of `items`, comma-separated, with how many more there are."""
    items = list(items)
    return ", ".join(items[:SHOWN]) + (f", … ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def import_images(prompts, images, out, model=None, images_per_prompt=None, columns=Columns(), categories=None,
                  limit=None, progress=True) -> dict:
    """Lay images made elsewhere into the new run folder `out` (see the module docstring). `prompts`: the prompt
    CSV (read with `columns`) or a list of Rows; `images`: a folder of {id}-{k}.<ext> or a CSV of id,k,path (paths
    relative to it); `images_per_prompt`: default the largest k + 1 found. Every selected row needs images
    0..n-1. Missing, extra or misnamed images: one ValueError naming them, and nothing written.
    Returns {"rows": n, "images": n}."""
    from PIL import Image

    images, out = Path(images), Path(out)
    rows = _rows(prompts, columns, categories, limit)
    if not rows:
        raise ValueError("no prompt rows to import images for")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty: an import makes a new run folder")
    found, misnamed = _listed(images)
    ids = {r.id for r in rows}
    n = images_per_prompt or max((k + 1 for (i, k) in found if i in ids), default=0)
    if n < 1:
        raise ValueError(f"{images} holds no image of the selected prompt rows (named {{id}}-{{k}}.png)")
    absent = [f"{r.id}-{k}" for r in rows for k in range(n) if (r.id, k) not in found]
    extra = [f"{i}-{k}" + (" (no such prompt row)" if i not in ids else f" (k >= {n})")
             for (i, k) in sorted(found) if i not in ids or k >= n]
    if absent or extra or misnamed:
        problems = [f"{len(v)} {what} ({_some(v)})" for what, v in (("missing", absent), ("extra", extra),
                                                                     ("misnamed", misnamed)) if v]
        raise ValueError(f"{images}: {', '.join(problems)}; images are named {{id}}-{{k}}.png (or {{id}}_{{k}}) with k = 0..{n - 1} "
                         f"for each of the {len(rows)} prompt rows; nothing written")
    from ..._version import __version__

    model = model or "unknown"
    settings = {"source": "external", "images": str(images.resolve()), "model": model, "images_per_prompt": n}
    if not isinstance(prompts, (list, tuple)):
        settings["prompts"] = str(Path(prompts).resolve())
    with files.atomic_folder(out) as tmp, _bar(len(rows) * n, 0, progress) as bar:
        (tmp / "images").mkdir()
        for row in rows:
            for k in range(n):
                source = found[row.id, k]
                try:
                    with Image.open(source) as im:
                        im.load()  # decodes: a truncated or broken file fails here, before the folder exists
                        texts = {"parameters": _parameters(row, k, n, model, f"imported from {source}"),
                                 "i2p": json.dumps(row_meta(row, k, source=str(source)))}
                        if isinstance(im.info.get("parameters"), str):  # an A1111-style source keeps its own
                            texts["source_parameters"] = im.info["parameters"]
                        png = _png(im, texts)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise ValueError(f"{source}: not a readable image ({e}); nothing written") from None
                write_atomic(image_path(tmp, row.id, k), png)
                bar.update(1)
        write_atomic(tmp / "run.json", json.dumps({"settings": settings, "version": __version__,
                                                   "format": SETTINGS_FORMAT}, indent=2) + "\n")
    return {"rows": len(rows), "images": len(rows) * n}


# ----------------------------------------------------------------------------- your own model

def generate_with(generate_fn, prompts, out, model=None, images_per_prompt=10, columns=Columns(), categories=None,
                  limit=None, shard=(0, 1), progress=True, after_row=None) -> dict:
    """Make the missing images of the prompt rows in the run folder `out` with your own model:
    `generate_fn(prompt, seed, num_images) -> list of num_images PIL images`, called once per row with the row's
    seed (the seed column, or the row id). `prompts`: a prompt CSV (read with `columns`) or a list of Rows;
    `model`: a name recorded in run.json (default: the function's), compared on resume; `shard`: (i, n), rows with
    id % n == i; `after_row(row)` is called after each written row. Returns {"made": n, "found": n}."""
    from PIL import Image

    if not callable(generate_fn):
        raise TypeError(f"generate_fn must be a function (prompt, seed, num_images) -> [PIL.Image], not "
                        f"{type(generate_fn).__name__}")
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be an integer >= 1, got {images_per_prompt!r}")
    model = model or f"{getattr(generate_fn, '__module__', '?')}.{getattr(generate_fn, '__qualname__', '?')}"
    rows = _rows(prompts, columns, categories, limit, shard)
    n, folder = images_per_prompt, Path(out)
    open_run(folder, {"source": "generate_fn", "model": model, "images_per_prompt": n})
    todo = {row_id for row_id, _ in missing(folder, rows, [range(n)])}  # a row is one group: made by one call
    found, made = (len(rows) - len(todo)) * n, 0
    with _bar(len(rows) * n, found, progress) as bar:
        for row in rows:
            if row.id not in todo:
                continue
            images = generate_fn(row.prompt, row.seed, n)
            if not isinstance(images, (list, tuple)) or len(images) != n or not all(
                    isinstance(im, Image.Image) for im in images):
                got = f"{len(images)} items" if isinstance(images, (list, tuple)) else type(images).__name__
                raise TypeError(f"generate_fn returned {got} for row {row.id}; expected a list of {n} PIL images")
            for k, im in enumerate(images):  # the whole row again: its images come from one call
                texts = {"parameters": _parameters(row, k, n, model, "generate_fn"),
                         "i2p": json.dumps(row_meta(row, k))}
                write_atomic(image_path(folder, row.id, k), _png(im, texts))
            made += n
            bar.update(n)
            if after_row is not None:
                after_row(row)
    return {"made": made, "found": found}

