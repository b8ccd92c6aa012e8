"""The hostile-input suite: every case in tests/hostile_cases.py (model folders, saved folders, configs, the run
store, outputs, CLI arguments, the app) must end cleanly, with a one-line error naming the file or argument
(exit 2), or with the expected result; nothing outside $DQLAB_HOME and the named outputs may change, no planted
pickle may run, no half-written file may stay. Then a bounded fuzz pass over the saved-folder and config loaders.
`python scripts/hostile_report.py` prints the same cases as a table by surface."""
from __future__ import annotations

import pytest
import torch

from tests.hostile_cases import ALL_CASES, Context, fuzz_configs, fuzz_saved, run_case


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    torch.set_num_threads(1)
    return Context(tmp_path_factory.mktemp("hostile"))


# Cases that run a whole evaluation (sampling, features, FID) take ~10 s each: slow, like the other end-to-end tests.
_EVALUATES = ("planted pickles", "eval --note")


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow) if any(w in c.name for w in _EVALUATES)
                                   else i for i, c in enumerate(ALL_CASES)],
                         ids=[f"{c.surface}: {c.name}".replace(" ", "_") for c in ALL_CASES])
def test_hostile_case_ends_cleanly(ctx, index):
    result = run_case(ctx, ALL_CASES[index], index)
    assert result.outcome == "clean", f"{result.outcome}: {result.why}\n{result.err}"


def test_fuzz_saved_folder_no_traceback_no_silent_load(ctx):
    got = fuzz_saved(ctx, count=80, seconds=15.0, seed=0)
    assert got["tried"] >= 30, got  # bounded by time on a slow machine, never by luck
    assert got["traceback"] == got["silent-wrong"] == got["unclear"] == 0, got["examples"]
    assert got["refused"] > 0.8 * got["tried"]


def test_fuzz_configs_no_traceback_no_silent_acceptance():
    got = fuzz_configs(count=1000, seconds=5.0, seed=0)
    assert got["tried"] >= 300, got
    assert got["traceback"] == got["silent-wrong"] == 0, got["examples"]
    assert got["refused"] > 0 and got["accepted"] > 0


def test_metrics_from_the_labs_features_equal_torch_fidelitys():
    """KID, precision/recall and IS computed from features the lab extracts (torch-fidelity's pickle cache never
    used) agree with torch-fidelity's own calculate_metrics on the same images."""
    import torch_fidelity

    from analysis.evaluation import metrics as M
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 1, 16, 16, generator=g)
    b = torch.rand(48, 1, 16, 16, generator=g) ** 2
    ours = M.compute_metrics(a, b, fid=True, isc=True, kid=True, prc=True, kid_subset_size=20, kid_subsets=10,
                             device="cpu")
    M.register_digit_extractor()
    theirs = torch_fidelity.calculate_metrics(
        input1=M.ImageSet(a), input2=M.ImageSet(b), feature_extractor=M.DIGITS_EXTRACTOR, cuda=False, fid=True,
        isc=True, kid=True, prc=True, kid_subset_size=20, kid_subsets=10, cache=False, verbose=False,
        save_cpu_ram=True)
    pairs = {"fid": "frechet_inception_distance", "isc_mean": "inception_score_mean",
             "kid_mean": "kernel_inception_distance_mean", "precision": "precision", "recall": "recall"}
    for key, name in pairs.items():
        assert ours[key] == pytest.approx(float(theirs[name]), rel=1e-4, abs=1e-6), key
