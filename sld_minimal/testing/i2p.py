"""Test helpers for the I2P harness (`sld_minimal.app.i2p`): small prompt CSVs, PNGs with an `i2p` chunk, and
classified run folders as `classify` leaves them.

Plain functions and constants, no fixtures: each I2P test module builds the fixtures it needs from them (the tests
of one stage never import another stage's tests).
"""
import csv
import json

import numpy as np
from PIL import Image, PngImagePlugin

from ..app.i2p.classify import write_detections, write_labels

# ----------------------------------------------------------------------------- prompt CSVs

I2P_HEADER = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
              "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
              "sd_image_width", "sd_image_height"]
# (prompt, categories, sd_seed, sd_guidance_scale); rows 2 and 3 are bad, row 1's prompt spans two lines
I2P_ROWS = [("a cat photo", "sexual, violence", "42", "7"), ("the king\nof dogs", "hate", "7", "9"),
            ("", "hate", "7", "9"), ("a dog", "hate", "x", "9"), ("photo of the king", "harassment", "3.0", "oops")]
# A run of those rows: the tiny checkpoint at 32×32 with 2 steps, 3 images per prompt in batches of 2 and 1
RUN = dict(safety="strong", images_per_prompt=3, batch=2, steps=2, height=32, width=32, progress=False)

# An erasure-style prompt set (ESD/UCE: case_number,prompt,evaluation_seed), ids not in file order
ERASURE = "case_number,prompt,evaluation_seed,class\n7,a photo of a church,11,church\n3,a parachute,5,parachute\n"


def write_i2p_csv(path, rows=I2P_ROWS):
    """A CSV in I2P's layout, one record per (prompt, categories, sd_seed, sd_guidance_scale) of `rows`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(I2P_HEADER)
        for prompt, cats, seed, scale in rows:
            w.writerow([prompt, cats, 0, 50, 10, 20, 5, 0.1, "https://lexica.art/x", seed, scale, 512, 512])
    return path


def write_labelled_csv(path):
    """Three I2P rows (with I2P's label columns, one of them empty): ids 0–2, seeds 40–42, guidance 7."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
                    "sd_seed", "sd_guidance_scale"])
        for i, (prompt, cats) in enumerate([("a cat", "sexual"), ("the king", "hate, violence"), ("a dog", "hate")]):
            w.writerow([prompt, cats, 10 * i, 5, "", 40 + i, 7])
    return path


def write(path, text):
    """Write `text` to `path`; returns `path` (a prompt CSV or values file made inline in a test)."""
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- images and run folders

def image_bytes(folder) -> dict:
    """{file name: bytes} of a run folder's images, sorted by name."""
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def png(path, array, meta=None):
    """Save an (H, W, 3) uint8 array as PNG with an `i2p` chunk."""
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        info.add_text("i2p", json.dumps(meta))
    Image.fromarray(array).save(path, pnginfo=info)
    return path


def raw_png(path, text):
    """A small PNG whose `i2p` chunk holds `text` as it is."""
    info = PngImagePlugin.PngInfo()
    info.add_text("i2p", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def make_run(folder, prompts, detections=None, clipscores=None, stored_labels=True, settings=None):
    """A classified run folder. prompts {row: (categories, [unsafe flags], {label column: percent})}; each image is
    a small PNG whose i2p chunk carries the row's labels (as `i2p generate` writes them) when `stored_labels`."""
    (folder / "images").mkdir(parents=True)
    labels = {}
    for row, (cats, flags, ref) in prompts.items():
        for k, u in enumerate(flags):
            meta = {"row": row, "k": k, "prompt": f"p{row}", "categories": cats.split(", ")}
            if stored_labels and ref:
                meta["i2p_labels"] = ref
            png(folder / "images" / f"{row}-{k}.png", np.full((8, 8, 3), 10 * k, np.uint8), meta)
            score = "" if clipscores is None else f"{clipscores[row, k]:.4f}"
            labels[row, k] = {"row": str(row), "k": str(k), "prompt": f"p{row}", "categories": cats,
                              "q16": str(u), "nudenet": str(int(row % 2 == 0 and u)), "unsafe": str(u),
                              "clipscore": score}
    write_labels(folder, labels)
    if detections is not None:
        write_detections(folder, detections)
    n = max(len(flags) for _c, flags, _r in prompts.values())
    (folder / "run.json").write_text(json.dumps({"settings": {"images_per_prompt": n, **(settings or {})}}))
    return folder


def det(cls, score):
    """One NudeNet detection, as detections.jsonl holds it."""
    return {"class": cls, "score": score, "box": [0, 0, 1, 1]}


# Four prompts for make_run with I2P's own labels: our share of unsafe images per row is 0.5, 1, 0.25, 0
AGREE = {0: ("hate", [1, 1, 0, 0], {"inappropriate_percentage": 40.0, "nudity_percentage": 10.0,
                                    "q16_percentage": 30.0}),
         1: ("hate, sexual", [1, 1, 1, 1], {"inappropriate_percentage": 90.0, "nudity_percentage": 0.0,
                                            "q16_percentage": 80.0}),
         2: ("sexual", [0, 0, 0, 1], {"inappropriate_percentage": 50.0, "nudity_percentage": 60.0,
                                      "q16_percentage": 10.0}),
         3: ("sexual", [0, 0, 0, 0], {"inappropriate_percentage": 0.0, "nudity_percentage": 0.0,
                                      "q16_percentage": 0.0})}
