"""The folders are the architecture: imports flow one way, and no two modules import each other.

    cli -> demo -> training -> run -> prm -> stages -> engines -> core (schema, store, config, ...)

Every import counts, at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a module may import its own layer and the layers after it (prm scores inside a run; the
# stages and engines are what prm and run are built from)
LAYERS = ["cli", "demo", "training", "run", "prm", "stages", "engines", "core"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "factory.cli":
        return "cli"
    if module == "prm.cli":  # the PRM's label / train / eval driver: a training step (the demo build uses it)
        return "training"
    if parts[0] == "prm":
        return "prm"
    if len(parts) > 1 and parts[1] in ("demo", "training", "run", "stages", "engines"):
        return parts[1]
    return "core"


def graph() -> dict[str, set[str]]:
    files = [p for d in ("factory", "prm") for p in (ROOT / d).rglob("*.py")]
    known = {module_name(p) for p in files}
    edges = {}
    for p in files:
        me, deps = module_name(p), set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # "from factory import store" names a module
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        edges[me] = {d for d in deps if d in known and d != me and not me.startswith(d + ".")}
    return edges


def test_no_import_cycles():
    edges = graph()
    state, cycles = {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_imports_flow_down_the_layers():
    bad = [(m, d) for m, deps in graph().items() for d in deps
           if LAYERS.index(layer(d)) < LAYERS.index(layer(m))]
    assert not bad, bad
