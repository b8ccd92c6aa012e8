"""Uniform affine fake quantizer: grid, range, per-channel vectorization, search, straight-through gradient."""
import pytest
import torch

from quant.quantizers import (fake_quant, fake_quantize, pack_codes, quant_params, qrange, search_params,
                              unpack_codes)


def test_values_land_on_the_grid_and_minmax_endpoints_are_exact():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3 + 1
    scale, zero = quant_params(x.min(), x.max(), 4)
    xq = fake_quant(x, scale, zero, 4)
    codes = xq / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= 0 and codes.max() <= 15
    assert len(torch.unique(codes.round())) <= 16
    assert (xq - x).abs().max() <= scale / 2 + 1e-5  # min-max range: only rounding error, no clipping
    assert abs(xq.min() - x.min()) <= scale / 2 + 1e-5 and abs(xq.max() - x.max()) <= scale / 2 + 1e-5


def test_zero_is_exact_and_symmetric_has_no_zero_point():
    x = torch.tensor([0.0, 0.3, 1.7, 2.5])  # all positive: range widened to include 0
    s, z = quant_params(x.min(), x.max(), 8)
    assert z == 0 and fake_quant(torch.zeros(1), s, z, 8) == 0
    s, z = quant_params(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=True)
    assert z == 0 and torch.isclose(s, torch.tensor(3.0 / 127))
    assert qrange(4, True) == (-8, 7) and qrange(4) == (0, 15)


def test_per_channel_axis_keeps_one_scale_per_index_without_mixing_channels():
    torch.manual_seed(0)
    w = torch.randn(6, 32) * torch.logspace(-2, 2, 6)[:, None]  # rows of very different ranges
    wq = fake_quantize(w, 4, axis=0)
    for i in range(6):  # the per-channel result equals quantizing each row alone
        assert torch.allclose(wq[i], fake_quantize(w[i], 4, axis=None), rtol=1e-5, atol=1e-7)
    per_tensor = fake_quantize(w, 4)
    assert (wq - w).pow(2)[0].sum() < (per_tensor - w).pow(2)[0].sum()  # small row crushed by one scale
    scale, _ = search_params(w, 4, axis=0)
    assert scale.shape == (6, 1)
    # any axis: per column of a 3-d tensor
    x = torch.randn(2, 5, 7)
    s, _ = search_params(x, 8, axis=1)
    assert s.shape == (1, 5, 1)
    assert torch.allclose(fake_quantize(x, 8, axis=-2)[:, 3], fake_quantize(x[:, 3], 8), atol=1e-6)


def test_off_returns_input_and_bad_bits_raise():
    x = torch.randn(4, 4)
    assert fake_quantize(x, None) is x and fake_quantize(x, 16) is x
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(x, 1)
    with pytest.raises(ValueError, match="search"):
        fake_quantize(x, 4, search="bogus")


def test_mse_search_never_worse_than_minmax_and_percentile_clips_outliers():
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    w[:, 0] = 40.0  # one outlier per row
    err = {s: (fake_quantize(w, 4, axis=0, search=s) - w).pow(2).mean(dim=1) for s in ("minmax", "mse")}
    assert (err["mse"] <= err["minmax"] + 1e-7).all() and err["mse"].mean() < err["minmax"].mean()
    lo_p, _ = search_params(w, 8, axis=0, search="percentile", percentile=99.0)
    lo_m, _ = search_params(w, 8, axis=0, search="minmax")
    assert (lo_p < lo_m).all()  # the percentile range excludes the outlier: a finer step


def test_straight_through_gradient():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    s, z = quant_params(torch.tensor(-0.5), torch.tensor(0.5), 4)
    fake_quant(x, s, z, 4).sum().backward()
    inside = (x.detach() > -0.5) & (x.detach() < 0.5)
    assert torch.equal(x.grad, inside.float())  # identity inside the range, zero where clamped


@pytest.mark.parametrize("bits", [2, 3, 4, 7, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)
