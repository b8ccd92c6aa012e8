"""The family table (quant.families): every layer of both bundled models has a kind, a stage and a readable name
from its family's one file; sensitivity's blocks and the sweep's float-io follow the family (both were DiT-only);
and a third family added as one file works through the whole engine."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import quant.families as families
from analysis.quantization.sensitivity import sensitivity, units_of
from analysis.evaluation.sweep import SweepSpec, check_float_io, point_config
from quant.api import QuantConfig, quantize_with_details
from quant.families import family_of, float_io, layer_kind, layer_stage, readable_layer, stage_of
from quant.graph import balance_plan
from quant.wrap import covered_layers, wrap_model

STAGES = {"dit": ["patch embedding"] + [f"block {i}" for i in range(6)] + ["final layer"],
          "unet": ["input", "down 0", "down 1", "down 2", "middle", "up 0", "up 1", "up 2", "output"]}


@pytest.fixture(scope="module")
def unet():
    from analysis.models.loading import load

    return load("bundled:unet-mnist", device="cpu")


@pytest.fixture(params=["dit", "unet"])
def model_bundle(request, bundled, unet):
    return {"dit": bundled, "unet": unet}[request.param]


def test_every_layer_of_both_bundled_models_has_a_kind_a_stage_and_a_unique_readable_name(model_bundle):
    model, family = model_bundle.denoiser, model_bundle.family
    layers = list(covered_layers(model))
    assert all(layer_kind(n, family) != "other" for n in layers), [n for n in layers if layer_kind(n) == "other"]
    assert list(dict.fromkeys(stage_of(n) for n in sorted(layers, key=lambda n: layer_stage(n)))) == STAGES[family]
    names = [readable_layer(n) for n in layers]
    assert len(set(names)) == len(names) and not any(n in layers for n in names)


def test_sensitivity_blocks_follow_the_family(model_bundle):
    # before the table, every UNet layer fell into one "input / output" block
    layers = list(covered_layers(model_bundle.denoiser))
    blocks = units_of(layers, "block", model_bundle.family)
    assert list(blocks) == STAGES[model_bundle.family]  # in forward order
    assert sum(len(v) for v in blocks.values()) == len(layers)
    kinds = units_of(layers, "kind", model_bundle.family)
    assert "other" not in kinds and len(kinds) < len(layers)


def test_unet_sensitivity_by_block_runs_end_to_end(unet):
    from analysis.models.sampling import sample

    cal = sample(unet, [0, 1], [5, 6], steps=2, guidance=1.5, record="all", decode=False).calibration
    sens = sensitivity(unet, 4, 8, cal, granularity="block")
    assert sens.units == STAGES["unet"] and sens.only.shape == (9, 2)
    assert (sens.only > 0).all() and (sens.all_but < sens.all_quantized[None] + 1e-6).any()


def test_float_io_keeps_each_familys_ends_in_float(model_bundle):
    spec = SweepSpec(methods=["baseline"], bits=["W8A8"], options=["default", "float-io"]).validate()
    kept = check_float_io(model_bundle, spec)
    assert kept == list(float_io(model_bundle.denoiser))
    default = point_config("baseline", "W8A8", "default", spec, family=model_bundle.family)
    config = point_config("baseline", "W8A8", "float-io", spec, family=model_bundle.family)
    model = model_bundle.denoiser
    wrapped = wrap_model(copy.deepcopy(model), config)
    everything = wrap_model(copy.deepcopy(model), default)
    # before the table, the UNet's float-io point excluded nothing and equalled the default point
    assert len(everything) - len(wrapped) == len(kept) >= 2 and config.to_dict() != default.to_dict()


def test_float_io_that_matches_nothing_is_refused(unet, monkeypatch):
    import dataclasses

    spec = SweepSpec(methods=["baseline"], bits=["W8A8"], options=["float-io"]).validate()
    fam = dataclasses.replace(families.FAMILIES["unet"], float_io=("pos_embed.proj",))
    monkeypatch.setitem(families.FAMILIES, "unet", fam)
    with pytest.raises(ValueError, match="float-io keeps no layer"):
        check_float_io(unet, spec)


# ---- a third family, added as one file ---------------------------------------------------------------------
@pytest.fixture
def toy_family():
    """tests/families/toy.py dropped into the table's folder (its search path), discovered like dit.py and unet.py."""
    folder = str(Path(__file__).parent / "families")
    families.__path__.append(folder)
    try:
        families._discover()
        yield families.FAMILIES["toy"]
    finally:
        families.__path__.remove(folder)
        families.unregister("toy")


def _toy_batches(model, n=4, steps=(900, 500, 100)):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 2, 4, 4, generator=gen), torch.full((n,), t), torch.arange(n) % 3) for t in steps]


def test_a_third_family_is_one_file(toy_family):
    from quant.families.toy import ToyDenoiser
    from quant.forward import forward_batches

    torch.manual_seed(0)
    model = ToyDenoiser().eval()
    assert family_of(model) == "toy" and toy_family.describe(model) == "Toy, 2 blocks"
    layers = list(covered_layers(model))
    assert [readable_layer(n, "toy") for n in layers] == ["input · stem", "input · t-embed", "block 0 · MLP in",
                                                          "block 0 · MLP out",
                                                          "block 1 · MLP in", "block 1 · MLP out", "output · head"]
    assert list(units_of(layers, "block", "toy")) == ["input", "block 0", "block 1", "output"]
    plan = balance_plan(model)
    assert plan["family"] == "toy" and plan["foldable_layers"] == 2
    assert plan["unbalanced"]["blocks.0.fc_out"] == "input is GELU(fc_in output)"

    # PTQ4DiT's CSB folds into the toy's LayerNorms; TPQ and BKD reconstruction run on the toy's units
    batches = _toy_batches(model)
    config = QuantConfig(method="ptq4dit", w_bits=8, a_bits=8, tpq=True, recon="bkd", recon_iters=2, recon_rows=8,
                         exclude=list(toy_family.float_io))
    res = quantize_with_details(model, config, batches, keep_reference=True)
    assert set(res.vectors) == {"blocks.0.fc_in", "blocks.1.fc_in"}
    assert [u["name"] for u in res.recon["units"]] == ["stem", "blocks.0", "blocks.1", "head"]
    assert not any(n in ("stem", "head") for n in res.layers)  # the ends stayed in float
    fp = forward_batches(model, batches, keep_outputs=True)
    q = forward_batches(res.model, batches, keep_outputs=True)
    assert 0 < float((q - fp).norm() / fp.norm()) < 0.05
    assert all(p.grad is None for p in model.parameters()) and type(model.blocks[0].fc_in) is torch.nn.Linear
