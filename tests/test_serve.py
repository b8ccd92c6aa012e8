"""`python app.py`: the launcher (pages/_serve.py) that imports the heavy modules before Streamlit serves; the
browser tests start the app through it (tests/app_server.py)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from pages._serve import WARM_MODULES, parse

ROOT = Path(__file__).resolve().parents[1]


def test_warm_modules_exist_and_options_pass_through():
    for name in WARM_MODULES:  # a renamed module would break the launcher before it serves
        importlib.import_module(name)
    args = parse(["--port", "8600", "--address", "0.0.0.0", "--", "--server.headless", "true"])
    assert (args.port, args.address, args.streamlit_args) == (8600, "0.0.0.0", ["--server.headless", "true"])


def test_bad_port_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "app.py", "--port", "70000"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "--port" in done.stderr and len(done.stderr.strip().splitlines()) == 1
