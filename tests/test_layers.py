"""Layers hold for every package, not only for the kernel's files (ARCHITECTURE.md, "Layers").

Every module of the four installed packages (``nnunet_ima``, ``nnunet_ima_trainers``,
``nnunet_ima_eval`` = eval/, ``nnunet_ima_demo``) belongs to one unit of :data:`LAYERS` (the longest prefix of its name),
and an import, at the top of a module or inside a function, may only go to its own layer or a lower
one; units and top-level packages import each other without a circle. The checker is tried on small
fake package trees with a circle first, so that it is known to fail where it should.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: folder of the checkout -> the top-level name it is installed as
PACKAGES = {"nnunet_ima": "nnunet_ima", "nnunet_ima_trainers": "nnunet_ima_trainers", "eval": "nnunet_ima_eval",
            "nnunet_ima_demo": "nnunet_ima_demo"}

#: unit -> layer. A module belongs to the longest unit its name starts with; an import may go to its
#: own layer or a lower one.
LAYERS = {
    "nnunet_ima": 0,               # the kernel: nnunet_ima's top-level modules (torch, numpy)
    "nnunet_ima.ui": 1,            # what the front ends share with the user: arguments, error line, plots
    "nnunet_ima.classify": 2,      # front ends
    "nnunet_ima_trainers": 2,
    "nnunet_ima_eval": 2,
    "nnunet_ima_demo": 3,          # the app, its own top-level package
}

#: upward imports tolerated for now: (module, imported module) -> why, and who removes it. Empty since
#: part B of issue 21; keep the mechanism for the next transition.
TRANSITIONAL: dict = {}


#: what the kernel must not do itself (issue 21: argument parsing and plotting leave the kernel)
NOT_IN_THE_KERNEL = ("argparse", "matplotlib")


# ---------------------------------------------------------------------------------------------- the checker
def find_modules(root: Path, packages: dict) -> dict[str, bool]:
    """``{dotted module name: is a package}`` for every .py file below the package folders."""
    found = {}
    for folder, name in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            found[".".join((name, *(parts[:-1] if is_package else parts)))] = (is_package, path)
    return found


def _targets(node, module: str, is_package: bool, known) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        parts = (module if is_package else module.rpartition(".")[0]).split(".")
        package = ".".join(parts[:len(parts) - (node.level - 1)])
        base = f"{package}.{base}" if base else package
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph(root: Path, packages: dict) -> dict[str, set[str]]:
    """``{module: the project modules it imports}``: absolute and relative imports, at module level
    or in functions; ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    known = find_modules(root, packages)
    tops = tuple(packages.values())
    graph = {}
    for module, (is_package, path) in known.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= _targets(node, module, is_package, known)
        graph[module] = {n for n in names if n.split(".")[0] in tops and n != module}
    return graph


def external_imports(root: Path, packages: dict, module: str) -> set[str]:
    known = find_modules(root, packages)
    tree = ast.parse(known[module][1].read_text())
    return {n.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            and not getattr(node, "level", 0) for n in _targets(node, module, known[module][0], known)}


def unit_of(module: str, layers: dict) -> str:
    units = [u for u in layers if module == u or module.startswith(u + ".")]
    if not units:
        raise KeyError(f"{module} is in no unit of the layer table")
    return max(units, key=len)


def upward_imports(graph: dict, layers: dict) -> set[tuple[str, str]]:
    """Imports that go to a higher layer than their module's."""
    return {(a, b) for a, targets in graph.items() for b in targets
            if layers[unit_of(b, layers)] > layers[unit_of(a, layers)]}


def find_cycle(edges: dict) -> list | None:
    """One circle ``[a, b, ..., a]`` in a graph ``{node: set of nodes}``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
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


def collapse(graph: dict, name_of, skip=frozenset()) -> dict:
    """The graph between groups of modules (``name_of(module)``), without edges inside a group;
    ``skip``: imports to leave out, as (module, imported module) pairs."""
    out: dict = {}
    for a, targets in graph.items():
        for b in targets:
            if (a, b) not in skip and name_of(a) != name_of(b):
                out.setdefault(name_of(a), set()).add(name_of(b))
    return out


def top_level(module: str) -> str:
    return module.split(".")[0]


# ---------------------------------------------------------------------------------------------- the checker can fail
def _tree(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    """A fake tree: the low package imports the high one (relative and absolute, in a function too)."""
    root = _tree(tmp_path, {"low/__init__.py": "", "low/core.py": "def f():\n    from high import app\n",
                            "high/__init__.py": "from low import core\n", "high/app.py": "from .sub import helper\n",
                            "high/sub/__init__.py": "", "high/sub/helper.py": "from ..app import x\nimport numpy\n"})
    packages = {"low": "low", "high": "high"}
    graph = import_graph(root, packages)
    assert graph["low.core"] == {"high.app"} and graph["high.app"] == {"high.sub.helper"}
    assert graph["high"] == {"low.core"} and graph["high.sub.helper"] == {"high.app"}
    assert upward_imports(graph, {"low": 0, "high": 1}) == {("low.core", "high.app")}
    assert find_cycle(collapse(graph, top_level)) in (["high", "low", "high"], ["low", "high", "low"])


def test_the_checker_finds_a_circle_inside_one_layer(tmp_path):
    """Two front ends that import each other break no layer rule, but make a circle."""
    root = _tree(tmp_path, {"base/__init__.py": "", "a/__init__.py": "import base\nimport b.x\n",
                            "b/__init__.py": "", "b/x.py": "from a import y\n", "a/y.py": "import base\n"})
    packages = {"base": "base", "a": "a", "b": "b"}
    layers = {"base": 0, "a": 1, "b": 1}
    graph = import_graph(root, packages)
    assert not upward_imports(graph, layers)
    assert find_cycle(collapse(graph, lambda m: unit_of(m, layers))) == ["a", "b", "a"]
    assert find_cycle(collapse(graph, lambda m: unit_of(m, layers), skip={("b.x", "a.y")})) is None


# ---------------------------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, PACKAGES)


def test_every_module_imports_only_its_own_layer_or_a_lower_one(graph):
    assert {unit_of(m, LAYERS) for m in graph} == set(LAYERS)  # every module placed, every unit used
    upward = upward_imports(graph, LAYERS)
    assert upward <= set(TRANSITIONAL), f"imports that go up a layer: {sorted(upward - set(TRANSITIONAL))}"
    assert upward == set(TRANSITIONAL), f"no longer needed, remove from TRANSITIONAL: {set(TRANSITIONAL) - upward}"


def test_the_units_import_each_other_without_a_circle(graph):
    units = collapse(graph, lambda m: unit_of(m, LAYERS), skip=set(TRANSITIONAL))
    assert find_cycle(units) is None
    assert units.get("nnunet_ima.ui", set()) <= {"nnunet_ima"}  # ui imports the kernel at most


def test_the_kernel_neither_parses_arguments_nor_plots():
    kernel = [m for m in find_modules(ROOT, PACKAGES) if unit_of(m, LAYERS) == "nnunet_ima"]
    offenders = {m: sorted(set(NOT_IN_THE_KERNEL) & external_imports(ROOT, PACKAGES, m)) for m in kernel}
    assert not {m: v for m, v in offenders.items() if v}


def test_the_top_level_packages_import_each_other_without_a_circle(graph):
    cycle = find_cycle(collapse(graph, top_level, skip=set(TRANSITIONAL)))
    assert cycle is None, f"packages in a circle: {' -> '.join(cycle)}"


def test_the_app_is_the_only_package_above_the_front_ends(graph):
    """Only the demo imports the trainers and the evaluation together; nothing imports the demo."""
    tops = collapse(graph, top_level)
    assert not any("nnunet_ima_demo" in targets for targets in tops.values())
    assert tops.get("nnunet_ima", set()) == set(), "the kernel package imports no other package"
