"""The layers stay apart: `quant` imports nothing from `analysis`, nothing below the UI imports Streamlit, and the
modules import each other without cycles and never up the layers of docs/ARCHITECTURE.md. Checked statically,
by reading every import, also those inside functions (scripts/import_graph.py prints the same graph)."""
from pathlib import Path

from scripts.import_graph import ROOT, cycles, graph, imports, layer_of


def _library_files(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_quant_imports_nothing_from_analysis():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports(p) if m == "analysis" or m.startswith("analysis."))
                 for p in _library_files("quant")}
    assert not {k: v for k, v in offenders.items() if v}


def test_library_imports_no_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in _library_files("quant", "analysis")
                 if any(m == "streamlit" or m.startswith("streamlit.") for m in imports(p))]
    assert not offenders


def test_modules_have_no_import_cycles_and_no_upward_imports():
    g = graph()
    assert not cycles(g), cycles(g)
    upward = [(a, b) for a, bs in g.items() for b in bs if layer_of(b) > layer_of(a)]
    assert not upward, upward
    assert {"quant.families", "analysis.models.bundle", "analysis.evaluation.evaluate", "pages.sweep"} <= set(g)
