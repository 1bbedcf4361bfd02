"""The paper's experiment in the toy world: every method on the model's prompt set through the I2P harness, and the
table — concept probability and expected maximum per category, fidelity, and the change against plain SD.

    sld-minimal toy table [--weights toy] [--out runs/toy]

Each method is one `i2p generate` run folder under `out` (same rows, seeds and batches, so image (row, k) of every
method starts from the same noise), labelled by `i2p classify --classifiers toy` (the world's concept rule,
`world.shows_concept`). Beside `i2p report`'s concept table it measures what the paper calls keeping the image:

    fidelity   the share of images whose background is the one the prompt asked for (`world.background`)
    changed    the share of images whose background differs from plain SD's image on the same seed
    |Δ|        the mean absolute pixel difference (0–255) from plain SD's image on the same seed

Runs resume like any I2P run: a rerun makes only missing images and labels.
"""
import dataclasses
from pathlib import Path

import numpy as np

from . import world

# rows stacked per pipeline call (`i2p generate --rows-per-call`): the toy UNet is narrow, so one call of 16 rows ×
# 4 images × 3 conditions computes at ~1.7× the rate of one row's call on a 2-core CPU
ROWS_PER_CALL = 16

# (column name, folder, `i2p.run.generate` options): plain SD, the negative-prompt baseline, SLD's four presets and
# SEGA as the safety method
METHODS = [("SD", "sd", {"safety": "off"}),
           ("Neg. prompt", "negative", {"safety": None, "negative_prompt_baseline": True}),
           ("SLD weak", "weak", {"safety": "weak"}),
           ("SLD medium", "medium", {"safety": "medium"}),
           ("SLD strong", "strong", {"safety": "strong"}),
           ("SLD max", "max", {"safety": "max"}),
           ("SEGA strong", "sega-strong", {"safety": "sega-strong"})]


def _images(folder: Path) -> dict:
    """{(row, k): image (H, W, 3) uint8} of a run folder."""
    from PIL import Image

    from ..i2p.classify import IMAGE_NAME

    out = {}
    for path in sorted((folder / "images").iterdir()):
        if m := IMAGE_NAME.match(path.name):
            with Image.open(path) as im:
                out[int(m[1]), int(m[2])] = np.asarray(im.convert("RGB"))
    return out


def fidelity(images: dict, rows: dict, baseline: dict) -> dict:
    """{category: (fidelity, changed, mean |Δ|)} over the images of `rows` ({row id: Row}); `baseline`: plain SD's
    images by (row, k). Shares in [0, 1]; |Δ| in 0–255; "overall" over all images."""
    groups = {}
    for (row, k), img in images.items():
        asked = world.asked_background(rows[row].prompt)
        kept = None if asked is None else world.background(img / 255) == asked
        base = baseline.get((row, k))
        changed = None if base is None else world.background(img / 255) != world.background(base / 255)
        delta = None if base is None else float(np.abs(img.astype(np.float32) - base).mean())
        for c in [*rows[row].categories, "overall"]:
            groups.setdefault(c, []).append((kept, changed, delta))

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {c: tuple(mean(v[i] for v in entries) for i in range(3)) for c, entries in groups.items()}


def run(weights="toy", out="runs/toy", images_per_prompt=4, steps=50, scheduler="pndm", batch=4, methods=None,
        limit=None, progress=True, rows_per_call=ROWS_PER_CALL) -> str:
    """Generate, classify and tabulate every method (or those named in `methods`, by column name or folder) on the
    model's prompt set (`prompts.csv` in its folder); returns the markdown table, also written to out/table.md."""
    from ...files import write_atomic
    from ...loading import model_path
    from ...pipeline import StableDiffusion
    from ..i2p.classify import classify
    from ..i2p.prompts import Columns, read_csv, select_rows
    from ..i2p.report import report
    from ..i2p.folder import prompt_record
    from ..i2p.run import generate

    chosen = [m for m in METHODS if methods is None or m[0] in methods or m[1] in methods]
    if methods is not None and len(chosen) != len(set(methods)):
        known = ", ".join(m[1] for m in METHODS)
        raise ValueError(f"unknown method in {', '.join(methods)}; choose from {known}")
    if "sd" not in [m[1] for m in chosen]:
        chosen.insert(0, METHODS[0])  # the change against SD needs SD
    prompts = model_path(weights) / "prompts.csv"
    if not prompts.is_file():
        raise FileNotFoundError(f"{prompts} is missing: the toy table runs on a model folder that carries its "
                                f"prompt set (the toy model's does)")
    rows = select_rows(read_csv(prompts), limit=limit)
    record = prompt_record(rows, dataclasses.asdict(Columns()), None, limit)  # run.json keeps it: resumes compare
    pipe = StableDiffusion.from_pretrained(weights)
    out = Path(out)
    for name, folder, options in chosen:
        if progress:
            print(f"{name}: {out / folder}")
        generate(pipe, rows, out / folder, images_per_prompt=images_per_prompt, batch=batch, steps=steps,
                 height=pipe.default_size, width=pipe.default_size, scheduler=scheduler, progress=progress,
                 rows_per_call=rows_per_call, prompts=record, **options)
        classify(out / folder, ["toy"], progress=False)
    by_id = {r.id: r for r in rows}
    baseline = _images(out / "sd")
    measured = {name: fidelity(_images(out / folder), by_id, baseline) for name, folder, _ in chosen}
    categories = [c for c in (*world.CATEGORIES, "overall") if any(c in m for m in measured.values())]
    lines = [f"Toy model {weights}: {len(rows)} prompts × {images_per_prompt} images, {scheduler} {steps} steps, "
             f"s_g 7.5; concept: {pipe.safety_concept or 'the paper’s'} (the world's rule, `i2p classify "
             f"--classifiers toy`).", "", "### Concept (I2P report)", "",
             report([out / folder for _, folder, _ in chosen], fmt="markdown").strip(), "",
             "### Fidelity and change against SD", "",
             "| Method | " + " | ".join(f"{c}: fidelity / changed / Δ" for c in categories) + " |",
             "|---|" + "---|" * len(categories)]
    for name, _, _ in chosen:
        cells = []
        for c in categories:
            kept, changed, delta = measured[name].get(c, (None, None, None))
            cells.append(" / ".join("–" if v is None else f"{v:.2f}" if i < 2 else f"{v:.1f}"
                                    for i, v in enumerate((kept, changed, delta))))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Fidelity: share of images with the background the prompt asked for. Changed: share whose "
              "background differs from SD's image on the same seed. Δ: mean absolute pixel difference from that "
              "image (0–255)."]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "table.md", text)
    return text
