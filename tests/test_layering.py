"""The package's import graph is one-way: read from the source with `ast`, every import counted — at the top of a
module or inside a function (a lazy import that hides a cycle is still a cycle), relative ones resolved.

    models (clip, unet, vae) ← speedups ← weights ← tokenizer, folder ← layouts ← loading ← pipeline ← cli
"""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sld_minimal"
TINY_IMPORTERS = {"sld_minimal.cli", "sld_minimal.testing"}  # the `tiny` command, and the test fixtures


def modules(package: Path = PACKAGE) -> dict:
    """module name -> (path, is a package's __init__)"""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


def imported_names(name: str, path: Path, init: bool) -> set:
    """Every dotted name `name` imports anywhere in its file, relative imports made absolute; for `from X import a`
    both X and X.a (a may be a submodule)."""
    package = name if init else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def graph(package: Path = PACKAGE) -> dict:
    """module -> the package's modules it imports. Importing a.b.c runs a.b's __init__ too, so the packages on the
    way count as well, except one's own ancestors (`from .. import __version__` reads the package's face)."""
    mods = modules(package)
    edges = {}
    for name, (path, init) in mods.items():
        targets = set()
        for imported in imported_names(name, path, init):
            while imported and imported not in mods:  # X.attr -> X
                imported = imported.rpartition(".")[0]
            while imported:
                if imported != name and not name.startswith(imported + "."):
                    targets.add(imported)
                imported = imported.rpartition(".")[0]
        edges[name] = targets
    return edges


def find_cycle(edges: dict):
    """One cycle as a list of modules [a, b, …, a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_and_relative_imports_are_read(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a, __version__\n")
    edges = graph(pkg)
    assert edges["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(edges) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_only_the_tiny_command_and_the_test_helpers_import_tiny():
    importers = {m for m, targets in graph().items() if "sld_minimal.tiny" in targets}
    assert importers <= TINY_IMPORTERS, f"library code imports the random-checkpoint writer: {importers - TINY_IMPORTERS}"
    assert "sld_minimal.testing" in importers


def test_pytest_stays_optional():
    """Only the test helpers import pytest; the library runs without it."""
    uses = {m for m, (path, init) in modules().items()
            if any(n == "pytest" or n.startswith("pytest.") or n == "_pytest" or n.startswith("_pytest.")
                   for n in imported_names(m, path, init))}
    assert uses == {"sld_minimal.testing"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_says_what_it_is(name):
    """The first docstring line of every module says what it is (one sentence, not empty)."""
    path, _ = modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, f"{name}: no first line saying what the module is"


def test_the_readme_layout_table_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("| file | what |"):].split("\n\n")[0]
    listed = set(re.findall(r"\]\(sld_minimal/([\w/]+?)(?:\.py)?\)", table))
    files = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    files |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert listed == files
