"""Sweep: which setting should I ship? A grid of methods x bits x options, its Pareto front, a recommendation,
and per-layer sensitivity for mixed precision.

Sweep points are stored in the run store as they finish, so a repeated or interrupted sweep reads them back.
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from analysis.app_state import model_key, produced_by
from analysis.evaluation.sweep import SWEEP_METHODS
from pages._shared import current_bundle, intro, store

BITS = ["W8A8", "W6A6", "W4A8", "W4A6", "W4A4"]
OPTION_HELP = {"default": "the method's own setting", "tpq": "one activation range per timestep (TPQ)",
               "adaround": "+ AdaRound reconstruction (PTQ4DiT), minutes per point on a CPU",
               "bkd": "+ block-wise distillation (DilateQuant), minutes per point on a CPU",
               "tpq+bkd": "TPQ with block-wise distillation on top, for any method (DilateQuant's TPQ and BKD)",
               "tpq+adaround": "TPQ with AdaRound reconstruction on top, for any method",
               "float-io": "the ends kept in float: the layers that read the noisy input and write the prediction "
                           "(a DiT's patch embedding and final layer, a UNet's conv_in and conv_out)",
               "keep8": "mixed precision: the K most sensitive layers at W8A8"}
QUALITY_LABELS = {"fid_vs_fp": "FID vs FP",
                  "rel_rms_step_median": "noise-prediction error vs FP (median over steps)",
                  "label_agreement_drop": "label agreement drop vs FP",
                  "same_digit_vs_fp": "same digit as FP (share of seeds)", "psnr_vs_fp": "PSNR vs FP (dB)",
                  "ssim_vs_fp": "SSIM vs FP"}
DEFAULT_TOLERANCES = {"fid_vs_fp": 10.0, "rel_rms_step_median": 0.1, "label_agreement_drop": 0.02,
                      "same_digit_vs_fp": 0.95, "psnr_vs_fp": 20.0, "ssim_vs_fp": 0.8}
MIN_STEPS = 10  # fewer sampling steps than this: the images (and FP's own label agreement) are poor
TABLE_COLUMNS = {"label": "setting", "on_front": "on front", "fid_vs_fp": "FID vs FP", "fid_vs_fp_ci": "FID vs FP 95% CI",
                 "fid": "FID vs real", "label_agreement": "label agreement",
                 "same_digit_vs_fp": "same digit as FP", "psnr_vs_fp": "PSNR vs FP (dB)", "ssim_vs_fp": "SSIM vs FP",
                 "rel_rms_step_median": "error vs FP (median over steps)",
                 "rel_rms": "rel_rms (held-out)", "rel_rms_in_sample": "rel_rms (in sample)",
                 "weight_mib": "weights (MiB)", "gbops": "GBOPs", "num_samples": "N", "seconds": "time (s)",
                 "source": "source", "run_id": "run"}

st.title("Sweep")
intro(
    "Which quantization setting should you ship? This page measures a grid of methods, bit-widths and options "
    "on one footing (one FP calibration set, one FP reference sample set at the same seeds), draws quality "
    "against cost with the **Pareto front**, and recommends the cheapest setting within the quality you can "
    "accept. The **Sensitivity** tab ranks layers by the damage each does when quantized, which builds "
    "mixed-precision settings.",
    why="A setting is worth shipping only if no other is both cheaper and better: those settings form the Pareto "
        "front, and the answer to *which one* is the cheapest point on it that meets your tolerance. Cost is "
        "counted in **bit-operations** (BOPs): a multiply-accumulate of a $b_w$-bit weight with a $b_a$-bit "
        "activation costs $b_w b_a$, summed over every layer's MACs (from its shape and the tokens it sees); and "
        "in stored weight bytes. Quality is **FID vs FP** (same labels and seeds, so it measures only what "
        "quantization moved), with its 95% bootstrap interval; the output error per timestep shows where in "
        "the denoising it goes wrong. Per-layer sensitivity (AIMET's QuantAnalyzer, here per timestep) "
        "quantizes one layer at a time with the rest in float, and the converse.",
    math=[r"\mathrm{BOPs} = \sum_{\ell} \mathrm{MACs}_\ell \; b_w^{(\ell)} \, b_a^{(\ell)}",
          r"p \text{ on the front} \iff \nexists\, q:\; \mathrm{cost}(q) \le \mathrm{cost}(p),\;"
          r"\mathrm{err}(q) \le \mathrm{err}(p),\; \text{one of them strict}",
          r"e_t = \frac{\lVert \epsilon_q(x_t, t) - \epsilon(x_t, t) \rVert}{\lVert \epsilon(x_t, t) \rVert}"],
    links={"PTQ4DiT (Wu et al., NeurIPS 2024)": "https://arxiv.org/abs/2405.16005",
           "DilateQuant (Liu et al., 2024)": "https://arxiv.org/abs/2409.14307",
           "Bayesian Bits (BOPs, van Baalen et al., 2020)": "https://arxiv.org/abs/2005.07093",
           "AIMET QuantAnalyzer": "https://quic.github.io/aimet-pages/releases/latest/featureguide/analysis%20tools/quant_analyzer.html"})


def _table(points: list[dict], front: list[str]) -> pd.DataFrame:
    rows = []
    for p in points:
        iv = p.get("fid_vs_fp_interval")
        rows.append({"label": p["label"], "on_front": "yes" if p["label"] in front else "",
                     "fid_vs_fp": p["fid_vs_fp"], "fid_vs_fp_ci": f"[{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "",
                     "fid": p["fid"], "label_agreement": p["label_agreement"],
                     "rel_rms_step_median": p.get("rel_rms_step_median"),
                     "same_digit_vs_fp": p.get("same_digit_vs_fp"), "psnr_vs_fp": p.get("psnr_vs_fp"),
                     "ssim_vs_fp": p.get("ssim_vs_fp"), "rel_rms": p["rel_rms"],
                     "rel_rms_in_sample": p.get("rel_rms_in_sample"),
                     "weight_mib": p["weight_bytes"] / 2 ** 20, "gbops": p["bops"] / 1e9,
                     "num_samples": p["num_samples"], "seconds": p["seconds"],
                     "source": "run store" if p["reused"] else "measured now", "run_id": p["run_id"]})
    return pd.DataFrame(rows).rename(columns=TABLE_COLUMNS)


def small_sample_hedges(res: dict, recommended: str | None, quality: str) -> list[str]:
    """Why a sweep's recommendation is only tentative: few samples, few steps, or an interval that overlaps
    the next cheaper point's (the two are not told apart at this N)."""
    from analysis.evaluation.metrics import MIN_RELIABLE_FID_SAMPLES

    spec, hedges = res["spec"], []
    if spec["num_samples"] < MIN_RELIABLE_FID_SAMPLES:
        hedges.append(f"N = {spec['num_samples']} is below {MIN_RELIABLE_FID_SAMPLES}: FID is biased upwards and "
                      "label agreement has a wide interval; confirm at N >= 2048 before shipping.")
    if spec["steps"] < MIN_STEPS:
        fp = next((p for p in res["points"] if p["method"] == "fp"), None)
        agree = fp and fp.get("label_agreement")
        hedges.append(f"{spec['steps']} sampling steps is below {MIN_STEPS}: the FP images themselves are poor"
                      + (f" (FP's label agreement {agree:.2f})" if agree is not None else "")
                      + ", so differences between settings say little.")
    rec = next((p for p in res["points"] if p["label"] == recommended), None)
    if rec is not None and quality == "fid_vs_fp" and rec.get("fid_vs_fp_interval"):
        lo, hi = rec["fid_vs_fp_interval"]
        near = [p["label"] for p in res["points"] if p is not rec and p["method"] != "fp"
                and p.get("fid_vs_fp_interval") and p["fid_vs_fp_interval"][0] <= hi and lo <= p["fid_vs_fp_interval"][1]]
        if near:
            hedges.append(f"Its FID vs FP interval overlaps {', '.join(near[:3])}"
                          + (" and others" if len(near) > 3 else "") + ": not told apart at this N.")
    return hedges


def sensitivity_hedges(sens: dict) -> list[str]:
    """Why a sensitivity ranking is only indicative: few sampling steps or few calibration images."""
    hedges = []
    if sens.get("steps", MIN_STEPS) < MIN_STEPS:
        hedges.append(f"{sens['steps']} sampling steps is below {MIN_STEPS}: the calibration trajectory is coarse, "
                      "and the ranking may change at the steps you will sample with.")
    if sens.get("images", 16) < 16:
        hedges.append(f"Measured on {sens['images']} calibration image{'s' if sens['images'] != 1 else ''}: units whose errors differ by a few percent "
                      "may swap places on another set; read the top of the ranking, not its order in detail.")
    return hedges


def sweep_tab(bundle) -> None:
    with st.form("sweep_form"):
        c1, c2, c3 = st.columns(3)
        methods = c1.multiselect("Methods", list(SWEEP_METHODS), default=["baseline", "dilatequant"], key="sw_methods")
        bits = c2.multiselect("Bit-widths", BITS, default=["W8A8", "W4A8", "W4A4"], key="sw_bits")
        options = c3.multiselect("Options", list(OPTION_HELP), default=["default"], key="sw_options",
                                 help="\n\n".join(f"**{k}**: {v}" for k, v in OPTION_HELP.items()))
        from quant.formats import FORMAT_NAMES

        formats = st.multiselect("Number formats", list(FORMAT_NAMES), default=["int"], key="sw_formats",
                                 help="each format runs at the bit-widths its weights hold (FP4 formats at W4, FP8 at "
                                      "W8), its activations where theirs do; int takes every bit-width")
        c1, c2, c3, c4, c5 = st.columns(5)
        n = c1.number_input("Samples per point (N)", 16, 50000, 512, step=64, key="sw_n",
                            help="FID below 2048 samples is biased upwards; compare only equal N")
        steps = c2.number_input("DDIM steps", 2, 250, 25, key="sw_steps")
        calib = c3.number_input("Calibration images", 1, 256, 10, key="sw_calib")
        k = c4.number_input("K for keep8 (layers at W8A8)", 1, 64, 4, key="sw_k")
        recon_iters = c5.number_input("Reconstruction iterations", 1, 20000, 200, key="sw_recon_iters",
                                      help="per unit, for the adaround and bkd options")
        go = st.form_submit_button("Run sweep")
    if go:
        from analysis.evaluation.sweep import SweepSpec, run_sweep

        opts = [f"keep8:{int(k)}" if o == "keep8" else o for o in options]
        spec = SweepSpec(methods=methods, bits=bits, options=opts, formats=formats, num_samples=int(n),
                         steps=int(steps),
                         calib_samples=int(calib), recon_iters=int(recon_iters))
        try:
            spec.validate()
        except ValueError as exc:
            st.error(f"Cannot run this sweep: {exc}")
            return
        total = spec.size() + 1
        overall = st.progress(0.0, text=f"Sweep: 0 of {total} points")
        within = st.empty()
        done = []

        def on_point(i, n_points, point):
            done.append(point)
            how = "read from the run store" if point["reused"] else f"measured in {point['seconds']:.0f} s"
            overall.progress(i / n_points, text=f"Sweep: {i} of {n_points} points ({point['label']}: {how})")

        def on_progress(stage, frac):
            within.caption(f"Now: {stage}")

        result = run_sweep(bundle, spec, store=store(), on_progress=on_progress, on_point=on_point)
        overall.empty()
        within.empty()
        st.session_state["sweep_result"] = {"model": bundle.name, "model_key": list(model_key(bundle)),
                                            **result.to_json()}
    res = st.session_state.get("sweep_result")
    if res is None or res.get("model_key") != list(model_key(bundle)):
        st.info("Pick the grid above and press **Run sweep**. On the bundled model a point takes about a minute at "
                "N = 512 on a CPU; points measured before with the same settings come from the run store at once.")
        return
    show_result(res)


def show_result(res: dict) -> None:
    from analysis.evaluation.sweep import pareto_front, recommend
    from analysis.plots.sweep import pareto_figure, sweep_timestep_figure

    points = res["points"]
    st.caption(f"{len(points)} points (FP included) on {produced_by(tuple(res['model_key']))}: "
               f"N = {res['spec']['num_samples']}, "
               f"{res['spec']['steps']} DDIM steps, guidance {res['guidance']:g}, calibration "
               f"{res['spec']['calib_samples']} images; {res['measured']} measured now, {res['reused']} read from "
               f"the run store, {res['seconds']:.0f} s.")
    c1, c2, c3, c4 = st.columns([2, 2, 2, 3])
    cost = c1.radio("Cost", ["bops", "weight_bytes"], format_func={"bops": "BOPs", "weight_bytes": "weight bytes"}.get,
                    horizontal=True, key="sw_cost")
    quality = c2.selectbox("Quality measure", list(QUALITY_LABELS), format_func=QUALITY_LABELS.get, key="sw_quality")
    from analysis.evaluation.sweep import HIGHER_IS_BETTER

    bound = "at least" if quality in HIGHER_IS_BETTER else "at most"
    tol = c3.number_input(f"Tolerance: {QUALITY_LABELS[quality]} {bound}", 0.0, 1e6, DEFAULT_TOLERANCES[quality],
                          key=f"sw_tol_{quality}", format="%.3f")
    front = pareto_front(points, cost, quality)
    rec = recommend(points, {quality: float(tol)}, cost=cost)
    hedges = small_sample_hedges(res, rec["label"], quality)
    with c4:
        st.markdown("**Recommendation**" + (" (tentative)" if hedges and rec["label"] else ""))
        if rec["label"] is None:
            st.warning(rec["reason"])
        elif hedges:
            st.warning(rec["reason"] + " Tentative: " + " ".join(hedges))
        else:
            st.success(rec["reason"])
        if rec["label"] is not None:  # a tentative pick still downloads: the reasons above say how far to trust it
            st.download_button("Download this config (JSON)", json.dumps(rec["config"], indent=2, sort_keys=True),
                               file_name=f"{rec['label'].replace(' ', '_').replace('/', '-')}.json",
                               mime="application/json", key="sw_dl_config",
                               help="pass it to `dqlab quantize --config FILE --out q/`")
    st.plotly_chart(pareto_figure(points, front, cost, quality, rec["label"]), key="sw_pareto")
    st.dataframe(_table(points, front), hide_index=True, width="stretch",
                 column_config={"FID vs FP": st.column_config.NumberColumn(format="%.2f"),
                                "FID vs real": st.column_config.NumberColumn(format="%.2f"),
                                "label agreement": st.column_config.NumberColumn(format="%.3f"),
                                "error vs FP (median over steps)": st.column_config.NumberColumn(format="%.4f"),
                                "FID vs FP 95% CI": st.column_config.TextColumn(),
                                "N": st.column_config.NumberColumn(format="%d"),
                                "same digit as FP": st.column_config.NumberColumn(format="%.3f"),
                                "PSNR vs FP (dB)": st.column_config.NumberColumn(format="%.2f"),
                                "SSIM vs FP": st.column_config.NumberColumn(format="%.3f"),
                                "rel_rms (held-out)": st.column_config.NumberColumn(format="%.4f"),
                                "rel_rms (in sample)": st.column_config.NumberColumn(format="%.4f"),
                                "weights (MiB)": st.column_config.NumberColumn(format="%.2f"),
                                "GBOPs": st.column_config.NumberColumn(format="%.2f"),
                                "time (s)": st.column_config.NumberColumn(format="%.0f")})
    st.download_button("Sweep as JSON", json.dumps(res, indent=2, default=str), file_name="sweep.json",
                       mime="application/json", key="sw_dl_json")
    st.plotly_chart(sweep_timestep_figure(points), key="sw_timesteps")


def sensitivity_tab(bundle) -> None:
    with st.form("sens_form"):
        c1, c2, c3, c4, c5, c6 = st.columns(6)
        method = c1.selectbox("Method", list(SWEEP_METHODS), key="se_method")
        w_bits = c2.selectbox("Weight bits", [2, 3, 4, 5, 6, 8], index=2, key="se_w")
        a_bits = c3.selectbox("Activation bits", [2, 3, 4, 5, 6, 8], index=2, key="se_a")
        gran = c4.selectbox("Unit", ["layer", "kind", "block"], key="se_gran",
                            help="one layer, all layers of one kind (e.g. every fc1), or one transformer block")
        steps = c5.number_input("DDIM steps", 2, 250, 25, key="se_steps")
        samples = c6.number_input("Calibration images", 1, 64, 4, key="se_samples")
        go = st.form_submit_button("Analyse")
    if go:
        from analysis.quantization.calibration import calibration_for
        from analysis.quantization.sensitivity import sensitivity

        bar = st.progress(0.0, text="Sampling the FP calibration set ...")
        cal = calibration_for(bundle, steps=int(steps), num_samples=int(samples))  # seeds apart from evaluation's
        sens = sensitivity(bundle, int(w_bits), int(a_bits), cal, method=method, granularity=gran,
                           on_progress=lambda stage, f: bar.progress(min(1.0, f), text=f"Sensitivity: {stage}"))
        bar.empty()
        st.session_state["sensitivity"] = {"model": bundle.name, "model_key": list(model_key(bundle)),
                                           "steps": int(steps), "images": int(samples), **sens.to_json()}
    sens = st.session_state.get("sensitivity")
    if sens is None or sens.get("model_key") != list(model_key(bundle)):
        st.info("Pick the bits and press **Analyse**: the model is quantized once, then each unit is switched "
                "alone (the rest in float) and the converse (all quantized but it), on the FP calibration inputs.")
        return
    show_sensitivity(sens)


def show_sensitivity(sens: dict) -> None:
    from analysis.plots.sweep import sensitivity_bars, sensitivity_heatmap

    st.caption(f"{len(sens['ranking'])} {sens['granularity']} units at W{sens['w_bits']}A{sens['a_bits']} "
               f"({sens['method']}) on {sens['calibration_rows']} calibration rows over {len(sens['timesteps'])} "
               f"timesteps, {sens['seconds']:.0f} s, on {produced_by(tuple(sens['model_key']))}. Errors are the "
               "noise prediction's relative error vs FP, median over timesteps; all quantized: "
               f"{sens.get('all_quantized_median', sens['all_quantized_mean']):.4f}.")
    for hedge in sensitivity_hedges(sens):
        st.warning(hedge)
    ts = ["mean"] + [str(t) for t in sens["timesteps"]]
    pick = st.select_slider("Timestep (noisiest first)", ts, value="mean", key="se_t")
    st.plotly_chart(sensitivity_bars(sens, None if pick == "mean" else int(pick)), key="se_bars")
    st.plotly_chart(sensitivity_heatmap(sens), key="se_heat")
    table = pd.DataFrame([{k: r[k] for k in ("rank", "unit", "layers", "error_only_this_quantized",
                                             "error_all_but_this_quantized", "error_removed_if_kept_float",
                                             "worst_timestep")} for r in sens["ranking"]])
    st.dataframe(table.rename(columns=lambda c: c.replace("_", " ")), hide_index=True, width="stretch",
                 column_config={c.replace("_", " "): st.column_config.NumberColumn(format=f)
                                for c, f in (("error_only_this_quantized", "%.4f"),
                                             ("error_all_but_this_quantized", "%.4f"),
                                             ("error_removed_if_kept_float", "percent"))})
    if (table["error_removed_if_kept_float"] < 0).any():
        st.caption("A negative 'error removed if kept float' means keeping that unit in float RAISED the "
                   "quantized model's error: quantization errors of different layers partly cancel, and taking "
                   "one of them away leaves the others' uncancelled. Such a unit gains nothing from more bits "
                   "on its own; the ranking (by the error it causes alone) is unaffected.")
    if sens["granularity"] == "layer":
        k = st.slider("Mixed precision: keep the K hardest layers at W8A8", 0, min(16, len(sens["ranking"])), 4,
                      key="se_k")
        from analysis.quantization.sensitivity import mixed_config, top_layers
        from quant.api import QuantConfig

        base = QuantConfig(method=sens["method"], w_bits=sens["w_bits"], a_bits=sens["a_bits"])
        config = mixed_config(base, top_layers(sens["ranking"], int(k))).to_dict()
        st.download_button(f"Download W{sens['w_bits']}A{sens['a_bits']} with {k} layers at W8A8 (JSON config)",
                           json.dumps(config, indent=2, sort_keys=True), file_name=f"mixed_k{k}.json",
                           mime="application/json", key="se_dl",
                           help="pass it to `dqlab quantize --config FILE`, or add keep8:K to a sweep to measure it")


bundle = current_bundle()
if bundle is not None:
    tab_sweep, tab_sens = st.tabs(["Sweep", "Sensitivity"])
    with tab_sweep:
        sweep_tab(bundle)
    with tab_sens:
        sensitivity_tab(bundle)
