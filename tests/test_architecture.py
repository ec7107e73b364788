"""The package's shape, as docs/architecture.md draws it: imports point down the layers, never back, no cycles.

Every import counts, function-local ones included: a cycle hidden inside a
function is still a cycle. Also checked: rich and typer stay under cli/, and
no module grows past what one sitting can read.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orion_cli"

# Highest first; the top-level modules of orion_cli (config, registry, producing, ...) are the shared
# layer below them all. A module may import its own package and any lower layer, nothing else.
LAYERS = [
    ("face", {"cli", "__main__"}),
    ("orchestration", {"workflow"}),
    ("subsystems", {"quantize", "merge", "shard", "serve"}),
    ("foundations", {"codec", "reference", "onnx_export"}),
]
MAX_LINES = 400
FACE_ONLY = ("rich", "typer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """orion_cli modules `name` imports, anywhere in its body."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("orion_cli"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("orion_cli"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules() else target)
    return {m for m in found if m in modules() and m != name}


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    for index, (_, packages) in enumerate(LAYERS):
        if top in packages:
            return index
    return len(LAYERS)  # the shared layer: top-level modules of orion_cli


def subsystem_of(name: str) -> str | None:
    top = name.split(".")[1] if "." in name else ""
    return top if any(top in packages for _, packages in LAYERS) else None


def test_imports_point_down_the_layers():
    wrong = []
    for name in modules():
        for target in imports_of(name):
            same_package = subsystem_of(name) is not None and subsystem_of(name) == subsystem_of(target)
            same_flat_layer = layer_of(name) == layer_of(target) and layer_of(name) in (0, len(LAYERS))
            if not (same_package or same_flat_layer) and layer_of(target) <= layer_of(name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    # A package's __init__ importing its own modules re-exports them; that is not a cycle of logic.
    graph = {name: {t for t in imports_of(name) if not (modules()[name].name == "__init__.py"
                                                       and t.startswith(name + "."))}
             for name in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("library", FACE_ONLY)
def test_rich_and_typer_stay_in_the_face(library):
    users = []
    for name, path in modules().items():
        if name.startswith("orion_cli.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == library or n.startswith(library + ".") for n in names):
                users.append(name)
    assert not users, f"{library} imported outside cli/: {users}"


def test_modules_stay_readable_in_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_command_has_its_module_named_after_it():
    """A newcomer finds a command's code from its name: cli/<command>_cmd.py calls <command>'s package."""
    from generate_docs import command_paths

    for path in command_paths():
        name = {"models": "registry", "register": "registry", "run": "run", "demo": "demo"}.get(path[0], path[0])
        assert (PACKAGE / "cli" / f"{name}_cmd.py").is_file(), path
