"""dqlab app: serve the Streamlit app from this checkout, with the heavy imports done before it serves.

`streamlit run app.py` imports torch, diffusers and the lab when the first browser opens a page: about 4.5 s
of a 2-core machine's first grid (torch 1.2 s; diffusers' model packages, which import every model class and
transformers with them, 3 s). This launcher imports them first, in the server's own process, and only then
starts Streamlit, so the address it prints answers with warm modules. Streamlit's options pass through after
`--`; the thread policy is the server's (analysis.threads: idle workers sleep).
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from analysis.cli import CLIError

# What the Home page needs for its first grid (model classes, schedulers, sampling, the grid image) and the
# charts of the other pages (plotly); modules the pages import later load on first use as before.
WARM_MODULES = ("torch", "diffusers.models.transformers", "diffusers.models.unets", "diffusers.schedulers",
                "analysis.models.loading", "analysis.models.sampling", "analysis.evaluation.images",
                "plotly.graph_objects", "analysis.plots")


def register(sub) -> None:
    p = sub.add_parser("app", help="serve the app (Streamlit) with its imports warm",
                       description="Serve the app from this checkout. Options after `--` go to `streamlit run`, "
                                   "e.g. dqlab app --port 8600 -- --server.headless true")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: %(default)s)")
    p.add_argument("--address", default="localhost",
                   help="address to serve on; 0.0.0.0 serves a classroom's network (default: %(default)s)")
    p.add_argument("streamlit_args", nargs="*", help="further `streamlit run` options, after --")
    p.set_defaults(func=run)


def app_script() -> Path:
    """app.py of the checkout this package runs from (a plain install holds the library, not the pages)."""
    script = Path(__file__).resolve().parents[2] / "app.py"
    if not (script.is_file() and (script.parent / "pages").is_dir()):
        raise CLIError(f"no app.py with its pages/ beside the installed package ({script.parent}); the app runs "
                       "from a checkout: clone the repository, `pip install -e .` there and run `dqlab app`")
    return script


def warm_imports() -> float:
    """Import WARM_MODULES; seconds taken."""
    t0 = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - t0


def run(args) -> dict:
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}")
    script = app_script()
    seconds = warm_imports()
    print(f"dqlab app: imports warm in {seconds:.1f} s; serving {script} on http://{args.address}:{args.port}",
          file=sys.stderr, flush=True)
    from streamlit.web import cli as stcli

    sys.argv = ["streamlit", "run", str(script), "--server.port", str(args.port), "--server.address", args.address,
                *args.streamlit_args]
    stcli.main()  # serves until stopped; exits the process (SystemExit) when Streamlit does
    return {}
