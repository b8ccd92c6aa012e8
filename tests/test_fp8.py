"""FP8 W8A8 through torch._scaled_mm: construction, equality with fake-quant, refusal where there is no FP8."""
import pytest
import torch

from quant.api import QuantConfig, quantize
from quant.fp8 import Fp8Linear, fp8_eligible, fp8_supported, to_fp8
from quant.modules import quant_layers
from tests.conftest import make_tiny_dit
from tests.test_quant_api import _batches

FP8 = QuantConfig(method="baseline", w_bits=8, a_bits=8, w_format="fp8_e4m3", a_format="fp8_e4m3")


@pytest.fixture(scope="module")
def fp8_model():
    model = make_tiny_dit(heads=2, head_dim=16)  # width 32: every block linear is a multiple of 16
    batches = _batches(model)
    return quantize(model, FP8, batches), batches


def test_fp8_linear_matches_fake_quant_and_saturates(fp8_model):
    q, _ = fp8_model
    name, layer = next((n, m) for n, m in quant_layers(q).items() if fp8_eligible(m))
    real = Fp8Linear(layer, allow_cpu=True)  # torch's CPU _scaled_mm checks the arithmetic
    assert real.weight_fp8.dtype == torch.float8_e4m3fn
    x = torch.randn(3, 5, layer.in_features) * 3
    x[0, 0, 0] = 1e6  # far beyond the calibrated range: saturates like the fake-quant layer
    ref = layer(x)
    out = real(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_to_fp8_converts_eligible_layers_and_keeps_the_output(fp8_model):
    q, batches = fp8_model
    x, t, y = batches[0]
    real, names = to_fp8(q, allow_cpu=True)
    assert names and all(isinstance(real.get_submodule(n), Fp8Linear) for n in names)
    assert not any(isinstance(m, Fp8Linear) for m in q.modules())  # the input model is untouched
    ref = q(x, timestep=t, class_labels=y).sample
    out = real(x, timestep=t, class_labels=y).sample
    assert ((out - ref).norm() / ref.norm()) < 1e-4


def test_refused_without_fp8_hardware_and_for_other_formats(fp8_model):
    q, _ = fp8_model
    assert not fp8_supported("cpu")
    layer = next(m for m in quant_layers(q).values() if fp8_eligible(m))
    with pytest.raises(ValueError, match="compute capability 8.9"):
        Fp8Linear(layer)
    same, names = to_fp8(q)  # on a CPU nothing converts: the fake-quant model is what runs
    assert names == [] and not any(isinstance(m, Fp8Linear) for m in same.modules())
    int8 = quantize(make_tiny_dit(heads=2, head_dim=16), QuantConfig(w_bits=8, a_bits=8), _batches(q))
    assert not any(fp8_eligible(m) for m in quant_layers(int8).values())
    with pytest.raises(ValueError, match="fp8_e4m3 QuantLinear"):
        Fp8Linear(next(iter(quant_layers(int8).values())), allow_cpu=True)
