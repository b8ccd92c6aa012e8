"""Quantize: pick a method and bit-widths, quantize a copy of the model, and see what the method did.

Each result is kept in st.session_state["variants"] (name -> analysis.quantization.pipeline.Variant), which the
Compare page reads. The cached FP bundle is shared by every session and is never modified: quantize_bundle
works on a copy.
"""
from __future__ import annotations

import dataclasses

import streamlit as st

from pages._shared import current_bundle, current_prompts, intro, option_grid, option_widget, progress_callback

st.title("Quantize")
intro(
    "Quantize a copy of the model with one method and see what it does to the per-channel maxima (the outliers "
    "that stretch a quantizer's range), which vector it folds into the model, and the error it leaves per layer "
    "and per timestep. Results stay in this session for the Compare page.",
    why="Weights and activations are rounded to a uniform grid of $2^b$ levels. PTQ4DiT and SmoothQuant move "
        "range between a layer's input and its weights with a per-channel vector $b$, folded exactly into the "
        "layer that produces the input (the adaLN modulation, or V for the attention output), so inference pays "
        "nothing for it. DilateQuant stretches weight columns that hold no row's extreme, which keeps the weight "
        "step and shrinks the activation range, and gives every timestep its own activation range (TPQ). "
        "Block-wise reconstruction then tunes rounding (AdaRound) or weights (BKD) against the FP block.",
    math=[r"q = \operatorname{clamp}\big(\lfloor x / \Delta \rceil + z,\, 0,\, 2^b - 1\big), \qquad "
          r"\hat x = (q - z)\,\Delta",
          r"b_j^{\text{CSB}} = \sqrt{\tilde s(X_j) / s(W_j)}, \qquad "
          r"b_j^{\text{SQ}} = s(X_j)^{\alpha} / s(W_j)^{1-\alpha}"],
    links={"PTQ4DiT (Wu et al., NeurIPS 2024)": "https://arxiv.org/abs/2405.16005",
           "DilateQuant (Liu et al., 2024)": "https://arxiv.org/abs/2409.14307",
           "SmoothQuant (Xiao et al., ICML 2023)": "https://arxiv.org/abs/2211.10438",
           "AdaRound (Nagel et al., ICML 2020)": "https://arxiv.org/abs/2004.10568"})


def _form(bundle):
    """The method picker, then a form with the options that method uses: QuantConfig's common fields and the
    method's own, both drawn from their declarations (quant.options), and the calibration run."""
    from analysis.quantization.calibration import DEFAULT_CAL_SAMPLES, DEFAULT_CAL_STEPS
    from quant.config import QuantConfig
    from quant.methods import REGISTRY

    methods = [m for m in REGISTRY.values() if m.quantizes]
    names = [m.name for m in methods]
    described = {o.name: o for o in QuantConfig.describe()}
    c_method, c_search, c_pct = st.columns([2, 1, 1])
    method = c_method.selectbox("Method", names, index=names.index("ptq4dit"), key="q_method",
                                help="\n\n".join(f"**{m.name}**: {m.help}" for m in methods))
    # outside the form so the percentile box appears only when the range search uses it
    fields = {"scale_search": option_widget(c_search, described["scale_search"], "q_scale_search")}
    if fields["scale_search"] == "percentile":
        fields["percentile"] = option_widget(c_pct, described["percentile"], "q_percentile")
    st.caption(REGISTRY[method].help)
    partners = [m.name for m in methods if m.composes and m.name != method] if REGISTRY[method].composes else []
    extra = st.multiselect("Combine with", partners, key="q_combine",
                           help="methods applied in the engine's order: balancing, rotation, low-rank branch, "
                                "weight rounding; a combination the math does not allow is refused with the reason")
    method = "+".join([method, *extra])
    common = [o for o in described.values() if o.name not in ("method", "scale_search", "percentile")]
    inputs = "UNet" if bundle.family == "unet" else "transformer"
    with st.form("quantize_form"):
        fields.update(option_grid([o for o in common if o.group == "quantization"], "q_", family=bundle.family))
        own = [o for name in method.split("+") for o in REGISTRY[name].describe_options()]
        if own:
            st.markdown(f"**{method} options**")
            options = option_grid(own, "q_")
        else:
            options = {}
        st.markdown(f"**Calibration** (FP images whose {inputs} inputs set the ranges; their seeds are kept "
                    "apart from the seeds Compare evaluates)")
        c1, c2, c3, _ = st.columns(4)
        cal_samples = c1.number_input("Calibration images", 1, 256, DEFAULT_CAL_SAMPLES, key="q_cal_samples",
                                      help=f"FP images sampled to record the {inputs}'s inputs; reused by later "
                                           "runs with the same calibration settings (by every session)")
        cal_steps = c2.number_input("Calibration DDIM steps", 2, 250, DEFAULT_CAL_STEPS, key="q_cal_steps",
                                    help="TPQ keeps one range per step; sampling with another count uses the "
                                         "nearest calibrated timestep")
        name = c3.text_input("Variant name (optional)", key="q_name", help="default: the method and bits")
        own_prompts = False
        if bundle.text_conditioned:
            own_prompts = st.checkbox("Calibrate on the sidebar's prompts", value=False, key="q_own_prompts",
                                      help="default: the bundled calibration set (64 prompts written for it, cycled "
                                           "over the calibration images); evaluations use other prompts")
            st.caption("The text encoder and the VAE stay in FP: only the denoiser is quantized.")
        st.markdown("**Reconstruction** (block-wise optimization after calibration)")
        fields.update(option_grid([o for o in common if o.group == "recon"], "q_"))
        go = st.form_submit_button("Quantize", type="primary")
    if not go:
        return None
    prompts = tuple(current_prompts()) if own_prompts else None
    return dict(method=method, options=options, **fields), int(cal_samples), int(cal_steps), name.strip(), prompts


def _calibration(bundle, spec):
    """FP calibration inputs for (model, device, precision, spec): the same for every session, so sampled once
    per process and shared (quantization reads them, never changes them)."""
    from analysis.app_state import FP_CALIBRATION, model_key
    from analysis.quantization.calibration import calibrate

    def _sample():
        bar, on_step = progress_callback("Sampling calibration inputs: step")
        cal = calibrate(bundle, spec, on_step=on_step)
        bar.empty()
        return cal

    waiting = st.empty()
    shared = FP_CALIBRATION.get((model_key(bundle), spec), _sample, on_wait=lambda: waiting.info(
        "Another session is sampling these calibration inputs; they are used here as soon as they are done."))
    waiting.empty()
    return shared.value


def _quantize(bundle, fields: dict, samples: int, steps: int, name: str, prompts: tuple | None = None) -> None:
    from analysis.quantization.calibration import CalibrationSpec
    from analysis.quantization.pipeline import quantize_bundle, unmatched_excludes
    from quant.api import QuantConfig

    try:
        config = QuantConfig(**fields)
        spec = CalibrationSpec(images=samples, steps=steps, prompts=prompts,
                               negative_prompt=bundle.negative_prompt if bundle.text_conditioned else None)
    except ValueError as exc:
        st.error(f"Bad option: {exc}")
        return
    unmatched = unmatched_excludes(bundle.denoiser, config.exclude)
    if unmatched:
        example = ("a pattern such as *.conv2 or a module name such as down_blocks.0 (layer names look like "
                   "down_blocks.0.resnets.0.conv1)" if bundle.family == "unet" else
                   "a pattern such as *.ff.net.2 or a module name such as transformer_blocks.0 (layer names look "
                   "like transformer_blocks.0.attn1.to_q)")
        st.error(f"'{unmatched[0]}' in 'Keep in float' matches no layer of this model. Use {example}.")
        return
    cal = _calibration(bundle, spec)
    if config.recon != "none" and config.recon_rows > len(cal):
        st.warning(f"Calibration rows: {config.recon_rows} asked, but the calibration set holds {len(cal)} rows "
                   f"(images x steps x {len(cal) // max(1, samples * steps)} halves), so the optimization uses "
                   f"all {len(cal)}. Raise the calibration images or steps for more.")
    bar = st.progress(0.0, text="Quantizing ...")
    live = st.empty()
    try:
        variant = quantize_bundle(bundle, config, cal, on_progress=lambda stage, f: bar.progress(f, text=stage),
                                  on_recon=_live_loss(live, config.recon) if config.recon != "none" else None)
    except (ValueError, RuntimeError) as exc:  # the engine's errors are messages for the user
        bar.empty()
        live.empty()
        st.error(f"Quantization failed: {exc}")
        return
    bar.empty()
    live.empty()
    if name:
        variant = dataclasses.replace(variant, name=name)
    from analysis.app_state import model_key

    variants = st.session_state.setdefault("variants", {})
    origins = st.session_state.setdefault("variant_origin", {})
    if variant.name in variants and tuple(origins.get(variant.name, ())) != model_key(bundle):
        # the same setting made from another model or precision: both are kept, under names that say which
        name, _, dtype = model_key(bundle)
        variant = dataclasses.replace(variant, name=f"{variant.name} ({name.removeprefix('bundled:')}, {dtype})")
    if variant.name in variants:
        st.info(f"Replaced the earlier variant named '{variant.name}'.")
    variants[variant.name] = variant
    # which FP model (source, device, precision) it came from: shown only beside that model
    origins[variant.name] = model_key(bundle)
    st.session_state["q_pick"] = variant.name  # show the new variant (set before the picker is drawn)


def _live_loss(placeholder, mode: str, every_s: float = 0.5):
    """on_recon callback: collect each unit's loss points and redraw the loss chart at most every `every_s`."""
    import time

    from analysis.plots.recon import recon_loss_figure

    losses: dict[str, list] = {}
    last = [0.0]

    def on_recon(k: int, n: int, it: int, loss: float) -> None:
        losses.setdefault(f"unit {k + 1}/{n}", []).append([it, loss])
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            placeholder.plotly_chart(recon_loss_figure(losses, mode), width="stretch")
    return on_recon


def _show_recon(recon: dict) -> None:
    from analysis.plots.recon import recon_error_figure, recon_loss_figure

    st.subheader("Reconstruction")
    units = recon["units"]
    blocks = [u for u in units if u["iterations"]]
    improved = sum(u["error_after"] < u["error_before"] for u in blocks)
    st.caption(f"{recon['mode']}: {len(units)} units, {improved} of {len(blocks)} trained units closer to FP, "
               f"{recon['rows']} calibration rows, {recon['seconds']:.1f} s")
    c1, c2 = st.columns(2)
    c1.plotly_chart(recon_loss_figure({u["name"]: u["losses"] for u in units}, recon["mode"]), width="stretch")
    c2.plotly_chart(recon_error_figure(units, recon["mode"]), width="stretch")


def _default_group(salience: dict) -> int:
    """The group whose activation maxima are most uneven before folding: where balancing matters most."""
    import torch

    from quant.measures import outlier_ratio

    ratios = [float(outlier_ratio(torch.as_tensor(s["x_before"]))) for s in salience.values()]
    return max(range(len(ratios)), key=ratios.__getitem__) if ratios else 0


def _show(bundle, variants: dict) -> None:
    from analysis.plots.quant import (
        layer_error_figure,
        salience_before_after,
        ssc_figure,
        timestep_error_figure,
        vector_figure,
    )

    from analysis.app_state import model_key, owned_variants, produced_by
    from quant.measures import step_median

    names = owned_variants(variants, st.session_state.get("variant_origin", {}), model_key(bundle))
    if not names:
        return
    if st.session_state.get("q_pick") not in names:
        st.session_state["q_pick"] = names[-1]
    pick = st.selectbox("Variant", names, key="q_pick")
    v = variants[pick]
    r = v.report
    m1, m2, m3, m4 = st.columns(4)
    held = r.rel_rms_basis == "held_out"
    headline = r.rel_rms_step_median if r.rel_rms_step_median is not None else r.rel_rms
    in_sample = step_median(r.rel_rms_per_timestep_in_sample) if r.rel_rms_per_timestep_in_sample else None
    m1.metric("Median step error vs FP", f"{headline:.4f}",
              delta=(f"held-out seeds; in sample {in_sample:.4f}" if held and in_sample is not None
                     else "calibration inputs"), delta_color="off",
              help="||eps_q - eps|| / ||eps|| of the noise prediction at each timestep, median over the timesteps "
                   "(the curve below shows every step), on an FP sampling run from seeds calibration never saw "
                   "(in sample: on the calibration inputs; a gap means over-fitting). Pooled over all timesteps it "
                   f"reads {r.rel_rms:.4f}: the last steps, where the noise left in x_t is below one quantization "
                   "step, dominate that pooled value while costing the image little.")
    m2.metric("Layers quantized", r.layers_quantized)
    m3.metric("Stored weights", f"{r.weight_bytes / 2 ** 20:.2f} MiB",
              delta=f"{r.weight_bytes / r.fp_weight_bytes - 1:+.0%} vs FP", delta_color="inverse")
    m4.metric("Quantize time", f"{r.seconds:.1f} s", help=f"CPU time {r.cpu_seconds:.1f} s; calibration "
                                                          f"sampling not included")
    inputs = "UNet" if bundle.family == "unet" else "transformer"
    cal = r.calibration or {}
    cal_text = f"{cal['images']} images x {cal['steps']} steps, " if "images" in cal and "steps" in cal else ""
    st.caption(f"{v.config.label}, quantized from {produced_by(model_key(bundle))}; calibrated on {cal_text}"
               f"{r.calibration_rows} {inputs} inputs over {len(r.rel_rms_per_timestep)} timesteps.")
    st.plotly_chart(timestep_error_figure({n: variants[n].report.rel_rms_per_timestep for n in names}),
                    width="stretch")
    if r.balance:
        _show_balance(r.balance, v.config.method)
    salience = r.salience
    if salience:
        groups = list(salience)
        c1, c2 = st.columns([3, 1])
        verb = FOLD_VERB.get(v.config.method.split("+")[0], "Scaled")
        group = c1.selectbox(f"{verb} group (input shared by its layers)", groups,
                             index=_default_group(salience), key="q_group",
                             help="to_q/k/v share one vector (qkv); to_out.0 and fc1 (ff.net.0.proj) have their own")
        sort = c2.checkbox("Sort channels by salience", key="q_sort")
        st.plotly_chart(salience_before_after(salience[group], group, sort=sort), width="stretch")
        c1, c2 = st.columns(2)
        if group in r.vectors:
            c1.plotly_chart(vector_figure(r.vectors[group], group, v.config.method), width="stretch")
        else:
            c1.info("This method folds no vector: channel maxima are unchanged (plain PTQ).")
        if group in r.ssc:
            c2.plotly_chart(ssc_figure(r.ssc[group], group), width="stretch")
    _show_methods(r)
    st.plotly_chart(layer_error_figure(r.layer_error, title=f"{pick}: per-layer relative output error"),
                    width="stretch")
    if r.recon:
        _show_recon(r.recon)
    _download(v)


def _show_methods(r) -> None:
    """What a rotation, a low-rank branch or a rounding method did (method_views, kept in the report)."""
    from analysis.plots.quant import rotation_histogram_figure, spectrum_figure

    methods = r.methods or {}
    hists = r.rotation_histograms or {}
    if hists:
        rot = methods["rotation"]
        st.subheader("Rotation")
        st.caption(f"{len(rot['folded'])} layers rotated for free (folded into their producer), "
                   f"{len(rot['online'])} online by a fast Walsh-Hadamard transform; constructions: "
                   f"{', '.join(sorted(set(rot['kinds'].values())))}.")
        # the layer whose range the rotation shrinks most
        best = max(hists, key=lambda n: max(hists[n]["absmax_before"]) / max(max(hists[n]["absmax_after"]), 1e-12))
        layer = st.selectbox("Rotated layer", list(hists), index=list(hists).index(best), key="q_rot_layer")
        st.plotly_chart(rotation_histogram_figure(hists[layer], layer), width="stretch")
    low = methods.get("lowrank")
    if low and low["spectra"]:
        st.subheader("Low-rank branch")
        st.caption(f"rank {low['rank']} on {len(low['costs'])} layers: {low['extra_bytes'] / 2 ** 10:.0f} KiB of "
                   f"16-bit factors, {low['extra_flops_per_position'] / max(low['layer_flops_per_position'], 1):.0%} "
                   "extra FLOPs over the quantized GEMMs per token.")
        names = list(low["spectra"])
        layer = st.selectbox("Layer", names, key="q_svd_layer")
        st.plotly_chart(spectrum_figure(low["spectra"][layer], low["costs"][layer]["rank"], layer), width="stretch")
    rnd = methods.get("rounding")
    if rnd:
        st.caption(f"{rnd['method']}: output error of the rounded weights {rnd['error_ratio']:.2f}x that of "
                   f"round-to-nearest (sum over layers of tr(E H E^T)), {rnd['seconds']:.1f} s.")


# What the folded per-channel vector does, in each method's words (DilateQuant dilates weights, it does not balance).
FOLD_VERB = {"dilatequant": "Dilated", "ptq4dit": "Balanced", "smoothquant": "Smoothed"}


def _show_balance(plan: dict, method: str) -> None:
    """Which layers took a folded per-channel scale, and why every other layer did not."""
    import pandas as pd

    verb = FOLD_VERB.get(method.split("+")[0], "Scaled")
    n_bal = sum(len(g["layers"]) for g in plan["balanced"])
    with st.expander(f"{verb} layers: {n_bal} of {plan['layers']} ({plan['foldable_layers']} can take a scale "
                     f"that folds exactly into the layer producing their input, {plan['foldable_share']:.0%})"):
        column = verb.lower()
        rows = [{"layer": name, column: True, "why": f"scale folds into {g['producer']} ({g['group']})"}
                for g in plan["balanced"] for name in g["layers"]]
        rows += [{"layer": name, column: False, "why": why} for name, why in plan["unbalanced"].items()]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _download(v) -> None:
    from analysis.quantization.pipeline import saved_zip

    key = ("q_zip", v.name, id(v))
    if st.button("Prepare the model for download", key="q_prepare",
                 help="a zip of the model folder; unzip it and load it with `--model FOLDER` or in the sidebar"):
        with st.spinner("Saving ..."):
            st.session_state["q_zip"] = (key, saved_zip(v, st.session_state.get("model_source")))
    ready = st.session_state.get("q_zip")
    if ready is not None and ready[0] == key:
        st.download_button("Download (.zip)", ready[1], file_name=f"{v.name.replace(' ', '_')}.zip",
                           mime="application/zip", key="q_download")


bundle = current_bundle()
if bundle is not None:
    if bundle.quant_config:
        st.warning(f"{bundle.name} is already quantized; pick its FP model in the sidebar to quantize it.")
    else:
        request = _form(bundle)
        if request is not None:
            _quantize(bundle, *request)
        _show(bundle, st.session_state.get("variants", {}))
