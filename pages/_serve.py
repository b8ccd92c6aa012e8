"""`python app.py`: serve the app with torch, diffusers and the lab imported before the server answers.

`streamlit run app.py` imports them when the first browser opens a page: about 4.5 s of a 2-core machine's
first grid (torch 1.2 s; diffusers' model packages, which import every model class and transformers with them,
3 s). Here they are imported first, in the server's own process, and only then does Streamlit start, so the
address it prints answers with warm modules. Streamlit's own options pass through after `--`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

# What the Home page needs for its first grid (model classes, schedulers, sampling, the grid image) and the
# charts of the other pages (plotly); modules the pages import later load on first use as before.
WARM_MODULES = ("torch", "diffusers.models.transformers", "diffusers.models.unets", "diffusers.schedulers",
                "analysis.models.loading", "analysis.models.sampling", "analysis.evaluation.images",
                "plotly.graph_objects", "analysis.plots")


def warm_imports() -> float:
    """Import WARM_MODULES; seconds taken."""
    t0 = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - t0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py",
                                description="Serve the lab's app with its imports warm. Options after `--` go to "
                                            "`streamlit run`, e.g. python app.py -- --server.headless true")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: %(default)s)")
    p.add_argument("--address", default="localhost",
                   help="address to serve on; 0.0.0.0 serves a classroom's network (default: %(default)s)")
    p.add_argument("streamlit_args", nargs="*", help="further `streamlit run` options, after --")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.exit(2, f"python app.py: error: --port must be between 1 and 65535, got {args.port}\n")
    return args


def main(script: str, argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    seconds = warm_imports()
    print(f"dqlab: imports warm in {seconds:.1f} s; serving on http://{args.address}:{args.port}", file=sys.stderr,
          flush=True)
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", "run", script, "--server.port", str(args.port), "--server.address", args.address,
                *args.streamlit_args]
    return stcli.main()  # serves until stopped (Streamlit exits the process itself)
