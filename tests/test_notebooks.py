"""The notebooks in notebooks/ run top to bottom on the tiny model, draw their figures, keep their promise that each
formula is checked, and are committed without outputs (so that their diffs stay readable).

Executing them needs the `notebooks` extra (`pip install -e ".[notebooks]"`; CI installs it).
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["01_guidance_math.ipynb", "02_pipeline_walkthrough.ipynb", "03_research_variant.ipynb"]


def _read(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    nb = _read(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i} has execution timings"


def test_every_displayed_formula_is_checked_in_the_next_cell():
    # 01's promise: each markdown cell with a display equation ($$ … $$) is followed by a code cell that asserts
    cells = _read(NB_DIR / "01_guidance_math.ipynb")["cells"]
    with_formula = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "$$" in "".join(c["source"])]
    assert len(with_formula) >= 6
    for i in with_formula:
        nxt = cells[i + 1]
        assert nxt["cell_type"] == "code" and "assert" in "".join(nxt["source"]), f"cell {i + 1} checks nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_teach_no_deprecated_api(path):
    # pipe(..., guidance=fn) still works but warns (DeprecationWarning); the notebooks show method objects instead
    code = "\n".join("".join(c["source"]) for c in _read(path)["cells"] if c["cell_type"] == "code")
    assert not re.search(r"[(,]\s*guidance\s*=[^=]", code), f"{path.name} passes the deprecated guidance="


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")  # provides the `python3` kernel, run with this interpreter

    nb = nbformat.read(path, as_version=4)
    # MPLBACKEND (e.g. Agg in CI) would replace the inline backend, and the figures would not reach the outputs.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    # The tiny model even where real weights exist; one thread, since the tiny model's ops are too small to gain
    # from more and a shared CPU loses much to oversubscription.
    env.update(SLD_NOTEBOOKS_TINY="1", OMP_NUM_THREADS="1")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if any cell fails
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} drew no figure"
