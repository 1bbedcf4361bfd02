"""`report --plot FILE.png`: the report's per-category numbers as grouped bars, one bar per run (matplotlib); a
run without a value for a category (none of its prompts there) has no bar there, not a bar at 0.

Panels: the inappropriate probability (share of images Q16 or NudeNet flags) and, where every run has NudeNet's
detections, the share of images with at least one exposed part (metrics.py). Categories are I2P's seven in the
paper's order then Overall. A template run (`i2p prompts`: the category column holds the template's value, e.g. a
country) has no I2P category: its values are drawn as horizontal bars sorted by the first run's share, the
paper's country analysis.

An existing file is never replaced unless asked (`overwrite`, `report --plot FILE --overwrite`): checked before the
report's work, and again at the write, which creates the file only if it still does not exist.
"""
import math
from pathlib import Path

from ...files import create_exclusive, write_atomic
from .metrics import CATEGORIES, OVERALL, title


def _panels(t) -> list:
    """[(title, {run name: {category: value}})] of the metrics every run has."""
    panels = []
    if all(t.stats):
        panels.append(("inappropriate probability (Q16 or NudeNet)",
                       {n: {c: s.probability for c, s in st.items()} for n, st in zip(t.names, t.stats)}))
    if all(e is not None for e in t.exposed):
        panels.append((f"images with ≥ 1 exposed part (NudeNet, score ≥ {t.threshold})",
                       {n: {c: x.images_any / x.images for c, x in e.items() if x.images}
                        for n, e in zip(t.names, t.exposed)}))
    return panels


def check_plot_path(path, overwrite=False) -> Path:
    """The plot's path, checked: a .png name in a folder that exists, not an existing file unless `overwrite`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the plot is written as PNG; name a .png file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: folder {path.parent} does not exist")
    if path.is_dir() or (path.exists() and not overwrite):
        raise FileExistsError(_exists(path))
    return path


def _exists(path) -> str:
    return f"--plot {path} already exists; choose another file or pass --overwrite"


def plot_tables(t, path, template=None, overwrite=False):
    """Draw the grouped bars of report.Tables `t` into the PNG `path` (written atomically; an existing file is
    replaced only with `overwrite`). `template`: per-value layout (horizontal, sorted); default: where no run has
    one of I2P's categories."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'sld-minimal[plot]'") from None

    path = check_plot_path(path, overwrite)
    panels = _panels(t)
    if not panels:
        raise ValueError("--plot: no metric that every run has (classify with q16 and/or nudenet first)")
    if template is None:
        template = not any(c in CATEGORIES for c in t.order)
    order = [c for c in t.order if c != OVERALL] if template else list(t.order)
    if template:  # values sorted by the first run's share in the first panel, largest on top
        first = next(iter(panels[0][1].values()))
        order.sort(key=lambda c: first.get(c, 0.0))
    n_runs, width = len(t.names), 0.8 / len(t.names)
    long = max(len(order), 4) * (0.25 + 0.12 * n_runs)  # inches along the category axis
    if template:  # panels side by side, values down the page
        fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.5 * len(panels), max(3.0, long)))
    else:  # panels stacked, categories across
        fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(max(6.0, long), 3.8 * len(panels)))
    for ax, (name, values) in zip(axes.ravel(), panels):
        for i, run in enumerate(t.names):
            pos = [j + (i - (n_runs - 1) / 2) * width for j in range(len(order))]
            heights = [values[run].get(c, math.nan) for c in order]  # NaN: no bar
            (ax.barh if template else ax.bar)(pos, heights, width, label=run)
        ticks = [title(c) for c in order]
        if template:
            ax.set_yticks(range(len(order)), ticks)
            ax.set_xlabel("share of images")
            ax.set_xlim(0, 1)
        else:
            ax.set_xticks(range(len(order)), ticks, rotation=30, ha="right")
            ax.set_ylabel("share of images")
            ax.set_ylim(0, 1)
        ax.set_title(name, fontsize="medium")
        ax.grid(axis="x" if template else "y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    def draw(f):
        fig.savefig(f, format="png", dpi=120)

    try:
        if overwrite:
            write_atomic(path, draw)
        elif not create_exclusive(path, draw):  # made by someone else since the check: theirs stays
            raise FileExistsError(_exists(path))
    finally:
        plt.close(fig)
    return path
