"""Sampling sharded over torchrun processes gives the images and the FID of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.evaluation.distributed import shard_batches

ROOT = Path(__file__).resolve().parents[1]
EVAL_ARGS = ["eval", "--num-samples", "20", "--steps", "3", "--batch-size", "8", "--no-store", "--bootstrap", "20",
             "--json"]


def test_shards_are_whole_batches_that_cover_every_image_once():
    n, batch, size = 29, 8, 3
    shards = [shard_batches(n, batch, r, size) for r in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert shards[0] == list(range(0, 8)) + list(range(24, 29)) and shards[1] == list(range(8, 16))
    assert shard_batches(n, batch, 0, 1) == list(range(n))


def _failure(proc) -> str:
    """What a failed torchrun said: each rank's own error lines first (the launcher's traceback buries them)."""
    lines = [ln for ln in proc.stderr.splitlines() if "File \"" not in ln and set(ln.strip()) != {"^"}]
    return "\n".join(lines)[:3000]


def _torchrun(args, tmp_path, nproc=2):
    env = dict(os.environ, DQLAB_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_torchrun_eval_matches_one_process(tmp_path, bundled, one_torch_thread, capsys):
    """Two gloo processes: rank 0 prints the same figures as one process; the other rank prints nothing."""
    from tests.conftest import run_cli

    os.environ["DQLAB_HOME"] = str(tmp_path / "single")
    try:
        rc, out, err = run_cli(capsys, *EVAL_ARGS)
    finally:
        del os.environ["DQLAB_HOME"]
    assert rc == 0, err
    single = json.loads(out)
    proc = _torchrun(["-m", "analysis.cli", *EVAL_ARGS], tmp_path)
    assert proc.returncode == 0, _failure(proc)
    sharded = json.loads(proc.stdout)  # exactly one JSON object: rank 1 printed nothing
    assert single["processes"] == 1 and sharded["processes"] == 2
    assert sharded["num_samples"] == single["num_samples"] == 20
    assert sharded["label_agreement"] == single["label_agreement"]
    # the images are the same; the FID is computed from them, with float sums that may differ in the last bits
    assert sharded["fid"] == pytest.approx(single["fid"], rel=1e-6)
    assert sharded["fid_interval"] == pytest.approx(single["fid_interval"], rel=1e-6)


@pytest.mark.slow
def test_sharded_images_equal_single_process_images(tmp_path, bundled, one_torch_thread):
    script = tmp_path / "shard.py"
    script.write_text(
        "import sys, torch\n"
        "from analysis.evaluation.distributed import init_from_env, sample_sharded\n"
        "from analysis.models.loading import load\n"
        "from analysis.models.sampling import sample\n"
        "init_from_env()\n"
        "b = load('bundled:dit-mnist', device='cpu')\n"
        "run = lambda l, s, bs: (sample(b, l, s, steps=2, guidance=1.5, batch_size=bs).images, 0.0)\n"
        "images, _ = sample_sharded(run, [i % 10 for i in range(11)], list(range(11)), 4)\n"
        "if images is not None:\n"
        "    torch.save(images, sys.argv[1])\n")
    proc = _torchrun([str(script), str(tmp_path / "out.pt")], tmp_path, nproc=3)
    assert proc.returncode == 0, _failure(proc)
    from analysis.models.sampling import sample

    merged = torch.load(tmp_path / "out.pt", weights_only=True)
    single = sample(bundled, [i % 10 for i in range(11)], list(range(11)), steps=2, guidance=1.5, batch_size=4).images
    assert merged.shape == single.shape
    # shards travel as uint8: the merged set is the single-process set on the uint8 grid, image for image
    assert torch.equal(merged, (single.clamp(0, 1) * 255).round() / 255.0)
