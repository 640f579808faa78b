"""The import rules of docs/ARCHITECTURE.md, checked on the source (ast; nothing is imported).

Every import statement counts, at module level or inside a function, except where a rule says
"module level" (cycles, and what makes a test module need torch).
"""

from __future__ import annotations

import ast
import functools
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("bdpo_jax", "scorers_torch", "bdpo_demo", "configs", "tests", "bench")
TORCH_FAMILY = ("torch", "torchvision", "diffusers", "transformers", "open_clip", "accelerate")
# what bdpo_jax.schema may import: the standard library and numpy
SCHEMA_ALLOWED = frozenset(sys.stdlib_module_names) | {"numpy"}


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every project module (packages by their __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _imports(name: str, module_level_only: bool) -> list[tuple[str, int]]:
    """(imported dotted name, line) of every import in module `name`; `from p import m` of a
    project submodule names `p.m`. With module_level_only, imports inside functions and
    `if TYPE_CHECKING:` blocks are left out."""
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                nested = True
            if isinstance(child, ast.Import) and not (module_level_only and in_function):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not (module_level_only and in_function):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in modules() else base, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(rule) -> list[str]:
    """'module:line imports X' for every import (any level) that `rule(module, imported)`
    forbids."""
    out = []
    for name in modules():
        for imported, line in _imports(name, module_level_only=False):
            if rule(name, imported):
                out.append(f"{modules()[name].relative_to(ROOT)}:{line} imports {imported}")
    return out


def test_scorers_torch_imports_only_the_schema_of_bdpo_jax():
    def rule(module, imported):
        return (
            _top(module) == "scorers_torch"
            and _top(imported) == "bdpo_jax"
            and imported != "bdpo_jax.schema"
        )

    violations = _violations(rule)
    assert not violations, "\n".join(violations)


def test_no_library_imports_the_demo_or_the_configs():
    def rule(module, imported):
        return _top(module) in ("bdpo_jax", "scorers_torch") and _top(imported) in (
            "bdpo_demo",
            "configs",
            "tests",
            "bench",
        )

    violations = _violations(rule)
    assert not violations, "\n".join(violations)


def test_bdpo_jax_imports_neither_torch_nor_scorers_torch():
    def rule(module, imported):
        return _top(module) == "bdpo_jax" and _top(imported) in ("scorers_torch", *TORCH_FAMILY)

    violations = _violations(rule)
    assert not violations, "\n".join(violations)


def test_schema_is_framework_free():
    def rule(module, imported):
        return module == "bdpo_jax.schema" and _top(imported) not in SCHEMA_ALLOWED

    violations = _violations(rule)
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("subpackage", ["bdpo_jax.models", "bdpo_jax.data"])
def test_subpackages_import_only_themselves_and_the_schema(subpackage):
    def inside(name):
        return name == subpackage or name.startswith(subpackage + ".")

    def rule(module, imported):
        return (
            inside(module)
            and _top(imported) == "bdpo_jax"
            and not inside(imported)
            and imported != "bdpo_jax.schema"
        )

    violations = _violations(rule)
    assert not violations, "\n".join(violations)


def _module_graph(package: str) -> dict[str, set[str]]:
    graph = {}
    for name in modules():
        if _top(name) != package:
            continue
        graph[name] = {
            imported
            for imported, _ in _imports(name, module_level_only=True)
            if imported in modules() and _top(imported) == package and imported != name
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


@pytest.mark.parametrize("package", ["bdpo_jax", "scorers_torch", "bdpo_demo"])
def test_no_module_level_import_cycles(package):
    cycles = _cycles(_module_graph(package))
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_no_two_modules_import_each_other():
    """Also through imports inside functions: a lazy import does not make a cycle right."""
    edges = set()
    for name in modules():
        if _top(name) in ("tests", "bench"):
            continue
        for imported, _ in _imports(name, module_level_only=False):
            if imported in modules() and imported != name:
                edges.add((name, imported))
    mutual = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    # a package's __init__ re-exporting a submodule that imports a sibling through the
    # package is fine: only module <-> module pairs count
    mutual = [pair for pair in mutual if not any(_is_package(m) for m in pair)]
    assert not mutual, "\n".join(" <-> ".join(pair) for pair in mutual)


@functools.cache
def _needs_torch(name: str) -> bool:
    """Module `name` imports the torch family at module level, directly or through the
    project's own modules."""
    for imported, _ in _imports(name, module_level_only=True):
        if _top(imported) in TORCH_FAMILY:
            return True
        if imported in modules() and imported != name and _needs_torch(imported):
            return True
    return False


def _has_torch_mark(decorators: list[ast.expr]) -> bool:
    return any("mark.torch" in ast.unparse(d) for d in decorators)


def _skips_without_torch(nodes: list[ast.AST]) -> bool:
    """A `pytest.importorskip` of the torch family among `nodes` (not inside functions)."""
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for call in ast.walk(node):
            if (
                isinstance(call, ast.Call)
                and getattr(call.func, "attr", getattr(call.func, "id", "")) == "importorskip"
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and _top(str(call.args[0].value)) in TORCH_FAMILY
            ):
                return True
    return False


def test_test_modules_that_need_torch_carry_the_torch_marker():
    """`pytestmark = pytest.mark.torch` where a test module needs torch at import; a test
    importing it inside its body carries @pytest.mark.torch. Then `-m 'not torch'` runs the
    JAX side without torch installed."""
    missing = []
    for name, path in modules().items():
        if not name.startswith("tests.test_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_mark = any(
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
            and "mark.torch" in ast.unparse(node.value)
            for node in tree.body
        )
        if module_mark:
            continue
        if _needs_torch(name) or _skips_without_torch(tree.body):
            missing.append(f"{path.relative_to(ROOT)}: module imports torch")
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
                continue
            lazy = set()
            for imp in ast.walk(node):
                if isinstance(imp, ast.Import):
                    lazy.update(alias.name for alias in imp.names)
                elif isinstance(imp, ast.ImportFrom):
                    for alias in imp.names:
                        sub = f"{imp.module}.{alias.name}"
                        lazy.add(sub if sub in modules() else imp.module or "")
            heavy = sorted(
                m for m in lazy if _top(m) in TORCH_FAMILY or (m in modules() and _needs_torch(m))
            )
            if (heavy or _skips_without_torch(node.body)) and not _has_torch_mark(
                node.decorator_list
            ):
                missing.append(f"{path.relative_to(ROOT)}::{node.name} imports {heavy}")
    assert not missing, "\n".join(missing)
