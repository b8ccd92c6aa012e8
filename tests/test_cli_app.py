"""`dqlab app`: finds the checkout's app.py, refuses a bad port in one line; it serves with the server's thread
policy (the browser tests start the app through it, tests/app_server.py)."""
from __future__ import annotations

from analysis.cli.app import WARM_MODULES, app_script
from tests.conftest import run_cli


def test_app_script_is_the_checkouts_and_warm_modules_import():
    import importlib

    script = app_script()
    assert script.name == "app.py" and (script.parent / "pages" / "home.py").is_file()
    for name in WARM_MODULES:  # a renamed module would break the launcher before it serves
        importlib.import_module(name)


def test_bad_port_is_one_line_and_exit_2(capsys):
    code, out, err = run_cli(capsys, "app", "--port", "70000")
    assert code == 2 and "--port" in err and len(err.strip().splitlines()) == 1 and not out
