"""`dqlab salience`: the JSON summary (overhead measured in the same run), the saved file, and bad input."""
from __future__ import annotations

import json

from analysis.cli import main
from analysis.salience.collect import SalienceStats


def test_salience_cli_summary_and_file(capsys, tiny_folder, tmp_path):
    out = tmp_path / "stats.npz"
    code = main(["salience", "--model", str(tiny_folder), "--device", "cpu", "--steps", "3", "--samples", "2",
                 "--repeats", "2", "--threads", "1", "--out", str(out), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layers"] > 0 and res["timesteps"] == 3 and res["seconds"] > 0
    assert res["overhead_vs_sampling"] > 0 and res["cpu_overhead_vs_sampling"] > 0
    assert res["overhead_paired_median"] > 0
    assert len(res["collect_seconds_all"]) == len(res["plain_cpu_seconds_all"]) == 2
    assert res["seconds"] == min(res["collect_seconds_all"])
    hardest = [h["layer"] for h in res["hardest_layers"]]
    assert len(hardest) == 5
    # the embedding's second call repeats its first call's statistics: listed once at most
    assert len({h.split("@")[0] for h in hardest}) == 5
    back = SalienceStats.load(out)
    assert back.info["overhead_vs_sampling"] == res["overhead_vs_sampling"] and len(back.layers) == res["layers"]


def test_salience_cli_bad_input(capsys, tiny_folder, tmp_path):
    code = main(["salience", "--model", str(tiny_folder), "--out", str(tmp_path / "stats.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "--out must name a .npz file" in err and len(err.strip().splitlines()) == 1
    code = main(["salience", "--model", str(tiny_folder), "--device", "cpu", "--steps", "1", "--samples", "1",
                 "--layers", "(["])
    err = capsys.readouterr().err
    assert code == 2 and "regular expression" in err
