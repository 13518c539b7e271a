"""The package reads top to bottom: every import of a jaxpar module (at any depth, lazy ones
included) points to the module's own layer or a lower one, there are no import cycles, and
no module imports another module's private names. docs/ARCHITECTURE.md draws the layers.

Imports are read with `ast`, nothing is imported. A new module or sub-package must be placed
in LAYERS below (the test fails until it is).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Bottom first: (layer, members). A member is a module ("jaxpar.api"), or a package with all
# its modules ("jaxpar.loading.*"); the most specific member places a module. A module may
# import modules of its own layer and of the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("jaxpar.config", "jaxpar.version")),
    ("loading", ("jaxpar.loading.*", "jaxpar.tokenizer")),
    ("kernels", ("jaxpar.kernels_pallas.*",)),
    ("sharding", ("jaxpar.sharding.*",)),
    ("models", ("jaxpar.models.*", "jaxpar.sampling", "jaxpar.stopping")),
    ("assembly", ("jaxpar.assembly",)),
    ("runtime", ("jaxpar.generate", "jaxpar.pipeline", "jaxpar.speculative", "jaxpar.engine.*",
                 "jaxpar.checkpoint.*",
                 "jaxpar.sharding.inspect")),
    ("api", ("jaxpar.api",)),
    ("training", ("jaxpar.training.*",)),  # fine-tuning loads through jaxpar.api
    ("experiment", ("jaxpar.experiment.*",)),  # its train mode compiles jaxpar.training's step
    ("cli", ("jaxpar.cli", "jaxpar")),  # "jaxpar": the package's __init__
]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file; a package's __init__.py is the package's name."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import of a `package` module in the
    file. `from pkg import name` imports the submodule `pkg.name` if there is one, else `pkg`."""
    base_pkg = name if _is_package(path) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = base_pkg.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, "") if sub in modules else (base, a.name))
    out = []
    for target, what in found:
        if target != package and not target.startswith(package + "."):
            continue
        while target not in modules and "." in target:  # `import jaxpar.a.b.C`-style: the module
            target = target.rpartition(".")[0]
        if target in modules and target != name:
            out.append((target, what))
    return out


def import_graph(root: Path, package: str) -> dict[str, list[tuple[str, str]]]:
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules, package) for name, path in modules.items()}


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, best_len = None, -1
    for index, (_, members) in enumerate(layers):
        for member in members:
            name = member.removesuffix(".*")
            inside = member.endswith(".*") and module.startswith(name + ".")
            if (module == name or inside) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def cycles(graph: dict[str, list[tuple[str, str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(graph: dict[str, list[tuple[str, str]]], layers=LAYERS) -> list[str]:
    out = []
    for module in sorted(graph):
        mine = layer_of(module, layers)
        if mine is None:
            out.append(f"{module} is in no layer: place it in LAYERS (tests/test_layering.py)")
            continue
        for target, what in graph[module]:
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > mine:
                out.append(f"{module} ({layers[mine][0]}) imports {target} ({layers[theirs][0]}), "
                           "a higher layer")
            if what.startswith("_") and not what.startswith("__"):
                out.append(f"{module} imports the private name {what} of {target}")
    out += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return out


def test_jaxpar_imports_only_downwards_without_cycles():
    graph = import_graph(PACKAGE_ROOT, "jaxpar")
    assert {"jaxpar.api", "jaxpar.assembly", "jaxpar.checkpoint.orbax_io", "jaxpar.sharding.inspect"} <= set(graph)
    assert "jaxpar.assembly" in {t for t, _ in graph["jaxpar.api"]}  # the walker sees imports at all
    assert problems(graph) == []


def test_the_check_catches_cycles_upward_and_private_imports(tmp_path):
    """The walker on a small package: a cycle, an upward import, a private name, a module
    in no layer, and a relative import."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    files = {
        "__init__.py": "from toy.top import run\n",
        "top.py": "import toy.low.base\n",
        "low/__init__.py": "",
        "low/base.py": "def f():\n    from toy.top import run  # lazy, still counts\n",
        "low/helper.py": "from .base import _secret\nfrom . import other\n",
        "low/other.py": "from toy.low import helper\n",
        "stray.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    layers = [("low", ("toy.low.*",)), ("top", ("toy.top", "toy"))]
    graph = import_graph(tmp_path, "toy")
    assert graph["toy.low.helper"] == [("toy.low.base", "_secret"), ("toy.low.other", "")]
    found = problems(graph, layers)
    assert "toy.low.base (low) imports toy.top (top), a higher layer" in found
    assert "toy.low.helper imports the private name _secret of toy.low.base" in found
    assert "import cycle: toy.low.base <-> toy.top" in found
    assert "import cycle: toy.low.helper <-> toy.low.other" in found
    assert any(p.startswith("toy.stray is in no layer") for p in found)
    assert len(found) == 5, found


@pytest.mark.parametrize("module,layer", [("jaxpar.sharding.inspect", "runtime"), ("jaxpar.sharding.rules", "sharding"),
                                          ("jaxpar", "cli"), ("jaxpar.engine.slots", "runtime")])
def test_sub_packages_are_placed_explicitly(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
