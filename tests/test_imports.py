"""The package's import graph has no cycle, function-local imports included, and every module imports alone."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import attnflow

PACKAGE = Path(attnflow.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every attnflow module ``path`` imports anywhere in its body (top level or inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != here}
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "attnflow.cli" in graph and "attnflow.cache" in graph["attnflow.extract"]  # the parser sees imports
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_module_imports_alone_in_any_order():
    """Each module imported first into a fresh set of attnflow modules (torch stays loaded, for speed);
    ``attnflow.__main__`` is the command itself, which runs when imported."""
    modules = sorted(set(import_graph()) - {"attnflow.__main__"})
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r} + {modules[::-1]!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'attnflow' or m.startswith('attnflow.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
