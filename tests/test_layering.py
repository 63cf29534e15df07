"""The code's shape, as rules a change cannot break unnoticed: the shared
library (dyadlab/) imports no service, services do not import each other,
and no two modules import each other (directly or through others) at
import time. Read from the source with `ast`; nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("dyadlab/v1/", "dyadlab/torchserve_grpc/")


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("dyadlab", "services"):
        for p in (ROOT / top).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            parts = rel[:-3].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(path: Path, module: str, *, top_level_only: bool) -> set[str]:
    """Modules `path` imports (absolute names); with top_level_only, only the
    imports that run when the module is imported (not inside functions, not
    under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and top_level_only:
                continue
            if isinstance(node, ast.If) and top_level_only and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def test_the_library_imports_no_service():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("dyadlab"):
            bad = sorted(
                i
                for i in _imports(path, name, top_level_only=False)
                if i == "services" or i.startswith("services.")
            )
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "the shared library must not import services:\n" + "\n".join(offenders)


def test_services_do_not_import_each_other():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("services."):
            own = name.split(".")[1]
            others = sorted(
                {
                    i.split(".")[1]
                    for i in _imports(path, name, top_level_only=False)
                    if i.startswith("services.") and i.split(".")[1] != own
                }
            )
            if others:
                offenders.append(f"{path.relative_to(ROOT)} imports services {others}")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for i in _imports(path, name, top_level_only=False):
            # `from dyadlab import frames` names the module dyadlab.frames; keep known modules
            while i and i not in mods:
                i = i.rpartition(".")[0]
            if i and i != name and not name.startswith(i + "."):  # a package's own __init__ is not a cycle
                deps.add(i)
        graph[name] = deps
    cycles, state, stack = [], {}, []

    def dfs(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
