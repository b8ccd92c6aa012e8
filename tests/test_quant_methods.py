"""The methods' math against docs/ARCHITECTURE.md "The formulas" (WD, CSB, SSC, SmoothQuant), on hand-built inputs."""
import math

import pytest
import torch
from scipy.stats import spearmanr

from quant.measures import outlier_ratio, spearman
from quant.methods.dilatequant import dilation_vector
from quant.methods.ptq4dit import calibrated_salience, csb_vector, ssc_weights
from quant.methods.smoothquant import smoothing_vector


def test_weight_dilation_keeps_row_ranges_and_stretches_only_unsaturated_channels():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    w[:, 5] *= 8  # an input channel that holds the extremes of many rows
    s = dilation_vector(w)
    wd = w * s[None, :]
    assert torch.allclose(wd.amax(1), w.amax(1), rtol=1e-6) and torch.allclose(wd.amin(1), w.amin(1), rtol=1e-6)
    assert (s >= 1).all()
    saturated = ((w == w.amax(1, keepdim=True)) | (w == w.amin(1, keepdim=True))).any(0)
    assert saturated.any() and (s[saturated] == 1).all()
    assert (s[~saturated] > 1).all()  # every other channel gets stretched
    # each unsaturated channel is stretched until some row reaches its bound: the largest feasible s_k
    hits = ((wd - w.amax(1, keepdim=True)).abs() < 1e-5) | ((wd - w.amin(1, keepdim=True)).abs() < 1e-5)
    assert hits.any(0)[~saturated].all()


def test_weight_dilation_hand_case_and_zero_guard():
    w = torch.tensor([[4.0, 1.0, -2.0, 0.0],
                      [-1.0, 2.0, 0.5, 0.0]])
    # row 0 range [-2, 4] (channels 0, 2), row 1 range [-1, 2] (channels 0, 1): A = {0, 1, 2}
    # channel 3 is all zero: no constraint, left at 1
    assert torch.equal(dilation_vector(w), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    w = torch.tensor([[4.0, 1.0, -2.0, 0.5],
                      [-1.0, 2.0, 0.5, -0.25]])
    # channel 3: row 0: 4 / 0.5 = 8; row 1: -1 / -0.25 = 4 -> s = 4
    assert torch.allclose(dilation_vector(w), torch.tensor([1.0, 1.0, 1.0, 4.0]))


def test_one_spearman_matches_scipy_with_ties_everywhere_it_is_used():
    """bf16 statistics hold many equal values: ties share their average rank (scipy), in the method and on the
    Salience page alike, so the SSC figure and the page cannot disagree for a layer."""
    from analysis.salience.measures import spearman as page_spearman

    torch.manual_seed(0)
    x = torch.rand(6, 64).to(torch.bfloat16).float()  # bf16 rounding: ties in every row
    w = torch.rand(64).to(torch.bfloat16).float()
    assert all(len(torch.unique(r)) < 64 for r in x) and len(torch.unique(w)) < 64
    expected = torch.tensor([spearmanr(x[i].numpy(), w.numpy()).statistic for i in range(6)], dtype=torch.float64)
    assert torch.allclose(spearman(x, w), expected, atol=1e-12)
    assert torch.allclose(ssc_weights(x, w)[1].double(), expected, atol=1e-6)  # what SSC weighs timesteps by
    assert torch.allclose(torch.from_numpy(page_spearman(x.numpy(), w.numpy())), expected, atol=1e-12)
    # ranked along any axis of the page's [T, C] arrays
    assert torch.allclose(torch.from_numpy(page_spearman(x.T.numpy(), w[:, None].numpy(), axis=0)), expected,
                          atol=1e-12)


def test_outlier_ratio_is_max_over_numpy_median():
    v = torch.tensor([[1.0, 2.0, 3.0, 10.0], [2.0, 2.0, 2.0, 2.0]])
    assert torch.allclose(outlier_ratio(v), torch.tensor([10 / 2.5, 1.0], dtype=torch.float64))


def test_ssc_weights_sum_to_one_and_favour_low_rho_timesteps():
    w_sal = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x_sal = torch.stack([w_sal * 2,              # rho = +1: same channels salient as the weights
                         w_sal.flip(0),          # rho = -1: complementary
                         torch.tensor([2.0, 1.0, 4.0, 3.0])])  # rho = 0.6
    eta, rho = ssc_weights(x_sal, w_sal)
    assert torch.allclose(rho, torch.tensor([1.0, -1.0, 0.6]), atol=1e-6)
    assert torch.isclose(eta.sum(), torch.tensor(1.0))
    assert eta[1] > eta[2] > eta[0]
    assert torch.allclose(eta, torch.softmax(-rho, 0))


def test_csb_equals_sqrt_of_calibrated_over_weight_salience_hand_built():
    # two timesteps, two calibration rows each, 4 channels
    absmax = torch.tensor([[1.0, 4.0, 2.0, 8.0],
                           [3.0, 2.0, 2.0, 6.0],   # timestep 10: max over rows = [3, 4, 2, 8]
                           [9.0, 1.0, 1.0, 1.0],
                           [5.0, 1.0, 3.0, 2.0]])  # timestep 500: [9, 1, 3, 2]
    t = torch.tensor([10, 10, 500, 500])
    w_sal = torch.tensor([0.5, 1.0, 2.0, 4.0])
    # rho(t=10): ranks x [1,2,0,3] vs w [0,1,2,3] -> 0.4; rho(t=500): x ranks [3,0,2,1] -> -0.4
    x_tilde, extras = calibrated_salience(absmax, t, w_sal, ssc=True, rho_mode="per_timestep")
    assert torch.allclose(extras["rho"], torch.tensor([0.4, -0.4]), atol=1e-6)
    e = [math.exp(-0.4), math.exp(0.4)]
    eta = torch.tensor([e[0] / sum(e), e[1] / sum(e)])
    expected_tilde = eta[0] * torch.tensor([3.0, 4.0, 2.0, 8.0]) + eta[1] * torch.tensor([9.0, 1.0, 3.0, 2.0])
    assert torch.allclose(x_tilde, expected_tilde, atol=1e-6)
    b = csb_vector(x_tilde, w_sal)
    assert torch.allclose(b, torch.sqrt(expected_tilde / w_sal), atol=1e-6)
    # after balancing both sides peak at the geometric mean
    assert torch.allclose(x_tilde / b, w_sal * b, atol=1e-5)
    # without SSC: plain max over all calibration rows
    x_max, _ = calibrated_salience(absmax, t, w_sal, ssc=False)
    assert torch.equal(x_max, torch.tensor([9.0, 4.0, 3.0, 8.0]))
    # per-sample rho: one weight per calibration row, still summing to one
    _, extras = calibrated_salience(absmax, t, w_sal, ssc=True, rho_mode="per_sample")
    assert extras["eta"].shape == (4,) and torch.isclose(extras["eta"].sum(), torch.tensor(1.0))


def test_zero_salience_channels_keep_unit_scale():
    b = csb_vector(torch.tensor([0.0, 4.0, 1.0]), torch.tensor([1.0, 0.0, 4.0]))
    assert torch.equal(b, torch.tensor([1.0, 1.0, 0.5]))
    b = smoothing_vector(torch.tensor([0.0, 4.0, 9.0]), torch.tensor([1.0, 0.0, 1.0]), 0.5)
    assert torch.equal(b, torch.tensor([1.0, 1.0, 3.0]))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_smoothquant_formula(alpha):
    x, w = torch.tensor([2.0, 8.0, 0.5]), torch.tensor([1.0, 0.5, 3.0])
    assert torch.allclose(smoothing_vector(x, w, alpha), x ** alpha / w ** (1 - alpha))
