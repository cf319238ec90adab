"""docs/architecture.md stays true to the code: every import (inside functions too) goes to the same layer or one
below it, the package has no import cycle, and every package folder is one that pyproject.toml installs."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nmcli"

# Top to bottom, as docs/architecture.md lists them; a module imports only from its own layer or those below.
LAYERS = {
    "entry": ("nmcli.__main__",),
    "cli": ("nmcli.cli", "nmcli.commands"),
    "services": ("nmcli.train", "nmcli.quality", "nmcli.oneshot", "nmcli.study", "nmcli.export", "nmcli.report"),
    "data": ("nmcli.data",),
    "methods": ("nmcli.methods",),
    "models": ("nmcli.models",),
    "io": ("nmcli.io",),
    "core": ("nmcli.nm", "nmcli.errors", "nmcli.runtime", "nmcli"),
}
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS.values()) for prefix in prefixes}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    """The rank of the longest layer prefix that names `module` (0 = top)."""
    best = max((p for p in RANK if module == p or module.startswith(p + ".")), key=len)
    return RANK[best]


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the nmcli modules it imports anywhere in its file (`from nmcli.x import y` counts y if a module)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nmcli":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges[module].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[module] |= {a.name for a in node.names if a.name.split(".")[0] == "nmcli"}
        edges[module].discard(module)
    return edges


def test_every_import_goes_to_the_same_layer_or_below():
    """The package facade (`nmcli/__init__.py`: `__version__`, and `load_nm` re-exported for users) is the one
    module allowed to reach up."""
    modules = _modules()
    upward = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
              for m, targets in _imports(modules).items() if m != "nmcli" for t in targets if _layer(t) < _layer(m)]
    assert upward == []


def test_no_import_cycles_apart_from_the_package_facade():
    """`nmcli/__init__.py` re-exports `load_nm` lazily for users and `io/metadata.py` reads `nmcli.__version__`:
    the facade is left out; any other cycle (the one that ran through io/sources, nm_format and onnx_source) fails."""
    edges = {m: {t for t in ts if t != "nmcli"} for m, ts in _imports(_modules()).items() if m != "nmcli"}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                cycles.append(sorted([v, *component]))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (recipes/ ships inside as nmcli.builtin_recipes): a new folder
    missing from the list would import from a checkout but not from an installed wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)
