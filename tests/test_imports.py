"""Every module imports, and the import graph has the architecture's shape (docs/design.md, "Import direction").

launcher -> {study, serving} -> run_config (the composition root) -> engine -> {models, losses, data_pipeline,
evaluation} -> kernels, with the leaves (config, errors, extras, registry, seeding, runtime) importable from
everywhere and importing none of the layers.
Imports are read from the source with `ast`, including the ones inside functions, so a lazy import cannot
hide an upward dependency or a cycle; only `if TYPE_CHECKING:` blocks are skipped (never executed).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unidml"

# Rank of each top-level part: a module may import its own part, any lower rank, and the leaves (parts of
# the same rank, e.g. losses and evaluation, do not import each other).
LAYERS = {"launcher": 5, "study": 4, "serving": 4, "run_config": 3, "engine": 2, "models": 1, "losses": 1,
          "data_pipeline": 1, "evaluation": 1, "kernels": 0}
LEAVES = {"config", "errors", "extras", "registry", "seeding", "runtime"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = module_names()


def source_path(module: str) -> Path:
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_modules(module: str) -> set[str]:
    """The unidml modules `module` imports anywhere in its source (submodules resolved)."""
    tree = ast.parse(source_path(module).read_text())
    package = module if source_path(module).name == "__init__.py" else module.rpartition(".")[0]
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


GRAPH = {module: imported_modules(module) for module in MODULES}


def part(module: str) -> str:
    """The top-level part a module belongs to (`python -m unidml` is the command line's)."""
    name = module.split(".")[1] if "." in module else module
    return "launcher" if name == "__main__" else name


def allowed(source: str, target: str) -> bool:
    a, b = part(source), part(target)
    if a == b or b in LEAVES:
        return True
    if a in LEAVES or b == "unidml":
        return False
    return LAYERS[b] < LAYERS[a]


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    if module != "unidml.__main__":  # running it starts the CLI
        importlib.import_module(module)


def test_every_part_has_a_place():
    assert {part(m) for m in MODULES} - {"unidml"} <= set(LAYERS) | LEAVES


def test_imports_point_down():
    upward = sorted(f"{source} -> {target}" for source, targets in GRAPH.items() for target in targets
                    if not allowed(source, target))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_kernels_and_evaluation_import_no_higher_layer():
    forbidden = {"engine", "losses", "launcher", "study"}
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if part(m) in ("kernels", "evaluation")
                 for t in ts if part(t) in forbidden)
    assert not bad, "\n".join(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (the import cycles)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle():
    cycles = strongly_connected(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_should():
    """The rules themselves: an upward import and a cycle are both reported."""
    assert not allowed("unidml.kernels.pairwise.rows", "unidml.losses.base")
    assert not allowed("unidml.evaluation.knn", "unidml.engine.trainer")
    assert not allowed("unidml.config", "unidml.engine.trainer")
    assert not allowed("unidml.losses.base", "unidml.evaluation.knn")  # siblings stay independent
    assert allowed("unidml.launcher.cli", "unidml.study.compare")
    assert not allowed("unidml.serving.catalogue", "unidml.launcher.commands.embed")
    assert not allowed("unidml.study.compare", "unidml.serving.catalogue")
    assert allowed("unidml.losses.base", "unidml.runtime.device")
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
