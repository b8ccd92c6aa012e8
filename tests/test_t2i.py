"""Text-to-image models in the lab: tiny random PixArt-sigma and Stable Diffusion pipelines (tests/tiny_t2i.py)
load from their folders, sample deterministically from prompts, fold scales exactly at every declared site,
reconstruct block by block, quantize with every method at W8A8 and W4A8, and save / load."""
from __future__ import annotations

import copy

import pytest
import torch

from analysis.models.bundle import ModelLoadError

from analysis.models.loading import load
from analysis.models.sampling import sample
from quant.api import QuantConfig, quantize_with_details
from quant.forward import forward
from quant.graph import balance_groups, balance_plan, recon_units
from quant.reparam import apply_scaling

PROMPTS = ["a red car", "a photo of a cat"]


@pytest.fixture(scope="module")
def pixart(pixart_folder):
    return load(str(pixart_folder))


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load(str(sd_folder))


@pytest.fixture(scope="module", params=["pixart", "sd"])
def t2i(request, pixart, sd):
    return {"pixart": pixart, "sd": sd}[request.param]


@pytest.fixture(scope="module")
def calib(t2i):
    return sample(t2i, None, [0, 1], steps=3, prompts=PROMPTS, record="all", decode=False).calibration


def test_pipelines_load_with_fp_text_encoder_and_vae(pixart, sd):
    assert pixart.family == "pixart" and sd.family == "sd"
    assert pixart.text.kind == "t5" and pixart.text.max_length == 300 and pixart.text.use_mask
    assert sd.text.kind == "clip" and sd.text.max_length == 77 and not sd.text.use_mask
    for b in (pixart, sd):
        assert b.conditional and b.num_classes == 0 and b.image_shape == (3, 16, 16)
        assert "text encoder and VAE stay FP" in b.describe()
        assert not any(p.requires_grad for p in b.text.model.parameters())


def test_bare_denoiser_and_bin_weights_are_refused(pixart_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="pipeline folder"):
        load(str(pixart_folder / "transformer"))
    import shutil

    broken = tmp_path / "p"
    shutil.copytree(pixart_folder, broken)
    for f in (broken / "text_encoder").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load(str(broken))


def test_offline_hub_id_gives_the_local_copy_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pass its path instead"):
        load("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")


def test_sampling_from_prompts_is_deterministic_and_batch_independent(t2i):
    a = sample(t2i, None, [0, 1], steps=3, prompts=PROMPTS)
    b = sample(t2i, None, [1], steps=3, prompts=PROMPTS[1:])
    assert a.images.shape == (2, 3, 16, 16) and a.prompts == PROMPTS
    assert torch.allclose(a.images[1], b.images[0], atol=1e-5)
    assert torch.equal(sample(t2i, None, [0, 1], steps=3, prompts=PROMPTS).images, a.images)
    other = sample(t2i, None, [0], steps=3, prompts=["a blue tree"])
    assert not torch.allclose(other.images[0], a.images[0])
    neg = sample(t2i.with_negative_prompt("a dog"), None, [0], steps=3, prompts=PROMPTS[:1])
    assert not torch.allclose(neg.images[0], a.images[0])  # the negative prompt is guidance's other branch
    with pytest.raises(ValueError, match="prompt"):
        sample(t2i, None, [0], steps=2)


def test_each_prompt_is_encoded_once(t2i):
    calls = []
    encode = t2i.text.encode
    t2i.text.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    try:
        ids = t2i.prompt_ids(["a green house", "a green house", "a blue car"])
        again = t2i.prompt_ids(["a blue car", "a green house"])
    finally:
        del t2i.text.encode
    assert ids[0] == ids[1] and again == [ids[2], ids[0]]
    assert calls == [["a green house", "a blue car"]]


def _random_b(n: int, gen) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=gen) * 0.5)


def test_every_fold_site_is_exact(t2i, calib):
    """Every declared group folded at once with random positive vectors: same output to 1e-4 relative."""
    model = t2i.denoiser
    folded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    groups = balance_groups(folded)
    mods = dict(folded.named_modules())
    for g in groups:
        apply_scaling(folded, g, _random_b(mods[g.layers[0]].weight.shape[1], gen))
    x, t, y = next(iter(calib.batches(64)))
    ref, out = forward(model, x, t, y), forward(folded, x, t, y)
    assert (out - ref).norm() / ref.norm() < 1e-4
    kinds = {g.kind for g in groups}
    if t2i.family == "pixart":
        assert kinds == {"adaln_single_attn", "adaln_single_mlp", "cross_kv", "attn_out"}
    else:
        assert kinds == {"norm_in", "attn_out"}


def test_fold_site_table_names_every_refused_layer(t2i):
    plan = balance_plan(t2i.denoiser)
    reasons = plan["unbalanced"]
    assert plan["foldable_layers"] + len(reasons) == plan["layers"]
    if t2i.family == "pixart":
        assert "PixArt" in reasons["transformer_blocks.0.attn2.to_q"]
        assert "GELU" in reasons["transformer_blocks.1.ff.net.2"]
        assert "SiLU" in reasons["adaln_single.linear"]
        assert "text encoder" in reasons["caption_projection.linear_1"]
    else:
        k = next(n for n in reasons if n.endswith("attn2.to_k"))
        assert "CLIP" in reasons[k]
        assert "GEGLU" in reasons[next(n for n in reasons if n.endswith("ff.net.2"))]
        assert "SiLU" in reasons[next(n for n in reasons if n.endswith("resnets.0.conv1"))]


@torch.no_grad()
def test_reconstruction_units_chain_to_the_full_forward(t2i, calib):
    model = t2i.denoiser
    x, t, y = next(iter(calib.batches(64)))
    stream = x
    for unit in recon_units(model):
        out = unit.run(model, stream, t, y)
        if unit.advances:
            stream = out
    ref = forward(model, x, t, y)
    if t2i.family == "pixart":  # the final unit stops before unpatchify (a fixed permutation)
        p, c = model.config.patch_size, model.out_channels
        h = x.shape[-1] // p
        stream = torch.einsum("nhwpqc->nchpwq", stream.reshape(-1, h, h, p, p, c)).reshape(ref.shape)
    assert torch.allclose(stream, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["baseline", "smoothquant", "ptq4dit", "dilatequant"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_every_method_quantizes_both_families(t2i, calib, method, bits):
    result = quantize_with_details(t2i.denoiser, QuantConfig(method=method, w_bits=bits[0], a_bits=bits[1]),
                                   calib)
    x, t, y = next(iter(calib.batches(64)))
    ref, out = forward(t2i.denoiser, x, t, y), forward(result.model, x, t, y)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < (0.2 if bits == (8, 8) else 1.0)
    if method != "baseline":
        assert set(result.vectors) == {g.name for g in balance_groups(t2i.denoiser)}


@pytest.mark.parametrize("recon", ["adaround", "bkd"])
def test_blockwise_optimization_runs_over_every_unit(t2i, calib, recon):
    cfg = QuantConfig(method="baseline", w_bits=4, a_bits=8, recon=recon, recon_iters=2, recon_rows=16,
                      recon_batch=4)
    result = quantize_with_details(t2i.denoiser, cfg, calib)
    names = [u["name"] for u in result.recon["units"]]
    assert names == [u.name for u in recon_units(t2i.denoiser)]
    assert all(u["error_after"] == u["error_after"] for u in result.recon["units"])  # finite, not NaN


def test_quantized_model_saves_and_loads_with_its_text_encoder(t2i, calib, tmp_path):
    from analysis.models.saved import save_quantized

    cfg = QuantConfig(method="ptq4dit", w_bits=4, a_bits=8)
    q = quantize_with_details(t2i.denoiser, cfg, calib).model
    folder = save_quantized(t2i.with_denoiser(q), cfg, tmp_path / "q", base_source=t2i.name)
    assert (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()
    again = load(str(folder))
    assert again.family == t2i.family and again.text.max_length == t2i.text.max_length
    a = sample(t2i.with_denoiser(q), None, [0], steps=3, prompts=PROMPTS[:1])
    b = sample(again, None, [0], steps=3, prompts=PROMPTS[:1])
    assert torch.allclose(a.images, b.images, atol=1e-5)


def test_token_salience_covers_every_prompt_and_position(t2i):
    from analysis.plots.tokens import token_salience_figure
    from analysis.salience.tokens import token_salience

    ts = token_salience(t2i, PROMPTS)
    assert ts.absmax.shape == (2, t2i.text.max_length) and ts.mask.shape == ts.absmax.shape
    assert ts.tokens[1][:4] == ["a", "photo", "of", "a"] or ts.tokens[1][1:5] == ["a", "photo", "of", "a"]
    assert ts.source == ("caption_projection output" if t2i.family == "pixart" else "text encoder output")
    s = ts.summary()
    assert s["top"][0]["absmax"] == pytest.approx(float(ts.absmax[ts.mask].max() if not ts.attended else ts.absmax.max()))
    fig = token_salience_figure(ts)
    assert len(fig.data) == 2 and fig.data[0].z.shape[0] == 2


def test_salience_pass_takes_prompts_and_names_the_new_layer_kinds(t2i):
    from analysis.salience.collect import SalienceConfig, collect, layer_kind, layer_menu

    stats = collect(t2i, SalienceConfig(steps=2, samples=2, prompts=tuple(PROMPTS)))
    assert stats.info["prompts"] == PROMPTS and stats.act_absmax
    kinds = {layer_kind(k) for k in stats.layers}
    assert {"cross_q", "cross_kv", "cross_out"} <= kinds
    assert ("adaLN_single" in kinds and "caption_proj" in kinds) if t2i.family == "pixart" else "proj_in" in kinds
    assert sum(len(v) for v in layer_menu(stats.layers).values()) == len(stats.layers)


def test_calibration_spec_carries_prompts_and_evaluation_uses_other_prompts(t2i):
    from analysis.evaluation.evaluate import EvalOptions, eval_prompts
    from analysis.models.prompts import read_prompt_set
    from analysis.quantization.calibration import CalibrationSpec, calibrate

    spec = CalibrationSpec(images=3, steps=2, prompts=["a red car"])
    cal = calibrate(t2i, spec)
    assert cal.spec.negative_prompt == "" and cal.spec.to_dict()["prompts"] == ["a red car"]
    assert set(cal.y.tolist()) == set(t2i.prompt_ids(["a red car", ""]))
    assert "prompts" not in CalibrationSpec().to_dict()  # class models keep their recipe keys
    assert not set(eval_prompts(t2i, EvalOptions(num_samples=40))) & set(read_prompt_set("calibration"))


@pytest.mark.slow
def test_evaluation_reports_similarity_vs_fp_and_says_why_no_clip_score(t2i, tmp_path):
    from analysis.evaluation.evaluate import EvalOptions, evaluate
    from analysis.models.prompts import read_prompt_set

    r = evaluate(t2i, QuantConfig(method="baseline", w_bits=4, a_bits=8),
                 EvalOptions(num_samples=4, steps=2, extractor="digits", calib_samples=2))
    m = r.metrics
    assert m["fid_vs_fp"] >= 0 and 0 < m["psnr_vs_fp"] < 100 and 0 < m["ssim_vs_fp"] <= 1
    assert m["clip_score"] is None and "local CLIP model" in m["clip_score_note"]
    assert m["prompts"] == read_prompt_set("evaluation")[:4] and m["negative_prompt"] == ""


def test_clip_score_with_a_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from analysis.evaluation.clip_score import clip_model_path, clip_score
    from tests.tiny_t2i import make_tokenizer

    tok = make_tokenizer("clip", 16)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    folder = clip_model_path(tmp_path / "clip")
    score = clip_score(torch.rand(3, 3, 16, 16), ["a red car", "a cat", "a tree"], folder)
    assert 0 <= score <= 100
    with pytest.raises(ValueError, match="CLIPModel|config.json"):
        clip_model_path(tmp_path)


def test_cli_samples_quantizes_and_evaluates_with_prompts(capsys, pixart_folder, tmp_path):
    import json

    from tests.conftest import run_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\na red car\n\na blue tree\n")
    code, out, _ = run_cli(capsys, "sample", "--model", pixart_folder, "--prompt", "a red car", "--prompt", "a cat",
                           "--seeds", "0-1", "--steps", "2", "--out-dir", tmp_path / "png", "--json")
    assert code == 0 and json.loads(out)["prompts"] == ["a red car", "a cat"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"prompt{i}_seed{s}.png" for i in (0, 1) for s in (0, 1)]
    code, out, _ = run_cli(capsys, "quantize", "--model", pixart_folder, "--method", "smoothquant", "--w-bits", "8",
                           "--a-bits", "8", "--calib-samples", "2", "--calib-steps", "2", "--prompts", prompts,
                           "--out", tmp_path / "q", "--json")
    report = json.loads(out)
    assert code == 0 and report["calibration"]["prompts"] == ["a red car", "a blue tree"]
    code, out, _ = run_cli(capsys, "sample", "--model", tmp_path / "q", "--prompt", "a red car", "--seeds", "0",
                           "--steps", "2", "--out", tmp_path / "q.png", "--json")
    assert code == 0
    code, _, err = run_cli(capsys, "sample", "--model", pixart_folder, "--classes", "1", "--seeds", "0")
    assert code == 2 and "--prompt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "quantize", "--model", pixart_folder, "--prompts", tmp_path / "missing.txt")
    assert code == 2 and "does not exist" in err
