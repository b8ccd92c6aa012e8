"""Start `streamlit run app.py` on a free port and headless Chromium: shared by the browser test and
bench/app_timing.py (not a test module)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: str | os.PathLike, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """(process, url) of the app serving with its run store in `data_dir`; raises RuntimeError with the
    app's output if it does not answer its health check in time."""
    port = free_port()
    env = dict(os.environ, DQLAB_HOME=str(data_dir))
    # the README's launcher (pages/_serve.py: imports warm before it serves)
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--address", "127.0.0.1", "--",
         "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"streamlit did not start: {proc.stdout.read()[-2000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def launch_chromium(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


def no_exception(pg) -> None:
    """The page shows no Streamlit exception box (its text is the failure message when it does)."""
    box = pg.locator("[data-testid='stException']")
    assert box.count() == 0, box.first.inner_text()


def open_page(pg, link: str, heading: str) -> None:
    pg.locator("[data-testid='stSidebarNav'] a", has_text=link).first.click()
    pg.get_by_role("heading", name=heading).first.wait_for()


def set_number(pg, label: str, value: int) -> None:
    box = pg.get_by_role("spinbutton", name=label, exact=True).first
    box.fill(str(value))
    box.press("Tab")


def slider_to_min(pg, label: str) -> None:
    thumb = pg.locator("[data-testid='stSlider']", has_text=label).first.get_by_role("slider")
    thumb.focus()
    thumb.press("Home")
