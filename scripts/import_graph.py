"""Print the library's import graph: modules, edges, cycles, and imports that go up the layers.

    python scripts/import_graph.py            # counts, then every cycle and upward import (none expected)
    python scripts/import_graph.py --edges    # also every edge, "a -> b"

Every import counts, also one inside a function (a late import hides a cycle, it does not remove it). The layers,
lowest first, are those of docs/ARCHITECTURE.md; a module may import its own layer and the layers below it.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quant", "analysis", "pages")

# (layer, module name prefixes), lowest first; the longest matching prefix decides a module's layer.
LAYERS = [
    (0, ("quant.quantizers", "quant.formats", "quant.measures", "quant.options", "quant.modules", "quant.families",
         "quant.guards", "quant.rotation", "quant.branches", "quant.lowrank")),
    (1, ("quant.methods", "quant.config", "quant.denoiser", "quant.forward", "quant.reparam", "quant.observers",
         "quant.wrap")),
    (2, ("quant.recon", "quant.graph", "quant.io", "quant.int8", "quant.fp8", "quant.gptq")),
    (3, ("quant.api", "quant")),
    (4, ("analysis.models", "analysis.quiet", "analysis")),
    (5, ("analysis.salience",)),
    (6, ("analysis.quantization",)),
    (7, ("analysis.evaluation",)),
    (8, ("analysis.plots", "analysis.cli", "analysis.app_state", "analysis.__main__")),
    (9, ("pages", "app")),
]


# Method files are plug-ins the registry (quant.methods) finds at run time, never imported by a lower module: they
# may use the engine's pieces up to quant.recon (GPTQ runs the reconstruction's unit loop).
PLUGIN_PACKAGES = {"quant.methods": 2}


def layer_of(module: str) -> int:
    for package, level in PLUGIN_PACKAGES.items():
        if module.startswith(package + "."):
            return level
    best, level = -1, 0
    for lvl, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), lvl
    return level


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))] + [ROOT / "app.py"]
    names = {module_name(p): p for p in files if p.exists()}
    return {name: {m for m in imports(path) if m in names and m != name} for name, path in names.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(g):
        if name not in state:
            visit(name, [name])
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    g = graph()
    edges = sorted((a, b) for a, bs in g.items() for b in bs)
    loops = cycles(g)
    upward = [(a, b) for a, b in edges if layer_of(b) > layer_of(a)]
    print(f"modules {len(g)}, edges {len(edges)}, cycles {len(loops)}, upward imports {len(upward)}")
    for loop in loops:
        print("cycle: " + " -> ".join(loop))
    for a, b in upward:
        print(f"upward: {a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})")
    if args.edges:
        for a, b in edges:
            print(f"{a} -> {b}")
    return 1 if loops or upward else 0


if __name__ == "__main__":
    sys.exit(main())
