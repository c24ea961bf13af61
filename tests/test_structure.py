"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Rule: only module-level imports (those that run when a module is imported, including ones inside
``if``/``try`` at module level) make edges of the import graph. An import inside a function runs
when the function is called, after every module has loaded, so it cannot form an import cycle;
the package uses such imports deliberately to keep heavy or optional modules off the start-up
path. ``from __future__`` and imports under ``if TYPE_CHECKING:`` are not edges either.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "fwi_jax"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level(body: list[ast.stmt]):
    """The statements that run at import time: ``body`` and the branches of its if/try/with."""
    for node in body:
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block)
            for handler in node.handlers:
                yield from _module_level(handler.body)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that module ``name`` imports at module level."""
    out: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in _module_level(ast.parse(source).body):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg
            full = (f"{base}.{a.name}" for a in node.names)
            targets = [t if t in modules else base for t in full]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != PACKAGE:
                continue
            parts = t.split(".")
            while ".".join(parts) not in modules:  # `import pkg.mod.attr` style: the module
                parts.pop()
            if ".".join(parts) != name:
                out.add(".".join(parts))
            # importing a.b.c runs a/__init__ and a.b/__init__ first; a package this module is
            # part of is already loading when the module runs, so that is no cycle
            for k in range(1, len(parts)):
                parent = ".".join(parts[:k])
                if parent in modules and not (name + ".").startswith(parent + "."):
                    out.add(parent)
    return out


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level."""
    paths = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(p): p for p in paths}
    return {
        name: imported_modules(p.read_text(), name, p.name == "__init__.py", set(names))
        for name, p in names.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def all_imports(path: pathlib.Path) -> set[str]:
    """Every module named by an import anywhere in the file (functions included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_cycle_between_package_modules():
    graph = import_graph()
    assert "fwi_jax.train" in graph and "fwi_jax.synth.mix" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    src = "import fwi_jax.b\nfrom fwi_jax import c\ndef f():\n    import fwi_jax.d\n"
    mods = {"fwi_jax", "fwi_jax.a", "fwi_jax.b", "fwi_jax.c", "fwi_jax.d"}
    assert imported_modules(src, "fwi_jax.a", False, mods) == {"fwi_jax.b", "fwi_jax.c"}
    # a name taken from a package's __init__ is an edge to the package
    assert imported_modules("from fwi_jax import x\n", "fwi_jax.a", False, mods) == {"fwi_jax"}


def test_training_and_demo_do_not_import_inference():
    # inference builds on training, never the reverse; the rule counts imports
    # anywhere in the file, functions included
    for name in ("train.py", "demo.py"):
        imports = all_imports(ROOT / PACKAGE / name)
        bad = sorted(i for i in imports if i == "fwi_jax.infer" or i.startswith("fwi_jax.infer."))
        assert not bad, f"fwi_jax/{name} imports {bad}"
