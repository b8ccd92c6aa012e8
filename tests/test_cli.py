import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import run_cli


def test_models_json(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == 0
    names = [m["name"] for m in json.loads(out)["models"]]
    assert "bundled:dit-mnist" in names and "facebook/DiT-XL-2-256" in names


def test_sample_grid_json(capsys, tmp_path):
    grid = tmp_path / "grid.png"
    code, out, _ = run_cli(capsys, "sample", "--classes", "0,1,2", "--seeds", "0-3", "--steps", "10",
                           "--device", "cpu", "--out", str(grid), "--json")
    assert code == 0
    res = json.loads(out)
    assert res["model"] == "bundled:dit-mnist" and res["images"] == 12 and res["seconds"] > 0
    assert 0 <= res["label_agreement"] <= 1
    img = Image.open(grid)
    assert img.width > img.height  # 3 rows (classes) x 4 columns (seeds)


def test_sample_out_dir_names_and_resolution(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "sample", "--classes", "4,7", "--seeds", "5", "--steps", "5",
                           "--device", "cpu", "--out-dir", str(tmp_path / "png"), "--json")
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == ["class4_seed5.png", "class7_seed5.png"]
    assert Image.open(tmp_path / "png" / "class4_seed5.png").size == (16, 16)


def test_sample_tiny_folder_has_no_label_agreement_and_writes_a_default_file(capsys, tiny_folder, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.png").write_bytes(b"someone else's file")  # a default name never overwrites
    code, out, _ = run_cli(capsys, "sample", "--model", str(tiny_folder), "--classes", "1", "--seeds", "0",
                           "--steps", "2", "--device", "cpu", "--json")
    res = json.loads(out)
    assert code == 0 and "label_agreement" not in res
    assert res["files"] == ["samples-1.png"] and Image.open(tmp_path / "samples-1.png").size[0] > 0
    assert (tmp_path / "samples.png").read_bytes() == b"someone else's file"
    code, out, _ = run_cli(capsys, "sample", "--model", str(tiny_folder), "--classes", "1", "--seeds", "0",
                           "--steps", "2", "--device", "cpu")
    assert code == 0 and out.strip().endswith("-> samples-2.png")


@pytest.mark.parametrize("argv, reason", [
    (["--classes", "a-b"], "cannot read 'a-b'"),
    (["--classes", "12"], "out of range"),
    (["--seeds", "5-2"], "empty"),
    (["--steps", "0"], "--steps"),
    (["--out", "grid.jpg"], ".png"),
    (["--model", "./no/such/folder"], "does not exist"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--guidance", "nan"], "not a finite number"),
    (["--guidance", "-1"], "outside [0, 100]"),
])
def test_sample_errors_are_one_line(capsys, argv, reason):
    code, out, err = run_cli(capsys, "sample", "--device", "cpu", "--steps", "2", *argv)
    assert code == 2 and out == ""
    assert reason in err and err.count("\n") == 1


@pytest.mark.slow
def test_console_script_reports_bad_argument():
    proc = subprocess.run([sys.executable, "-m", "analysis", "sample", "--classes", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read 'x'" in proc.stderr


# As on a fresh install without `accelerate`: diffusers then warns on every model load. The CLI's stderr must
# still be exactly the one line naming the bad argument, and nothing at all on success.
_WITHOUT_ACCELERATE = ("import sys, diffusers.utils.import_utils as iu; iu._accelerate_available = False; "
                       "from analysis.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_cli_stderr_is_one_line_in_a_fresh_process(tmp_path):
    env_run = lambda *argv: subprocess.run([sys.executable, "-c", _WITHOUT_ACCELERATE, *argv],  # noqa: E731
                                           capture_output=True, text=True, timeout=300)
    bad = env_run("sample", "--device", "cpu", "--steps", "2", "--classes", "12")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "class 12 is out of range" in bad.stderr, bad.stderr
    good = env_run("sample", "--device", "cpu", "--steps", "2", "--classes", "1", "--seeds", "0",
                   "--out", str(tmp_path / "g.png"), "--json")
    assert good.returncode == 0 and good.stderr == "", good.stderr
    json.loads(good.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in output"))
