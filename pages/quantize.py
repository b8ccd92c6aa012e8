"""Quantize: pick a method and bit-widths, quantize a copy of the model, and see what the method did.

Each result is kept in st.session_state["variants"] (name -> analysis.quantize_pipeline.Variant), which the
Compare page reads. The cached FP bundle is shared by every session and is never modified: quantize_bundle
works on a copy.
"""
from __future__ import annotations

import dataclasses

import streamlit as st

from pages._shared import current_bundle, progress_callback

METHOD_HELP = {
    "baseline": "plain post-training quantization: static min-max (or searched) ranges, no channel balancing",
    "smoothquant": "SmoothQuant: b_j = s(X_j)^alpha / s(W_j)^(1-alpha), folded into the producing layer",
    "ptq4dit": "PTQ4DiT: channel salience balancing (CSB) with Spearman-weighted salience over timesteps (SSC)",
    "dilatequant": "DilateQuant: weight dilation (WD) from the weights alone, with per-timestep activation "
                   "ranges (TPQ) on by default",
}
BITS = [2, 3, 4, 5, 6, 7, 8, 16]
TPQ_CHOICES = {"method default": None, "on": True, "off": False}
RECON_HELP = {
    "none": "no block-wise optimization: the calibrated scales as they are",
    "adaround": "PTQ4DiT's reconstruction: learn each weight's rounding (AdaRound) and the activation step sizes "
                "block by block against the FP block (official: 20k iterations per block)",
    "bkd": "DilateQuant's block-wise distillation: train weights (straight-through rounding), weight steps and "
           "the per-timestep activation parameters block by block (paper: 5k iterations per block)",
}

st.title("Quantize")
st.caption("Quantize a copy of the model with one method and see what it does to the per-channel maxima "
           "(the outliers that stretch a quantizer's range), which vector it folds into the model, and the "
           "error it leaves per layer and per timestep. Results stay in this session for the Compare page.")


def _bits_label(b: int) -> str:
    return "16 (float)" if b == 16 else str(b)


def _form(bundle):
    from quant.config import RHO_MODES
    from quant.quantizers import SEARCHES

    with st.form("quantize_form"):
        c1, c2, c3, c4 = st.columns(4)
        method = c1.selectbox("Method", list(METHOD_HELP), index=2, key="q_method",
                              help="\n\n".join(f"**{k}**: {v}" for k, v in METHOD_HELP.items()))
        w_bits = c2.select_slider("Weight bits", BITS, value=8, format_func=_bits_label, key="q_w_bits")
        a_bits = c3.select_slider("Activation bits", BITS, value=8, format_func=_bits_label, key="q_a_bits")
        attn = c4.selectbox("Attention operand bits (q, k, v, softmax)", ["float", 8, 6, 4], key="q_attn")
        c1, c2, c3, c4 = st.columns(4)
        tpq = c1.selectbox("Per-timestep ranges (TPQ)", list(TPQ_CHOICES), key="q_tpq",
                           help="method default: on for dilatequant, off for the others")
        search = c2.selectbox("Range search", list(SEARCHES), key="q_search",
                              help="minmax, percentile clipping, or an MSE search over clip ratios")
        alpha = c3.slider("SmoothQuant alpha", 0.0, 1.0, 0.5, step=0.05, key="q_alpha",
                          help="used by smoothquant only: how much of the activation range moves to the weights")
        ssc = c4.checkbox("PTQ4DiT salience calibration (SSC)", value=True, key="q_ssc",
                          help="ptq4dit only: weight timesteps by softmax(-Spearman rho); off = plain max")
        c1, c2, c3, c4 = st.columns(4)
        rho_mode = c1.selectbox("SSC rho", list(RHO_MODES), key="q_rho",
                                help="per_timestep (default): one rho per timestep; per_sample: one per calibration "
                                     "row, as the official PTQ4DiT code")
        cal_samples = c2.number_input("Calibration images", 1, 256, 10, key="q_cal_samples",
                                      help="FP images sampled to record the transformer's inputs; reused by later "
                                           "runs with the same calibration settings")
        cal_steps = c3.number_input("Calibration DDIM steps", 2, 250, 50, key="q_cal_steps",
                                    help="TPQ keeps one range per step; sampling with another count uses the "
                                         "nearest calibrated timestep")
        name = c4.text_input("Variant name (optional)", key="q_name", help="default: the method and bits")
        exclude = st.text_input("Keep in float (comma-separated layer patterns)", key="q_exclude",
                                placeholder="e.g. pos_embed.proj, *.ff.net.2, transformer_blocks.0",
                                help="fnmatch patterns or module names; matching layers are not quantized")
        st.markdown("**Reconstruction** (block-wise optimization after calibration)")
        c1, c2, c3, c4 = st.columns(4)
        recon = c1.selectbox("Mode", list(RECON_HELP), key="q_recon",
                             help="\n\n".join(f"**{k}**: {v}" for k, v in RECON_HELP.items()))
        recon_iters = c2.number_input("Iterations per block", 1, 20000, 200, key="q_recon_iters",
                                      help="the default finishes in minutes on a CPU for the bundled model")
        recon_rows = c3.number_input("Calibration rows", 1, 100000, 256, key="q_recon_rows",
                                     help="transformer inputs drawn across timesteps from the calibration run")
        recon_batch = c4.number_input("Batch", 1, 1024, 32, key="q_recon_batch", help="rows per step (papers: 32)")
        go = st.form_submit_button("Quantize", type="primary")
    if not go:
        return None
    return dict(method=method, w_bits=w_bits, a_bits=a_bits, attn_bits=None if attn == "float" else int(attn),
                tpq=TPQ_CHOICES[tpq], scale_search=search, alpha=float(alpha), ssc=bool(ssc), ssc_rho=rho_mode,
                exclude=[p.strip() for p in exclude.split(",") if p.strip()], recon=recon,
                recon_iters=int(recon_iters), recon_rows=int(recon_rows), recon_batch=int(recon_batch)), \
        int(cal_samples), int(cal_steps), name.strip()


def _calibration(bundle, samples: int, steps: int):
    """FP calibration inputs, kept for the latest (model, samples, steps) so other methods reuse them."""
    from analysis.quantize_pipeline import calibration_for

    key = (bundle.name, samples, steps)
    cached = st.session_state.get("q_calibration")
    if cached is not None and cached[0] == key:
        return cached[1]
    bar, on_step = progress_callback("Sampling calibration inputs: step")
    cal = calibration_for(bundle, steps=steps, num_samples=samples, on_step=on_step)
    bar.empty()
    st.session_state["q_calibration"] = (key, cal)
    return cal


def _quantize(bundle, fields: dict, samples: int, steps: int, name: str) -> None:
    from analysis.quantize_pipeline import quantize_bundle, unmatched_excludes
    from quant.api import QuantConfig

    try:
        config = QuantConfig(**fields).validate()
    except ValueError as exc:
        st.error(f"Bad option: {exc}")
        return
    unmatched = unmatched_excludes(bundle.transformer, config.exclude)
    if unmatched:
        st.error(f"'{unmatched[0]}' in 'Keep in float' matches no layer. Use a pattern such as *.ff.net.2 or a "
                 "module name such as transformer_blocks.0 (layer names look like transformer_blocks.0.attn1.to_q "
                 "in a DiT, down_blocks.0.resnets.0.conv1 in a UNet).")
        return
    cal = _calibration(bundle, samples, steps)
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
    variants = st.session_state.setdefault("variants", {})
    if variant.name in variants:
        st.info(f"Replaced the earlier variant named '{variant.name}'.")
    variants[variant.name] = variant
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
    import numpy as np

    ratios = [float(np.max(s["x_before"]) / max(np.median(s["x_before"]), 1e-12)) for s in salience.values()]
    return int(np.argmax(ratios)) if ratios else 0


def _show(bundle, variants: dict) -> None:
    from analysis.plots.quant import (layer_error_figure, salience_before_after, ssc_figure, timestep_error_figure,
                                      vector_figure)

    names = [n for n, v in variants.items() if v.bundle.name.startswith(bundle.name)]
    if not names:
        return
    if st.session_state.get("q_pick") not in names:
        st.session_state["q_pick"] = names[-1]
    pick = st.selectbox("Variant", names, key="q_pick")
    v = variants[pick]
    r = v.report
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Relative error vs FP", f"{r['rel_error']:.4f}",
              help="||eps_q - eps|| / ||eps|| of the noise prediction over the calibration inputs")
    m2.metric("Layers quantized", r["layers_quantized"])
    m3.metric("Stored weights", f"{r['weight_bytes'] / 2 ** 20:.2f} MiB",
              delta=f"{r['weight_bytes'] / r['fp_weight_bytes'] - 1:+.0%} vs FP", delta_color="inverse")
    m4.metric("Quantize time", f"{r['seconds']:.1f} s", help=f"CPU time {r['cpu_seconds']:.1f} s; calibration "
                                                             f"sampling not included")
    st.caption(f"{v.config.label}; calibrated on {r['calibration_rows']} transformer inputs over "
               f"{len(r['rel_error_per_timestep'])} timesteps.")
    if r.get("balance"):
        _show_balance(r["balance"])
    salience = r["salience"]
    if salience:
        groups = list(salience)
        c1, c2 = st.columns([3, 1])
        group = c1.selectbox("Balanced group (input shared by its layers)", groups,
                             index=_default_group(salience), key="q_group",
                             help="to_q/k/v share one vector (qkv); to_out.0 and fc1 (ff.net.0.proj) have their own")
        sort = c2.checkbox("Sort channels by salience", key="q_sort")
        st.plotly_chart(salience_before_after(salience[group], group, sort=sort), width="stretch")
        c1, c2 = st.columns(2)
        if group in r["vectors"]:
            c1.plotly_chart(vector_figure(r["vectors"][group], group, v.config.method), width="stretch")
        else:
            c1.info("This method folds no vector: channel maxima are unchanged (plain PTQ).")
        if group in r["ssc"]:
            c2.plotly_chart(ssc_figure(r["ssc"][group], group), width="stretch")
    st.plotly_chart(layer_error_figure(r["layer_error"], title=f"{pick}: per-layer relative output error"),
                    width="stretch")
    st.plotly_chart(timestep_error_figure({n: variants[n].report["rel_error_per_timestep"] for n in names}),
                    width="stretch")
    if r.get("recon"):
        _show_recon(r["recon"])
    _download(v)


def _show_balance(plan: dict) -> None:
    """Which layers took a folded per-channel scale, and why every other layer did not."""
    import pandas as pd

    n_bal = sum(len(g["layers"]) for g in plan["balanced"])
    with st.expander(f"Balanced layers: {n_bal} of {plan['layers']} ({plan['foldable_layers']} can take a scale "
                     f"that folds exactly into the layer producing their input, {plan['foldable_share']:.0%})"):
        rows = [{"layer": name, "balanced": True, "why": f"scale folds into {g['producer']} ({g['group']})"}
                for g in plan["balanced"] for name in g["layers"]]
        rows += [{"layer": name, "balanced": False, "why": why} for name, why in plan["unbalanced"].items()]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _download(v) -> None:
    from analysis.quantize_pipeline import saved_zip

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
