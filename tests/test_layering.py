"""The package's imports follow one table (`LAYERS`): read from the source with `ast`, every import counted — at the
top of a module or inside a function (a lazy import that hides a wrong edge is still a wrong edge), relative ones
resolved. The library (models, loading, guidance, methods, loop, samplers, pipeline) never imports the
applications (`app/`) or the test fixtures (`testing/`); the math imports no model and no loader; the models import
no loader; callers import a name from the module that defines it.
"""
import ast
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sld_minimal"

# layer: (its modules, relative to the package; the layers it may import). A module imports within its own layer
# freely (the cycle test still holds); any other edge is an error.
LAYERS = {
    "base": ({"_version", "checks", "conditions", "files"}, set()),
    "math": ({"guidance", "noise_schedule", "schedulers"}, {"base"}),
    "models": ({"clip", "unet", "vae"}, {"base"}),  # base: the config value checks
    "speedups": ({"speedups"}, {"models"}),
    "loading": ({"weights", "tokenizer", "diffusers_folder", "single_file", "loading"}, {"base", "math", "models"}),
    "methods": ({"methods", "presets"}, {"base", "math"}),  # presets: names -> configs -> methods
    "loop": ({"sampling"}, {"base"}),
    "outputs": ({"outputs"}, {"base"}),
    "pipeline": ({"pipeline", ""}, {"base", "math", "models", "speedups", "loading", "methods", "loop", "outputs"}),
    "fixtures": ({"testing", "testing.tiny", "testing.pickles"}, {"library"}),
    "apps": ({"app", "app.*"}, {"library", "fixtures"}),
    "app fixtures": ({"testing.i2p"}, {"library", "fixtures", "apps"}),  # helpers of the I2P harness's tests
    "entry": ({"__main__"}, {"apps"}),  # `python -m sld_minimal`: the command line
}
LIBRARY = {"base", "math", "models", "speedups", "loading", "methods", "loop", "outputs", "pipeline"}
# third-party modules the library never imports at a module's top (slow or optional): tqdm only where a progress
# bar is drawn, pytest only in the fixtures, the applications' own dependencies never
NOT_AT_TOP = {"tqdm", "pytest", "gradio", "matplotlib", "diffusers", "nudenet", "cleanfid"}


def modules(package: Path = PACKAGE) -> dict:
    """module name -> (path, is a package's __init__)"""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


def imports(name: str, path: Path, init: bool, top_only: bool = False) -> set:
    """Every dotted name `name` imports in its file (only at the module's top level with `top_only`), relative
    imports made absolute; for `from X import a` both X and X.a (a may be a submodule)."""
    package = name if init else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in (tree.body if top_only else ast.walk(tree)):
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
        for imported in imports(name, path, init):
            while imported and imported not in mods:  # X.attr -> X
                imported = imported.rpartition(".")[0]
            while imported:
                if imported != name and not name.startswith(imported + "."):
                    targets.add(imported)
                imported = imported.rpartition(".")[0]
        edges[name] = targets
    return edges


def layer_of(module: str, package: str = "sld_minimal") -> str:
    rel = module.removeprefix(package).removeprefix(".")
    for layer, (members, _) in LAYERS.items():
        if any(rel == m or (m.endswith(".*") and rel.startswith(m[:-1])) for m in members):
            return layer
    raise KeyError(f"{module} is in no layer of LAYERS: add it to the table")


def allowed(layer: str) -> set:
    out = {layer}
    for name in LAYERS[layer][1]:
        out |= LIBRARY if name == "library" else {name}
    return out


def violations(package: Path = PACKAGE) -> list:
    """Every edge of the graph outside the table, as "a -> b (layer -> layer)"."""
    out = []
    for name, targets in sorted(graph(package).items()):
        ok = allowed(layer_of(name))
        out += [f"{name} -> {t} ({layer_of(name)} -> {layer_of(t)})" for t in sorted(targets) if layer_of(t) not in ok]
    return out


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


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_every_import_follows_the_table():
    assert violations() == []


def test_a_planted_wrong_edge_fails(tmp_path):
    """The table catches a library module that imports the applications, even lazily inside a function."""
    copy = tmp_path / "sld_minimal"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    with open(copy / "guidance.py", "a") as f:
        f.write("\n\ndef _planted():\n    from .app.common import UsageError  # noqa: F401\n")
    assert violations(copy) == ["sld_minimal.guidance -> sld_minimal.app (math -> apps)",
                                "sld_minimal.guidance -> sld_minimal.app.common (math -> apps)"]
    with open(copy / "unet.py", "a") as f:
        f.write("\nfrom .weights import WeightsError  # noqa: F401,E402\n")
    assert "sld_minimal.unet -> sld_minimal.weights (models -> loading)" in violations(copy)


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


def test_slow_and_optional_packages_are_not_imported_at_the_top_of_the_library():
    found = {name: sorted(n for n in imports(name, path, init, top_only=True) if n.split(".")[0] in NOT_AT_TOP)
             for name, (path, init) in modules().items() if layer_of(name) in LIBRARY}
    assert {k: v for k, v in found.items() if v} == {}


def test_pytest_stays_optional():
    """Only the test fixtures import pytest; the library and the applications run without it."""
    uses = {m for m, (path, init) in modules().items()
            if any(n.split(".")[0] in ("pytest", "_pytest") for n in imports(m, path, init))}
    assert uses == {"sld_minimal.testing"}


def _defined(path: Path) -> set:
    """The names a module defines at its top level (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _sources():
    """(path, module name or None, python source) of the package, the tests and the notebooks' code cells."""
    mods = {path: name for name, (path, _) in modules().items()}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        yield path, mods.get(path), path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        yield path, None, "\n".join(c for c in code if not c.lstrip().startswith(("%", "!")))


def test_names_are_imported_from_the_module_that_defines_them():
    """No module re-exports another's names: `from sld_minimal.x import name` finds `name` defined in x (or x's
    submodule `name`). The package's face (`from sld_minimal import StableDiffusion`) is the one exception."""
    mods = modules()
    wrong = []
    for path, name, source in _sources():
        package = None if name is None else name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target not in mods or target == "sld_minimal":
                continue
            defined = _defined(mods[target][0])
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name} is not defined in {target}"
                      for a in node.names if a.name not in defined and f"{target}.{a.name}" not in mods]
    assert wrong == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_says_what_it_is(name):
    """The first docstring line of every module says what it is (one sentence, not empty)."""
    path, _ = modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, f"{name}: no first line saying what the module is"


def test_the_readme_layout_table_lists_every_module():
    """README's file table links every module of the library and the two subpackages around it."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| file | what |"):].split("\n\n")[0]
    listed = set(re.findall(r"\]\(sld_minimal/([\w/]+?)(?:\.py)?/?\)", table))
    files = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    files |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert listed == files


def test_the_tiny_command_runs_without_pytest(tmp_path):
    """The fixtures need pytest, `sld-minimal tiny` (testing/tiny.py, under the fixtures' package) does not."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class NoPytest:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pytest', '_pytest'): raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, NoPytest())\n"
            "from sld_minimal.app.cli import main\n"
            f"sys.exit(main(['tiny', {str(tmp_path / 'ckpt')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "ckpt" / "model_index.json").is_file()
