"""`report --plot FILE.png`: the report's per-category numbers as grouped bars, one bar per run (matplotlib); a
run without a value for a category (none of its prompts there) has no bar there, not a bar at 0.

Panels: the probability (the share of images the run's classifiers flag), the expected maximum with its spread
(mean ± std over the subsets, as error bars) and, where every run has NudeNet's detections, the share of images
with at least one exposed part (metrics.py). Each bar carries its value. The first two panels' titles say which
classifiers flagged the images (runs.Measure: "NudeNet only — nudity, …"); runs flagged by different classifiers
carry their marked names in the legend ("a [NudeNet only]") and the titles say they are not comparable.
Categories are I2P's seven in the paper's order then Overall. A template run (`i2p prompts`: the category column
holds the template's value, e.g. a country) has no I2P category: its values are drawn as horizontal bars sorted by
the first run's share, the paper's country analysis.

An existing file is never replaced unless asked (`overwrite`, `report --plot FILE --overwrite`): checked before the
report's work, and again at the write, which creates the file only if it still does not exist.
"""
import math
import textwrap
from pathlib import Path

from ...files import create_exclusive, write_atomic
from .metrics import CATEGORIES, OVERALL, title


def _panels(t) -> list:
    """[(title, {run name: {category: value}}, {run name: {category: std}} or None)] of the metrics every run has;
    the flagged share's panels name the runs as the tables' probability columns do (`Tables.marked`)."""
    panels = []
    if all(t.stats):
        kinds = {r.measure.short for r in t.runs}
        what = (t.runs[0].measure.full if len(kinds) == 1 else
                "each run's own classifiers, which differ (" + ", ".join(sorted(kinds)) + "): not comparable")
        panels.append((f"share of images flagged: {what}",
                       {n: {c: s.probability for c, s in st.items()} for n, st in zip(t.marked, t.stats)}, None))
        panels.append((f"expected maximum over {t.subset_size}-prompt subsets (mean ± std): {what}",
                       {n: {c: s.exp_max for c, s in st.items()} for n, st in zip(t.marked, t.stats)},
                       {n: {c: s.exp_max_std for c, s in st.items()} for n, st in zip(t.marked, t.stats)}))
    if all(e is not None for e in t.exposed):
        panels.append((f"images with ≥ 1 exposed part (NudeNet, score ≥ {t.threshold})",
                       {n: {c: x.images_any / x.images for c, x in e.items() if x.images}
                        for n, e in zip(t.names, t.exposed)}, None))
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
    replaced only with `overwrite`). `template`: see `figure`."""
    path = check_plot_path(path, overwrite)
    fig = figure(t, template)
    plt = _pyplot()

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


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'sld-minimal[plot]'") from None
    return plt


def figure(t, template=None):
    """The matplotlib figure of report.Tables `t`: a panel per metric every run has (`_panels`), a bar per run and
    category labelled with its value. `template`: per-value layout (horizontal, sorted); default: where no run has
    one of I2P's categories."""
    plt = _pyplot()
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
    for ax, (name, values, spread) in zip(axes.ravel(), panels):
        for i, run in enumerate(values):
            pos = [j + (i - (n_runs - 1) / 2) * width for j in range(len(order))]
            heights = [values[run].get(c, math.nan) for c in order]  # NaN: no bar
            errors = None if spread is None else {"xerr" if template else "yerr": [
                spread[run].get(c, math.nan) for c in order], "capsize": 2}
            bars = (ax.barh if template else ax.bar)(pos, heights, width, label=run, **(errors or {}))
            ax.bar_label(bars, ["" if math.isnan(v) else f"{v:.2f}" for v in heights], padding=3, fontsize=6,
                         rotation=0 if template else 90)
        ticks = [title(c) for c in order]
        if template:
            ax.set_yticks(range(len(order)), ticks)
            ax.set_xlabel("share of images")
            ax.set_xlim(0, 1.2)  # room for the values beside the bars
        else:
            ax.set_xticks(range(len(order)), ticks, rotation=30, ha="right")
            ax.set_ylabel("share of images")
            ax.set_ylim(0, 1.25)  # room for the values above the bars and their error bars
        (ax.set_xticks if template else ax.set_yticks)([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(textwrap.fill(name, 60, break_on_hyphens=False), fontsize="medium")  # ~ a panel's width
        ax.grid(axis="x" if template else "y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: clear of the values
    fig.tight_layout()
    return fig
