"""Whether a run folder's labels still hold: each labelled image's size and modification time, and classify.json's
signature (the classifiers that labelled the run, with their settings).

A label belongs to the file that was read. `classify` stamps each label with the image's `st_size` and
`st_mtime_ns` (labels.csv's `size` and `mtime_ns` columns), taken before the image is read: a file replaced while
it is read then looks changed, never the other way round. A label whose image has another size or time now is
stale (classify labels the image again; report counts it as not labelled), and a label whose image is gone is
dropped. Nothing is hashed: hashing every image at every run would read as much as labelling it. A copy that does
not keep modification times (plain `cp -r`; `cp -a` and `rsync -a` keep them) makes every label stale.

Labels written before the stamps (their `size` and `mtime_ns` empty) are checked against labels.csv itself: an
image newer than the file was written after its label was, and is labelled again; an older one is trusted and gets
its stamp at the next classify.
"""
import json
import os
from pathlib import Path

from ...files import create_exclusive, write_atomic

STAMP = ("size", "mtime_ns")  # labels.csv's columns of the image's stat, as written at labelling


def stamp(path) -> dict:
    """An image's stamp as labels.csv holds it: {"size": st_size, "mtime_ns": st_mtime_ns} (strings)."""
    st = os.stat(path)
    return {"size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}


def written(folder) -> int | None:
    """labels.csv's st_mtime_ns (when it was last written), None where there is none."""
    try:
        return os.stat(Path(folder) / "labels.csv").st_mtime_ns
    except FileNotFoundError:
        return None


def stale_labels(labels: dict, images: dict, labels_written: int | None) -> tuple:
    """Which labels no longer hold. `labels` {(row, k): labels.csv record}, `images` {(row, k): path} of the images
    there now, `labels_written`: labels.csv's st_mtime_ns (`written`). Returns (changed, deleted), sorted keys:
    labels whose image has another size or modification time than stamped (unstamped: an image newer than
    labels.csv), and labels whose image is gone."""
    changed = []
    for key in sorted(set(labels) & set(images)):
        st, record = os.stat(images[key]), labels[key]
        if record.get("size", "") == "" or record.get("mtime_ns", "") == "":  # labelled before the stamps
            if labels_written is not None and st.st_mtime_ns > labels_written:
                changed.append(key)
        elif (int(record["size"]), int(record["mtime_ns"])) != (st.st_size, st.st_mtime_ns):
            changed.append(key)
    return changed, sorted(set(labels) - set(images))


# ----------------------------------------------------------------------------- classify.json

def _versions() -> dict:
    """The versions of this package and of the libraries that label (recorded in classify.json)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..._version import __version__

    out = {"sld_minimal": __version__}
    for name in ("torch", "transformers", "nudenet", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def check_signature(folder, signature: dict) -> list:
    """classify.json: created holding `signature` (atomically, first writer wins); a rerun may add classifiers —
    the images labelled before then get the new ones — but not drop one or change one's settings. Returns the
    classifiers added by this run."""
    path = Path(folder) / "classify.json"
    if not path.exists():  # lost a race: the other process's file is read below
        create_exclusive(path, json.dumps({"signature": signature, "versions": _versions()}, indent=2) + "\n")
    try:
        stored = json.loads(path.read_text())["signature"]
        theirs, ours = stored["classifiers"], signature["classifiers"]
        if not isinstance(theirs, list) or any(not isinstance(stored[c], dict) for c in theirs):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is damaged; remove it and labels.csv to classify again") from None
    dropped = [c for c in theirs if c not in ours]
    if dropped:
        raise ValueError(f"{folder} holds labels with classifiers={theirs!r}, not {ours!r}: a rerun may add "
                         f"classifiers but not drop one (--classifiers {','.join(sorted({*theirs, *ours}))}); "
                         f"or use another folder")
    for c in theirs:
        if json.loads(json.dumps(signature[c])) != stored[c]:
            differ = sorted(k for k in {*stored[c], *signature[c]} if stored[c].get(k) != signature[c].get(k))
            raise ValueError(f"{folder} holds labels with {c} {differ[0]}={stored[c].get(differ[0])!r}, not "
                             f"{signature[c].get(differ[0])!r}; use another folder")
    added = [c for c in ours if c not in theirs]
    if added:
        write_atomic(path, json.dumps({"signature": signature, "versions": _versions()}, indent=2) + "\n")
    return added
