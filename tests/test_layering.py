"""The layers stay apart: `quant` imports nothing from `analysis`, nothing below the UI imports Streamlit, and
the library's modules import each other without cycles. Checked statically, by reading every import."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in nodes:
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_quant_imports_nothing_from_analysis():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p, top_level_only=False)
                                                  if m == "analysis" or m.startswith("analysis."))
                 for p in _library_files("quant")}
    assert not {k: v for k, v in offenders.items() if v}


def test_library_imports_no_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in _library_files("quant", "analysis")
                 if any(m == "streamlit" or m.startswith("streamlit.") for m in _imports(p, top_level_only=False))]
    assert not offenders


def test_library_modules_have_no_import_cycles():
    files = _library_files("quant", "analysis")
    names = {_module_name(p): p for p in files}
    # Any import, also inside a function: a late import hides a cycle, it does not remove it. The one
    # exception is analysis.models.loading -> analysis.models.saved, the dispatch to the quantized-folder loader.
    graph = {name: {m for m in _imports(path, top_level_only=False) if m in names and m != name}
             for name, path in names.items()}
    graph["analysis.models.loading"].discard("analysis.models.saved")
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
