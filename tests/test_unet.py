"""diffusers UNet2DModel in the lab: loading a DDPMPipeline folder and a bare class-conditional UNet, sampling
from seeds alone, salience of convolutions, exact folds at the UNet's affine producers (and the layers that
have none), every method and block-wise distillation with UNet blocks as units."""
from __future__ import annotations

import pytest
import torch

from analysis.models.bundle import ModelLoadError
from analysis.models.loading import load
from analysis.models.sampling import sample
from quant.api import QuantConfig, quantize_with_details
from quant.families import balance_groups, family_of, recon_units
from quant.graph import balance_plan
from quant.reparam import apply_scaling
from tests.conftest import run_cli


def make_tiny_unet(num_class_embeds: int | None = None, seed: int = 0):
    """A random UNet2DModel at toy size with the DDPM structure: resnets, attention at the lower resolution."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=num_class_embeds).eval()


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """The layout of google/ddpm-cifar10-32: model_index.json, unet/, scheduler/ (safetensors)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("tiny_ddpm")
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def cond_folder(tmp_path_factory):
    """A bare class-conditional UNet2DModel folder: 4 classes and the null class."""
    folder = tmp_path_factory.mktemp("tiny_cond_unet")
    make_tiny_unet(num_class_embeds=5).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def cond(cond_folder):
    return load(str(cond_folder))


@pytest.fixture(scope="module")
def cond_calib(cond):
    return sample(cond, [0, 3], [0, 1], steps=3, guidance=2.0, record="all", decode=False).calibration


def test_ddpm_folder_loads_unconditional_and_samples_from_seeds_alone(ddpm_folder):
    bundle = load(str(ddpm_folder))
    assert bundle.family == "unet" and not bundle.conditional and bundle.latent_shape == (3, 8, 8)
    assert bundle.default_guidance == 1.0
    a = sample(bundle, None, [0, 1, 2], steps=3)
    b = sample(bundle, None, [2, 0], steps=3)  # the same seed draws the same image in another batch and order
    assert a.images.shape == (3, 3, 8, 8)
    assert torch.allclose(a.images[2], b.images[0], atol=1e-5) and torch.allclose(a.images[0], b.images[1], atol=1e-5)
    assert torch.equal(sample(bundle, None, [0, 1, 2], steps=3).images, a.images)  # deterministic
    with pytest.raises(ValueError, match="unconditional"):
        sample(bundle, [1], [0], steps=2)
    with pytest.raises(ValueError, match="guidance"):
        sample(bundle, None, [0], steps=2, guidance=2.0)


def test_cli_samples_an_unconditional_unet_with_seeds_alone(capsys, ddpm_folder, tmp_path):
    code, out, _ = run_cli(capsys, "sample", "--model", ddpm_folder, "--seeds", "0-3", "--steps", "2",
                           "--out-dir", tmp_path, "--json")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"seed{i}.png" for i in range(4)]
    code, _, err = run_cli(capsys, "sample", "--model", ddpm_folder, "--classes", "1", "--seeds", "0")
    assert code == 2 and "unconditional" in err and len(err.strip().splitlines()) == 1


def test_bare_class_conditional_unet_loads_with_its_null_class(cond):
    assert cond.family == "unet" and cond.num_classes == 4 and cond.null_label == 4
    a = sample(cond, [0, 3], [5, 6], steps=3, guidance=2.0)
    b = sample(cond, [0, 3], [5, 6], steps=3, guidance=2.0)
    assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="out of range"):
        sample(cond, [4], [0], steps=2)


def test_hub_id_fails_offline_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass its path instead"):
        load("google/ddpm-cifar10-32")


def test_a_folder_of_another_model_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel"):
        load(str(tmp_path))


def test_conv_salience_shapes_and_weight_salience(cond):
    from analysis.salience.collect import SalienceConfig, collect, layer_kind, layer_menu

    st = collect(cond, SalienceConfig(steps=2, samples=2, guidance=2.0, mse_bits=(4,)))
    m = cond.denoiser
    conv = "down_blocks.0.resnets.0.conv1"
    assert st.act_absmax[conv].shape == (2, 4, m.get_submodule(conv).in_channels)  # [T, 2 halves x 2 rows, C]
    w = m.get_submodule(conv).weight.detach().abs()
    assert torch.allclose(torch.from_numpy(st.weight_absmax[conv]), w.amax(dim=(0, 2, 3)))
    assert st.weight_mse[conv].shape == (1, w.shape[1]) and st.act_mse[conv].shape == (2, 1, w.shape[1])
    kinds = {layer_kind(k) for k in st.layers}
    assert {"conv1", "conv2", "t_proj", "shortcut", "downsample", "upsample", "qkv", "to_out", "t_embed",
            "conv_in", "conv_out"} <= kinds
    assert list(layer_menu(st.layers)) == ["input", "down 0", "down 1", "middle", "up 0", "up 1", "output"]
    assert st.to_csv([conv]).decode().startswith("layer,block,kind,step,timestep,channel,absmax")


def test_folds_are_exact_where_the_producer_is_affine(cond, cond_calib):
    """Random scales folded into every foldable site: the unquantized model computes the same function."""
    model = cond.denoiser
    folded = load_copy(model)
    gen = torch.Generator().manual_seed(0)
    groups = balance_groups(folded)
    assert {g.kind for g in groups} == {"norm_in", "attn_out"}
    for g in groups:
        n = folded.get_submodule(g.layers[0]).in_features
        apply_scaling(folded, g, torch.rand(n, generator=gen) * 4 + 0.25)
    x, t, y = cond_calib.x[:6], cond_calib.t[:6], cond_calib.y[:6]
    with torch.no_grad():
        ref = model(x, t, class_labels=y).sample
        out = folded(x, t, class_labels=y).sample
    assert not torch.equal(folded.get_submodule(groups[0].producer).weight, model.get_submodule(groups[0].producer).weight)
    assert ((out - ref).norm() / ref.norm()) < 1e-4


def load_copy(model):
    import copy

    return copy.deepcopy(model)


def test_balance_plan_names_every_layer_and_why(cond):
    plan = balance_plan(cond.denoiser)
    balanced = {name for g in plan["balanced"] for name in g["layers"]}
    assert all(".attentions." in n for n in balanced) and len(balanced) == plan["foldable_layers"] == 4 * 4
    assert set(plan["unbalanced"]).isdisjoint(balanced) and len(balanced) + len(plan["unbalanced"]) == plan["layers"]
    assert "SiLU" in plan["unbalanced"]["down_blocks.0.resnets.0.conv1"]
    assert "residual stream" in plan["unbalanced"]["up_blocks.0.resnets.0.conv_shortcut"]


@pytest.mark.parametrize("method", ["baseline", "smoothquant", "ptq4dit", "dilatequant"])
def test_every_method_quantizes_a_unet(cond, cond_calib, method):
    res = quantize_with_details(cond.denoiser, QuantConfig(method=method, w_bits=4, a_bits=8, attn_bits=8),
                                cond_calib)
    assert family_of(res.model) == "unet" and len(res.layers) == balance_plan(cond.denoiser)["layers"] + 4
    if method != "baseline":
        assert set(res.vectors) == {g.name for g in balance_groups(cond.denoiser)}
    images = sample(cond.with_denoiser(res.model), [0, 3], [0, 1], steps=3, guidance=2.0).images
    assert torch.isfinite(images).all()


def test_unet_units_compose_to_the_forward(cond, cond_calib):
    model = cond.denoiser
    x, t, y = cond_calib.x[:5], cond_calib.t[:5], cond_calib.y[:5]
    units = recon_units(model)
    assert [u.name for u in units] == ["time_embedding", "conv_in", "down_blocks.0", "down_blocks.1", "mid_block",
                                       "up_blocks.0", "up_blocks.1", "final"]
    with torch.no_grad():
        h = x
        for unit in units:
            out = unit.run(model, h, t, y)
            h = out if unit.advances else h
        ref = model(x, t, class_labels=y).sample
    assert torch.allclose(h, ref, atol=1e-5)


def test_bkd_trains_unet_blocks_and_leaves_the_input_model_alone(cond, cond_calib):
    before = {k: v.clone() for k, v in cond.denoiser.state_dict().items()}
    cfg = QuantConfig(method="dilatequant", w_bits=4, a_bits=4, recon="bkd", recon_iters=6, recon_rows=12,
                      recon_batch=4)
    res = quantize_with_details(cond.denoiser, cfg, cond_calib)
    units = {u["name"]: u for u in res.recon["units"]}
    assert units["down_blocks.1"]["iterations"] == 6 and units["down_blocks.1"]["error_before"] > 0
    assert all(torch.equal(v, cond.denoiser.state_dict()[k]) for k, v in before.items())


def test_a_quantized_unet_saves_and_loads_again(cond, cond_calib, tmp_path):
    from analysis.models.saved import save_quantized
    from analysis.quantization.pipeline import quantize_bundle

    variant = quantize_bundle(cond, QuantConfig(method="dilatequant", w_bits=4, a_bits=8), cond_calib)
    folder = save_quantized(variant.bundle, variant.config, tmp_path / "q")
    again = load(str(folder))
    assert again.family == "unet" and again.num_classes == cond.num_classes
    a = sample(variant.bundle, [1, 2], [0, 1], steps=3, guidance=2.0).images
    b = sample(again, [1, 2], [0, 1], steps=3, guidance=2.0).images
    assert torch.allclose(a, b, atol=1e-5)


def test_unet_layers_read_by_stage_and_role():
    from analysis.plots.axes import readable_layer

    assert readable_layer("down_blocks.1.resnets.0.conv1") == "down 1 · resnet 0 conv1"
    assert readable_layer("mid_block.attentions.0.to_out.0") == "middle · attn 0 out"
    assert readable_layer("conv_out") == "output · conv out"
