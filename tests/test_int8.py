"""INT8 inference path: int8 x int8 -> int32 linears that match the fake-quant model they came from."""
from __future__ import annotations

import copy

import pytest
import torch

from analysis.evaluation.speed import random_batch
from quant.api import quantize, read_quantized, write_quantized
from quant.config import QuantConfig
from quant.int8 import Int8Linear, int8_layers, onednn_available, plan_int8, to_int8
from quant.modules import QuantLinear, find_timestep_context, quant_layers

# Per layer the integer matmul is exact and only the float epilogue's rounding order differs from the
# fake-quant layer: relative differences of a few 1e-7 in float32 (measured); 1e-5 leaves room for BLAS.
LAYER_TOLERANCE = 1e-5


def _layer_inputs(model, batch):
    """Each quantized linear's input in one forward of `batch` = (x, t, y)."""
    seen = {}

    def keep(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in quant_layers(model).items() if isinstance(m, QuantLinear)]
    x, t, y = batch
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    for h in hooks:
        h.remove()
    return seen


def _calibration(model, rows: int = 16, timesteps=(999, 500, 20), seed: int = 0):
    """Random latents at a few timesteps: enough to set static (and per-timestep) activation ranges."""
    return [random_batch(model, rows, timesteps, seed)]


KERNELS = ["int_mm"] + (["onednn"] if onednn_available() else [])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tpq,symmetric", [(False, False), (True, False), (False, True)])
def test_each_int8_layer_matches_its_fake_quant_layer(bundled, tpq, symmetric, kernel):
    cfg = QuantConfig(method="dilatequant" if tpq else "baseline", w_bits=8, a_bits=8, w_symmetric=symmetric,
                      a_symmetric=symmetric)
    q = quantize(bundled.denoiser, cfg, _calibration(bundled.denoiser))
    batch = _calibration(bundled.denoiser, rows=6, seed=1)[0]  # three timesteps mixed in one batch
    inputs = _layer_inputs(q, batch)
    find_timestep_context(q).t = batch[1]  # per-sample timesteps for the TPQ quantizers
    checked = 0
    for name, layer in quant_layers(q).items():
        if name not in inputs:
            continue
        with torch.no_grad():
            ref, got = layer(inputs[name]), Int8Linear(layer, kernel)(inputs[name])
        assert (got - ref).abs().max() <= LAYER_TOLERANCE * ref.abs().max(), name
        checked += 1
    assert checked == sum(isinstance(m, QuantLinear) for m in quant_layers(q).values())


def test_int8_model_output_close_to_fake_quant_and_input_untouched(bundled):
    q = quantize(bundled.denoiser, QuantConfig(method="ptq4dit", w_bits=8, a_bits=8),
                 _calibration(bundled.denoiser))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    fast = to_int8(q)
    assert not int8_layers(q)  # the input keeps its fake-quant layers
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert len(int8_layers(fast)) == sum(isinstance(m, QuantLinear) for m in quant_layers(q).values())
    x, t, y = _calibration(bundled.denoiser, rows=8, seed=2)[0]
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=y).sample
        got = fast(x, timestep=t, class_labels=y).sample
    # Through 6 blocks an epilogue rounding difference can move an activation across a rounding boundary
    # of the next quantizer (one step d_a): the model outputs then differ by well under 1% of their norm.
    assert (got - ref).norm() / ref.norm() < 1e-2
    again = copy.deepcopy(fast)  # after a forward: oneDNN's packed weights are not copied but rebuilt
    with torch.no_grad():
        assert torch.equal(again(x, timestep=t, class_labels=y).sample, got)


def test_dit_xl2_width_block_matches(one_torch_thread):
    """One block at DiT-XL/2's width (1152 = 16 heads x 72) and MLP (4608): the shapes the speedup is for."""
    from tests.conftest import make_tiny_dit

    model = make_tiny_dit(layers=1, heads=16, head_dim=72, sample_size=8)
    q = quantize(model, QuantConfig(method="baseline", w_bits=8, a_bits=8), _calibration(model, rows=6))
    fast = to_int8(q)
    x, t, y = _calibration(model, rows=2, seed=3)[0]
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=y).sample
        got = fast(x, timestep=t, class_labels=y).sample
    assert (got - ref).norm() / ref.norm() < 1e-2
    assert {(m.in_features, m.out_features) for m in int8_layers(fast).values()} >= {(1152, 4608), (4608, 1152)}


def test_saved_folder_loads_into_the_same_int8_model(bundled, tmp_path):
    q = quantize(bundled.denoiser, QuantConfig(method="dilatequant", w_bits=8, a_bits=8),
                 _calibration(bundled.denoiser))
    write_quantized(q, QuantConfig(method="dilatequant", w_bits=8, a_bits=8), tmp_path)
    loaded, _, _ = read_quantized(tmp_path)
    a, b = int8_layers(to_int8(q)), int8_layers(to_int8(loaded))
    assert a.keys() == b.keys()
    for name in a:  # the int8 codes come back exactly from the stored 8-bit codes
        assert torch.equal(a[name].weight_int8, b[name].weight_int8), name
        assert a[name].weight_int8.dtype == torch.int8
        assert torch.equal(a[name].act.scale, b[name].act.scale) and a[name].act.scale.numel() == 3  # TPQ table


def test_plan_converts_only_the_shapes_it_measured_faster(bundled):
    q = quantize(bundled.denoiser, QuantConfig(method="baseline", w_bits=8, a_bits=8),
                 _calibration(bundled.denoiser))
    plan = plan_int8(q, _calibration(bundled.denoiser, rows=4, seed=4)[0], repeats=2)
    eligible = {n for n, m in quant_layers(q).items() if isinstance(m, QuantLinear)}
    assert set(plan) == eligible
    for entry in plan.values():
        assert entry["float_ms"] > 0 and entry["int8_ms"] > 0 and entry["int8"] == (entry["int8_ms"] < entry["float_ms"])
    adaln = next(e for n, e in plan.items() if n.endswith("norm1.linear"))
    assert adaln["rows"] == 4  # the adaLN projection sees one row per image, the attention 64 tokens per image
    assert next(e for n, e in plan.items() if n.endswith("attn1.to_q"))["rows"] == 4 * 64
    fast = to_int8(q, plan)
    assert set(int8_layers(fast)) == {n for n, e in plan.items() if e["int8"]}


def test_nothing_to_convert_is_a_clear_error(bundled):
    q = quantize(bundled.denoiser, QuantConfig(method="baseline", w_bits=4, a_bits=8),
                 _calibration(bundled.denoiser))
    with pytest.raises(ValueError, match="W8A8"):
        to_int8(q)


@pytest.mark.slow
def test_cli_samples_a_saved_w8a8_folder_in_int8(tmp_path, capsys):
    import json

    from tests.conftest import run_cli

    small = ["--calib-samples", "4", "--calib-steps", "4"]
    for bits, folder in (("8", tmp_path / "w8a8"), ("4", tmp_path / "w4a8")):
        rc, _, err = run_cli(capsys, "quantize", "--w-bits", bits, "--a-bits", "8", *small, "--out", folder)
        assert rc == 0, err
    args = ["sample", "--classes", "0-1", "--seeds", "0-1", "--steps", "3", "--json"]
    rc, out, err = run_cli(capsys, *args, "--model", tmp_path / "w8a8", "--int8", "--out", tmp_path / "a.png")
    assert rc == 0, err
    res = json.loads(out)
    assert res["int8_eligible_layers"] == 56 and 0 <= res["int8_layers"] <= 56 and (tmp_path / "a.png").exists()
    rc, out, err = run_cli(capsys, *args, "--model", tmp_path / "w4a8", "--int8", "--out", tmp_path / "b.png")
    assert rc == 2 and out == "" and "W8A8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int_mm_kernel_on_cuda_matches_fake_quant(one_torch_thread):
    """The GPU path: torch._int_mm (rows padded to the kernel's multiple) against the fake-quant layer."""
    from tests.conftest import make_tiny_dit

    model = make_tiny_dit(layers=1, heads=16, head_dim=72, sample_size=8).cuda()
    cal = [tuple(v.cuda() for v in b) for b in _calibration(model, rows=6)]
    q = quantize(model, QuantConfig(method="dilatequant", w_bits=8, a_bits=8), cal)
    fast = to_int8(q)
    assert all(m.kernel == "auto" for m in int8_layers(fast).values())
    x, t, y = (v.cuda() for v in _calibration(model, rows=3, seed=5)[0])  # adaLN: 3 rows, padded to 24
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=y).sample
        got = fast(x, timestep=t, class_labels=y).sample
    assert (got - ref).norm() / ref.norm() < 1e-2


@pytest.mark.skipif(not onednn_available(), reason="the fused MLP runs on oneDNN's quantized linear (x86 CPUs)")
def test_fused_mlp_hands_codes_to_fc2_and_matches_fake_quant(one_torch_thread):
    """Symmetric weights: each block's MLP becomes one Int8FeedForward (GELU and fc2's quantizer inside fc1's
    GEMM); the model stays as close to its fake-quant model as the unfused INT8 model is."""
    from quant.int8 import Int8FeedForward
    from tests.conftest import make_tiny_dit

    model = make_tiny_dit(layers=2, heads=16, head_dim=72, sample_size=8)
    q = quantize(model, QuantConfig(method="baseline", w_bits=8, a_bits=8, w_symmetric=True),
                 _calibration(model, rows=6))
    fused, apart = to_int8(q), to_int8(q, fuse=False)
    assert sum(isinstance(m, Int8FeedForward) for m in fused.modules()) == 2
    assert not any(isinstance(m, Int8FeedForward) for m in apart.modules())
    assert len(int8_layers(fused)) == len(int8_layers(apart))
    x, t, y = _calibration(model, rows=2, seed=3)[0]
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=y).sample
        got = fused(x, timestep=t, class_labels=y).sample
        mixed = fused(x, timestep=t[:1].expand(2), class_labels=y).sample  # one timestep: fused path
    assert (got - ref).norm() / ref.norm() < 1e-2
    with torch.no_grad():
        ref_one = q(x, timestep=t[:1].expand(2), class_labels=y).sample
    assert (mixed - ref_one).norm() / ref_one.norm() < 1e-2
    # asymmetric weights keep the two linears apart (oneDNN takes no per-channel weight zero point)
    q_asym = quantize(model, QuantConfig(method="baseline", w_bits=8, a_bits=8), _calibration(model, rows=6))
    assert not any(isinstance(m, Int8FeedForward) for m in to_int8(q_asym).modules())


@pytest.mark.skipif(not onednn_available(), reason="the fused MLP runs on oneDNN's quantized linear (x86 CPUs)")
def test_fused_mlp_with_tpq_falls_back_when_timesteps_mix(bundled, one_torch_thread):
    cfg = QuantConfig(method="dilatequant", w_bits=8, a_bits=8, w_symmetric=True)
    q = quantize(bundled.denoiser, cfg, _calibration(bundled.denoiser))
    fused = to_int8(q)
    x, t, y = _calibration(bundled.denoiser, rows=6, seed=1)[0]  # three timesteps mixed in one batch
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=y).sample
        got = fused(x, timestep=t, class_labels=y).sample
    assert (got - ref).norm() / ref.norm() < 1e-2
