"""The package's floors (ghostserve_sglang/__init__.py): every module is declared in a ``May import:``
line of its own docstring or its folder's, imports only what that line allows, and no import circle
exists, lazy imports inside functions included."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "ghostserve_sglang"
PACKAGE = ROOT.name
DECLARATION = re.compile(r"^May import: (.*?)\.?\s*(?:\n\s*\n|\Z)", re.MULTILINE | re.DOTALL)
MAX_LINES = 450


def _name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    base = name.split(".") if _is_package(path) else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            start = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [start, node.module or ""]))
            # ``from x import y``: module x.y if there is one, else a name in module x
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith(PACKAGE):
                while target not in modules:  # ``from .x import some_name``: the module is x
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    found.add(target)
    return found


def _declared(modules: dict) -> dict[str, list[str] | None]:
    """Unit (a module or a folder) -> the units it may import; None: anything."""
    units = {}
    for name, path in modules.items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        match = DECLARATION.search(doc)
        if match is None:
            continue
        text = " ".join(match.group(1).split())
        if text == "anything":
            units[name] = None
        elif text.startswith("nothing else"):
            units[name] = []
        else:
            units[name] = [f"{PACKAGE}.{item.strip()}" for item in text.split(",")]
    return units


def _unit(name: str, units: dict) -> str | None:
    """The nearest declaration: the module's own, else its folder's (the root package declares only
    itself, never the modules at the root)."""
    candidate = name
    while candidate:
        if candidate in units and (candidate != PACKAGE or name == PACKAGE):
            return candidate
        candidate = candidate.rpartition(".")[0]
    return None


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


MODULES = _modules()
UNITS = _declared(MODULES)
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def _allows(name: str, target: str) -> bool:
    unit = _unit(name, UNITS)
    allowed = UNITS[unit]
    return allowed is None or _within(target, unit) or any(_within(target, a) for a in allowed)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_declared_and_imports_only_what_its_floor_allows(name):
    unit = _unit(name, UNITS)
    assert unit is not None, f"{name} has no 'May import:' line, neither its own nor its folder's"
    for target in sorted(GRAPH[name]):
        assert _allows(name, target), (f"{name} (declared by {unit}) imports {target}; "
                                       f"allowed: {', '.join(UNITS[unit]) or 'nothing'}")


def test_the_declared_floors_have_no_circle():
    """If a may import b, b may never import a, directly or through others: the floors are a ladder."""
    edges = {u: {v for v in UNITS if v != u and (allowed is None or any(_within(v, a) for a in allowed))}
             for u, allowed in UNITS.items() if u != PACKAGE}
    edges = {u: vs - {PACKAGE} for u, vs in edges.items()}
    entry = {u for u, allowed in UNITS.items() if allowed is None}  # may import anything: the top
    cycle = _cycle({u: vs - entry for u, vs in edges.items()})
    assert cycle is None, "floors declared in a circle: " + " -> ".join(cycle)


def test_no_module_imports_one_that_imports_it_back():
    """A package's ``__init__`` importing its own modules is the way into it, not a circle."""
    graph = {n: {t for t in ts if not (_is_package(MODULES[t]) and _within(n, t))} for n, ts in GRAPH.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_is_longer_than_the_house_allows():
    lines = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: count for n, count in lines.items() if count > MAX_LINES}


def test_the_product_never_imports_the_test_harness():
    harness = f"{PACKAGE}.testing"
    users = sorted(n for n, targets in GRAPH.items()
                   if not _within(n, harness) and any(_within(t, harness) for t in targets))
    assert not users


def test_the_checker_finds_a_circle_and_an_upward_import():
    """The walk itself: a made-up circle is found, and so are the store importing the SGLang layer and
    the protection importing the restart's supervisor."""
    a, b = f"{PACKAGE}.store.a", f"{PACKAGE}.store.b"
    assert _cycle({a: {b}, b: {a}}) == [a, b, a]
    assert _cycle({a: {b}, b: set()}) is None
    assert not _allows(f"{PACKAGE}.store.segment", f"{PACKAGE}.sglang.protection.protector")
    assert not _allows(f"{PACKAGE}.sglang.protection.protector", f"{PACKAGE}.sglang.restart.supervisor")
    assert not _allows(f"{PACKAGE}.codec.codes", f"{PACKAGE}.store.segment")
    assert _allows(f"{PACKAGE}.sglang.restart.rejoin", f"{PACKAGE}.sglang.protection.collectives")
