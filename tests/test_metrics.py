"""FID through torch-fidelity with the bundled digit extractor, Inception weight handling, per-timestep error."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from analysis.evaluation import metrics as M
from quant.measures import relative_rms


@pytest.fixture(scope="module")
def digits():
    """Two disjoint random sets of 400 real digits (the bundled set is sorted by class, so shuffle)."""
    from analysis.models.digits import load_digits

    x, _ = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:400]], x[perm[400:800]]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift(digits):
    a, b = digits
    assert M.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    same_dist = M.fid(a, b)
    # Brightness offsets move the sets apart step by step; FID must follow, and exceed the real-vs-real value.
    shifted = [M.fid((b + s).clamp(0, 1), a) for s in (0.1, 0.25, 0.5)]
    assert same_dist < shifted[0] < shifted[1] < shifted[2], (same_dist, shifted)
    # A spatial shift by two pixels is also a visible change the digit features see.
    assert M.fid(torch.roll(b, 2, dims=-1), a) > 2 * same_dist


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # some ReLU features are always 0: singular S
def test_registered_extractor_fid_equals_frechet_distance_by_hand(digits):
    """torch-fidelity's FID with "dqlab-digits" = ||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) computed here
    from the classifier's own 128-d features (a path that does not go through torch-fidelity)."""
    from analysis.evaluation.classifier import load_classifier, prepare

    a, b = digits
    b = (b * 0.8 + 0.1)  # make the two sets clearly different
    net = load_classifier()
    with torch.no_grad():
        fa = net.features(prepare(M.to_uint8_rgb(a))).double().numpy()
        fb = net.features(prepare(M.to_uint8_rgb(b))).double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    by_hand = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    got = M.compute_metrics(b, a, extractor=M.DIGITS_EXTRACTOR)
    assert got["fid"] == pytest.approx(by_hand, rel=1e-3)
    assert got["num_samples"] == len(b) and got["reference_size"] == len(a)
    assert got["feature_extractor"] == "dqlab-digits"
    assert got["warning"] and "2048" in got["warning"]  # 400 samples is below the reliable count
    # extract_features goes through the registered extractor and agrees with the direct path
    assert np.allclose(M.extract_features(b).numpy(), fb, atol=1e-4)


def test_registration_is_idempotent_and_uses_a_private_classifier_copy():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    from analysis.evaluation.classifier import load_classifier

    assert M.register_digit_extractor() == M.register_digit_extractor() == "dqlab-digits"
    cls = FEATURE_EXTRACTORS_REGISTRY["dqlab-digits"]
    fe = create_feature_extractor("dqlab-digits", ["128", "logits"], cuda=False, verbose=False)
    assert isinstance(fe, cls)
    assert fe.net is not load_classifier()
    out = fe(torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    assert out[0].shape == (3, 128) and out[1].shape == (3, 10)
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(3, 3, 16, 16))


def test_kid_isc_prc_and_kid_subset_check(digits):
    a, b = digits
    got = M.compute_metrics(a[:80], b[:100], fid=True, isc=True, kid=True, prc=True, kid_subset_size=50,
                            kid_subsets=5)
    for key in ("fid", "isc_mean", "kid_mean", "precision", "recall"):
        assert key in got and np.isfinite(got[key])
    assert 1.0 <= got["isc_mean"] <= 10.0  # 10 digit classes bound the score
    assert got["kid_subset_size"] == 50
    with pytest.raises(M.MetricsError, match="KID subset size 200"):
        M.compute_metrics(a[:80], b[:100], fid=False, kid=True, kid_subset_size=200)


def test_reference_features_are_cached(tmp_path, digits):
    a, _ = digits
    ref = M.Reference("some digits", M.to_uint8_rgb(digits[1]), cache_name="test-ref")
    first = M.fid(a, ref, cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    # the lab's own feature cache (read back with weights_only=True); torch-fidelity's pickle cache is never used
    assert any("test-ref" in name and "fid-features" in name for name in cached), cached
    assert M.fid(a, ref, cache_dir=tmp_path) == pytest.approx(first, rel=1e-9)


def test_bundled_reference_is_the_5000_digits():
    ref = M.bundled_reference()
    assert ref.images.shape == (5000, 3, 16, 16) and ref.images.dtype == torch.uint8
    assert ref.cache_name == M.bundled_reference().cache_name


def test_folder_reference_errors_and_loading(tmp_path):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.MetricsError, match="holds no images"):
        M.folder_reference(empty)
    with pytest.raises(M.MetricsError, match="does not exist"):
        M.folder_reference(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(M.MetricsError, match="cannot read reference image"):
        M.folder_reference(bad)
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(good / f"{i}.png")
    ref = M.folder_reference(good, size=(16, 16))
    assert ref.images.shape == (5, 3, 16, 16) and len(ref) == 5
    (good / "5.png").write_bytes((good / "0.png").read_bytes())
    assert M.folder_reference(good, size=(16, 16)).cache_name != ref.cache_name  # new file, new cache key


def test_inception_without_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)
    with pytest.raises(M.MetricsError, match="DQLAB_INCEPTION_WEIGHTS"):
        M.resolve_inception_weights()
    with pytest.raises(M.MetricsError, match="does not exist"):
        M.resolve_inception_weights(tmp_path / "nope.pth")
    with pytest.raises(M.MetricsError, match="needs its weights"):
        M.compute_metrics(torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), extractor=M.INCEPTION_EXTRACTOR)


class _NotATensor:
    pass


def test_inception_weights_must_be_a_plain_state_dict(tmp_path, monkeypatch):
    """Weights are unpickled by torch-fidelity without weights_only; a file holding objects is refused first."""
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": _NotATensor()}, evil)
    with pytest.raises(M.MetricsError, match="not a plain PyTorch state dict"):
        M.resolve_inception_weights(evil)
    wrong = tmp_path / "wrong.pth"
    torch.save({"w": torch.zeros(2)}, wrong)
    monkeypatch.setenv(M.INCEPTION_ENV, str(wrong))
    with pytest.raises(M.MetricsError, match="fc.weight"):
        M.resolve_inception_weights()
    ok = tmp_path / "ok.pth"
    torch.save({"fc.weight": torch.zeros(2)}, ok)
    monkeypatch.setenv(M.INCEPTION_ENV, str(ok))
    assert M.resolve_inception_weights() == ok


def test_extractor_names():
    assert M.resolve_extractor("auto", bundled=True) == M.DIGITS_EXTRACTOR
    assert M.resolve_extractor(None, bundled=False) == M.INCEPTION_EXTRACTOR
    assert M.resolve_extractor("digits", bundled=False) == M.DIGITS_EXTRACTOR
    with pytest.raises(M.MetricsError, match="unknown feature extractor"):
        M.resolve_extractor("clip", bundled=True)


def test_the_one_per_timestep_error_is_zero_for_fp_and_positive_for_a_changed_model(tiny_bundle):
    from analysis.models.sampling import sample
    from analysis.quantization.pipeline import output_errors

    res = sample(tiny_bundle, [1, 2], [0, 1], steps=3, guidance=2.0, record="all", decode=False)
    ref = M.transformer_outputs(tiny_bundle.denoiser, res.calibration, tiny_bundle.latent_shape[0])
    assert ref.shape == (12, 4, 8, 8)  # 3 steps x 2 images x [cond; uncond]; eps half of the learned-sigma output
    channels = tiny_bundle.latent_shape[0]
    same = output_errors(None, tiny_bundle.denoiser, res.calibration, channels, per_layer=False, reference=ref)
    assert list(same.per_timestep) == res.calibration.timesteps  # sampling order, noisiest first
    assert same.total < 1e-12 and all(e < 1e-12 for e in same.per_timestep.values())
    other = copy.deepcopy(tiny_bundle.denoiser)
    with torch.no_grad():
        other.proj_out_2.weight.mul_(1.1)
    changed = output_errors(tiny_bundle.denoiser, other, res.calibration, channels, per_layer=False)
    assert all(e > 1e-4 for e in changed.per_timestep.values())
    # each timestep's value is the relative RMS over that step's rows
    out = M.transformer_outputs(other, res.calibration, channels)
    for t, e in changed.per_timestep.items():
        rows = res.calibration.t == t
        assert e == pytest.approx(relative_rms(out[rows], ref[rows]), rel=1e-9)
    assert relative_rms(torch.ones(3), torch.ones(3) * 2) == pytest.approx(0.5)


def test_torch_fidelity_reads_a_verified_copy_of_the_inception_weights(tmp_path):
    """torch-fidelity unpickles its weights file unguarded, so it is given a copy written from checked tensors."""
    ok = tmp_path / "ok.pth"
    torch.save({"fc.weight": torch.arange(3.0)}, ok)
    kwargs = M._fidelity_kwargs(M.INCEPTION_EXTRACTOR, False, ok, 4)
    handed = Path(kwargs["feature_extractor_weights_path"])
    assert handed != ok and handed.parent != tmp_path
    assert torch.equal(torch.load(handed, weights_only=True)["fc.weight"], torch.arange(3.0))


@pytest.mark.slow
def test_fid_interval_and_floor_from_features(digits):
    """The bootstrap interval holds the point estimate and narrows with N, and says how it was made; the floor
    is N real images against the same reference half a model's FID vs real uses, and a shifted set scores
    clearly above it."""
    a, b = digits
    fa, fb = M.extract_features(a), M.extract_features(b)
    fb_shift = M.extract_features((b + 0.25).clamp(0, 1))
    # too few replicates for 2.5% tails: the normal interval, which needs only a standard deviation
    small = M.fid_interval(fa[:100], fb[:100], replicates=60)
    large = M.fid_interval(fa, fb, replicates=60)
    for r in (small, large):
        assert r["fid_interval"][0] <= r["fid"] <= r["fid_interval"][1]
        assert r["replicates"] == 60 and r["method"] == "normal"
    width = lambda r: r["fid_interval"][1] - r["fid_interval"][0]  # noqa: E731
    assert width(large) < width(small)
    assert large["fid"] == pytest.approx(M.fid(b, a), rel=1e-3)  # the same number torch-fidelity reports
    assert M.min_percentile_replicates(0.95) == 1000 and M.min_percentile_replicates(0.9) == 500
    pooled = torch.cat([fa, fb])  # 800 "real" images
    reference, pool = M.split_reference(pooled)
    assert len(reference) == 400 and len(pool) == 400
    assert not set(map(tuple, reference.tolist())) & set(map(tuple, pool.tolist()))
    floor = M.fid_floor(pooled, 300)
    assert floor["floor_sizes"] == [300, 400] and 0 < floor["fid_floor"] and "reference part" in floor["floor_definition"]
    assert M.fid_from_features(fb_shift, reference) > 3 * floor["fid_floor"]
    assert M.fid_floor(pooled, 700)["floor_sizes"] == [400, 400]  # more than the pool: all of it, once
    paired = M.fid_interval(fb_shift, fb, paired=True)  # the default: enough replicates for the percentiles
    assert paired["fid_interval"][0] <= paired["fid"] <= paired["fid_interval"][1]
    assert paired["replicates"] == M.BOOTSTRAP_REPLICATES and paired["method"] == "percentile"
    with pytest.raises(M.MetricsError, match="equal size"):
        M.fid_interval(fa[:10], fb[:12], paired=True)


def test_batched_frechet_distance_matches_torch_fidelity():
    """The bootstrap's batched statistics and distance give torch-fidelity's FID on the same rows."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    b = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 200, (200,), generator=gen)
    counts = torch.bincount(idx, minlength=200).double()[None]
    ones = torch.ones(1, 300, dtype=torch.float64)
    batched = M.frechet_distance(*M.weighted_statistics(a, counts), *M.weighted_statistics(b, ones))
    assert float(batched[0]) == pytest.approx(M.fid_from_features(a[idx], b), rel=1e-8)


def test_bootstrap_interval_coverage_on_a_simulation():
    """Nominal 95%: on simulated Gaussian features whose expected FID at this N is known, the interval holds
    it in about 95% of independent measurements (unpaired and paired; bench/interval_coverage.py runs more
    trials and cases)."""
    from bench.interval_coverage import coverage

    unpaired = coverage(trials=120, dims=3, n=150, m=300, shift=0.3)
    paired = coverage(trials=120, dims=3, n=150, paired=True, shift=0.3)
    for r in (unpaired, paired):
        assert r["method"] == "percentile" and r["replicates"] == 1000
        assert 0.88 <= r["coverage"] <= 1.0, r


def test_floor_is_what_a_perfect_model_scores():
    """Simulation: a 'model' that samples the real distribution, scored against the reference half, scores on
    average what the floor says; the earlier floor (N against the other M - N real images) did not."""
    gen = torch.Generator().manual_seed(3)
    dims, total, n = 4, 600, 200
    perfect, floors, earlier = [], [], []
    for trial in range(200):
        real = torch.randn(total, dims, generator=gen, dtype=torch.float64)
        model = torch.randn(n, dims, generator=gen, dtype=torch.float64)
        perfect.append(M.fid_from_features(model, M.split_reference(real)[0]))
        floors.append(M.fid_floor(real, n, seed=trial)["fid_floor"])
        perm = torch.randperm(total, generator=gen)
        earlier.append(M.fid_from_features(real[perm[:n]], real[perm[n:]]))
    perfect, floors, earlier = map(np.mean, (perfect, floors, earlier))
    assert floors == pytest.approx(perfect, rel=0.1)
    assert abs(earlier - perfect) > abs(floors - perfect)


def test_reference_features_are_cached_on_disk(tmp_path, digits):
    a, _ = digits
    ref = M.Reference("test digits", a[:50], cache_name="test-ref-feats")
    M._REFERENCE_FEATURES.clear()
    first = M.reference_features(ref, cache_dir=tmp_path)
    assert list(tmp_path.glob("test-ref-feats-*-fid-features.pt"))
    M._REFERENCE_FEATURES.clear()
    lazy = M.Reference("test digits", loader=lambda: pytest.fail("features should come from the cache"), size=50,
                       cache_name="test-ref-feats")
    assert torch.equal(M.reference_features(lazy, cache_dir=tmp_path), first)


def test_fid_interval_can_be_shrunk_or_skipped():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=gen), torch.randn(40, 8, generator=gen) + 0.5
    full, few = M.fid_interval(a, b, paired=True), M.fid_interval(a, b, paired=True, replicates=10)
    none = M.fid_interval(a, b, paired=True, replicates=0)
    assert full["replicates"] == M.BOOTSTRAP_REPLICATES and few["replicates"] == 10
    assert full["fid"] == few["fid"] == none["fid"] and none["fid_interval"] is None and none["replicates"] == 0
    lo, hi = few["fid_interval"]
    assert lo <= few["fid"] <= hi
