"""A classified run folder as the report reads it: its labels, detections and settings, and how much of what it was
expected to hold is there and labelled.

Expected: run.json's `prompts.rows` (the ids of the prompt rows `i2p generate` selected, before sharding) × its
`images_per_prompt`. A run.json without them (made before they were recorded, or by `i2p import` or
`external.generate_with`) falls back to the rows found (among the images and labels.csv) × `images_per_prompt`,
and the report says that the prompt set is unknown; without `images_per_prompt` too, to the images found.

Found and labelled: an expected image that is in images/ with a label that still holds (validity.py: not changed
since classify). Labels of deleted images and of changed ones are left out of every table. A run short of any
expected image or label is refused (`Incomplete`) unless the report is asked for a partial one.

Flagged by: the flagging classifiers (Q16, NudeNet, registered ones) that hold a value on the run's labelled images,
read from labels.csv itself (its `q16`, `nudenet` and registered columns; empty where a classifier did not run).
Their union is the run's `unsafe` flag, so they decide what its probability measures (`Measure`): Q16 ∪ NudeNet is
the paper's "inappropriate"; NudeNet alone measures nudity only; Q16 alone Q16's notion without nudity.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from .classify import IMAGE_NAME, REGISTRY, read_detections, read_labels
from .validity import stale_labels, written


class Incomplete(ValueError):
    """A run folder short of expected images or labels; `detail` says what is missing, in one line."""

    def __init__(self, detail: str):
        super().__init__(f"{detail}; report(..., allow_partial=True) reports it anyway")
        self.detail = detail


@dataclass
class Coverage:
    """What a run was expected to hold and what of it is there and labelled (see the module docstring)."""
    expected: int            # images expected
    prompts: int             # prompts expected
    labelled: int            # expected images there with a label that holds
    complete: int            # expected prompts with every image labelled
    missing_rows: list       # expected rows short of an image or a label, sorted
    absent: int              # expected images not in images/
    unlabelled: int          # expected images there without a label that holds
    changed: int             # of those, images changed since they were labelled
    how: str                 # where `expected` comes from, in words
    extra: list              # rows labelled but not expected (counted in the tables too)

    @property
    def partial(self) -> bool:
        return self.labelled < self.expected

    def found(self) -> str:
        """E.g. "400 of 600 images and 100 of 150 prompts found and labelled (expected: …)"."""
        return (f"{self.labelled} of {self.expected} images and {self.complete} of {self.prompts} prompts found and "
                f"labelled (expected: {self.how})")

    def missing(self, folder) -> str:
        """E.g. "missing: 200 images, labels of 10 images there (…), in rows 3, 7, … and 45 more"."""
        parts = [f"{self.absent} images"] if self.absent else []
        if self.unlabelled:
            changed = f"{self.changed} changed since labelled; " if self.changed else ""
            parts.append(f"labels of {self.unlabelled} images there ({changed}run `sld-minimal i2p classify "
                         f"{folder}`)")
        return f"missing: {', '.join(parts)}, in rows {some(self.missing_rows)}"


def some(ids, shown=5) -> str:
    """The first `shown` ids, then how many more: "3, 7, 12, 15, 20 and 45 more"."""
    ids = list(ids)
    head = ", ".join(map(str, ids[:shown]))
    return head if len(ids) <= shown else f"{head} and {len(ids) - shown} more"


def coverage(record: dict, labels: dict, images: dict, seen: set, stale: list) -> Coverage:
    """`record`: run.json; `labels`: the labels that hold {(row, k): record}; `images` {(row, k): path} of the
    images there; `seen`: the keys labels.csv holds (those of deleted images too); `stale`: keys of images there
    whose labels no longer hold (changed since labelled)."""
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    n = settings.get("images_per_prompt")
    n = n if type(n) is int and n >= 1 else None
    listed = record["prompts"].get("rows") if isinstance(record.get("prompts"), dict) else None
    known = isinstance(listed, list) and all(type(r) is int for r in listed)
    rows = sorted(set(listed)) if known else sorted({row for row, _k in (*images, *seen)})
    if n is None:  # images per prompt unknown: the images there, or labelled once, are what is expected
        wanted = set(rows)
        expected = {key for key in set(images) | seen if key[0] in wanted}
        how = "the images found: images per prompt unknown, run.json has none"
    else:
        expected = {(row, k) for row in rows for k in range(n)}
        how = (f"run.json's {len(rows)} prompt rows × {n} images per prompt" if known else f"the {len(rows)} "
               f"prompts found × {n} images per prompt: the prompt set is unknown, run.json lists no rows")
    held, there, prompts = set(labels), set(images), {row for row, _k in expected}
    short = sorted({row for row, k in expected if (row, k) not in held})
    return Coverage(expected=len(expected), prompts=len(prompts), labelled=len(expected & held),
                    complete=len(prompts) - len(short), missing_rows=short, absent=len(expected - there),
                    unlabelled=len((expected & there) - held), changed=len(expected & set(stale)), how=how,
                    extra=sorted({row for row, _k in held} - set(rows)))


BUILT_IN = {"q16": "Q16", "nudenet": "NudeNet"}  # the flagging classifiers I2P's labels come from, by display name
NOT_THE_PAPERS = "not the paper's Q16 ∪ NudeNet"


@dataclass(frozen=True)
class Measure:
    """What a run's probability measures: the classifiers that flagged its images, in words."""
    short: str  # "NudeNet only": the marker on columns and legends
    full: str   # "NudeNet only — nudity, not the paper's Q16 ∪ NudeNet"
    who: str    # "NudeNet": the subject of "the share of images that … flags"


def measure(flaggers, uneven=()) -> Measure | None:
    """The Measure of a run flagged by `flaggers` (labels.csv column names, in column order); `uneven`: [(name,
    images with its value, labelled images)] of those that ran on part of the images only. None: no flagger."""
    if not flaggers:
        return None
    shown = [BUILT_IN.get(c, c) for c in flaggers]
    registered = [c for c in flaggers if c not in BUILT_IN]
    if set(flaggers) == set(BUILT_IN):
        short, full = "Q16 ∪ NudeNet", "Q16 and NudeNet — the paper's inappropriate (Q16 ∪ NudeNet)"
    elif tuple(flaggers) == ("nudenet",):
        short, full = "NudeNet only", f"NudeNet only — nudity, {NOT_THE_PAPERS}"
    elif tuple(flaggers) == ("q16",):
        short, full = "Q16 only", f"Q16 only — Q16's inappropriate content without NudeNet's nudity, {NOT_THE_PAPERS}"
    else:  # a registered classifier, alone or beside others: its own name and description
        short = " ∪ ".join(shown)
        says = [REGISTRY[c].measures for c in registered]
        full = f"{shown[0]} — {says[0]}" if len(shown) == 1 else f"{' and '.join(shown)} — " + "; ".join(
            f"{c}: {m}" for c, m in zip(registered, says))
        if len(registered) < len(flaggers):
            full += f"; {NOT_THE_PAPERS}"
    if uneven:
        on = ", ".join(f"{BUILT_IN.get(c, c)} on {n} of {m} images" for c, n, m in uneven)
        short, full = f"{short} ({on})", f"{full} ({on})"
    return Measure(short, full, " or ".join(shown))


def flaggers(labels: dict) -> tuple:
    """The flagging classifiers that hold a value on `labels` ({(row, k): labels.csv record}), in column order, and
    [(name, images with its value, images)] of those holding one on part of the images only (see the docstring)."""
    ran, uneven = [], []
    for c in (*BUILT_IN, *REGISTRY):
        n = sum(1 for r in labels.values() if r.get(c, "") != "")
        if n:
            ran.append(c)
        if 0 < n < len(labels):
            uneven.append((c, n, len(labels)))
    return tuple(ran), uneven


@dataclass
class Run:
    """A classified run folder as the report reads it."""
    folder: Path
    labels: dict                 # {(row, k): labels.csv record} of the images there whose labels hold
    detections: dict | None      # {(row, k): NudeNet's detections} of those; None without detections.jsonl
    settings: dict               # run.json's settings
    signature: dict              # classify.json's signature
    coverage: Coverage
    description: str
    flaggers: tuple = ()         # the flagging classifiers behind `unsafe` (see the module docstring)
    measure: Measure | None = None  # what its probability measures; None: no flagging classifier ran

    @property
    def categories(self) -> dict:
        """{row: "a, b"}: each labelled row's categories."""
        return {row: r["categories"] for (row, _k), r in self.labels.items()}


def load_run(folder) -> Run:
    """A run folder's labels that hold, their detections, its settings and coverage (see the module docstring)."""
    folder = Path(folder)
    if not (folder / "labels.csv").exists():
        raise FileNotFoundError(f"{folder} has no labels.csv: run `sld-minimal i2p classify {folder}` first")
    labels = read_labels(folder)
    images = {(int(m[1]), int(m[2])): p for p in (folder / "images").glob("*.png") if (m := IMAGE_NAME.match(p.name))}
    changed, deleted = stale_labels(labels, images, written(folder))
    seen, labels = set(labels), {key: r for key, r in labels.items() if key not in {*changed, *deleted}}
    record = _json(folder / "run.json")
    cover = coverage(record, labels, images, seen, changed)
    detections = read_detections(folder)
    if detections is not None:
        detections = {key: found for key, found in detections.items() if key in labels}
    sig = _json(folder / "classify.json").get("signature", {})
    names = {"q16": lambda i: f"Q16 (CLIP {i['clip']})", "clipscore": lambda i: f"CLIP score (CLIP {i['clip']})",
             "nudenet": lambda i: f"NudeNet {i['version']} ({i.get('detector', 'v3 detector; the paper used v2')})",
             **{c: (lambda i, c=c: f"{c} ({REGISTRY[c].measures})") for c in REGISTRY}}
    classifiers = " + ".join(names[c](sig[c]) for c in sig.get("classifiers", []) if c in names) or "?"
    text = cover.found()
    if cover.partial:  # (the run's column says "partial")
        text += f"; {cover.missing(folder)}"
    if cover.extra:
        text += f"; also rows outside run.json's prompt set: {some(cover.extra)}"
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    ran, uneven = flaggers(labels)
    return Run(folder, labels, detections, settings, sig, cover, f"{text}; classified by {classifiers}", ran,
               measure(ran, uneven))


def _json(path: Path) -> dict:
    """A JSON file of the run folder ({} where absent); damaged: ValueError naming it."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({e})") from None
    return record
