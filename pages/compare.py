"""Compare: FP and up to three quantized variants at the same seeds; errors per timestep; FID; run history."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._shared import current_bundle

MAX_VARIANTS = 3  # plus FP: four grids side by side
RUN_PREFIX = "run #"

st.title("Compare variants")
st.caption("The FP model and quantized variants generate the same classes from the same seeds. Differences are "
           "measured per image (PSNR vs FP), per sampling step (noise-prediction error on FP's inputs, and the "
           "drift of each variant's own x_t), and over many samples with FID.")
with st.expander("Which FID answers what"):
    st.markdown("**FID vs real** asks whether the images still look like the data: read it against the "
                "real-vs-real floor at the same N (the dashed line; two disjoint sets of real images), which is "
                "what a perfect model would score. **FID vs FP** asks how far quantization moved the model from "
                "its own FP images at the same seeds; it is 0 for FP by construction. Bars carry 95% bootstrap "
                "intervals: variants whose intervals overlap are not told apart at this N. FID is sampled at the "
                "model's evaluation guidance (the FID protocol), not at the stronger guidance of the grids.")


@st.cache_resource
def _store(data_dir: str | None):
    """The run store (one per data folder). Reads and writes are transactional, so sharing it is safe."""
    from analysis.store import Store

    return Store(data_dir)


def store():
    import os

    from analysis.store import DATA_ENV

    return _store(os.environ.get(DATA_ENV) or None)


def _quantized_from_run(bundle, run):
    """A stored run's model rebuilt from its recipe (config + calibration) on the current FP model, kept for
    this session: the model whose scores the run shows."""
    from analysis.quantize_pipeline import rebuild

    cache = st.session_state.setdefault("reloaded_variants", {})
    key = (bundle.name, run.id)
    if key not in cache:
        with st.spinner(f"Rebuilding {RUN_PREFIX}{run.id} ({run.label}) from its recipe ..."):
            cache[key] = rebuild(run, bundle)
    return cache[key]


def _grid(images, ncol):
    from analysis.images import make_grid

    return make_grid(images, ncol=ncol)


def compare_view(bundle) -> None:
    session_variants = {name: v for name, v in st.session_state.get("variants", {}).items()}
    runs = [r for r in store().list(model=bundle.name) if r.method not in ("fp", "custom")]
    options = list(session_variants) + [f"{RUN_PREFIX}{r.id} {r.label}" for r in runs]
    pending = st.session_state.pop("compare_add", None)
    if pending and pending in options:
        picked = [p for p in st.session_state.get("compare_pick", []) if p in options]
        st.session_state["compare_pick"] = (picked + [pending])[-MAX_VARIANTS:]
    if not options:
        st.info("No quantized variants yet: make some on the **Quantize** page, or run `dqlab eval` to store "
                "some. FP alone can still be sampled and scored below.")
    with st.form("compare_form"):
        chosen = st.multiselect(f"Variants (up to {MAX_VARIANTS}, FP is always shown)", options,
                                key="compare_pick", max_selections=MAX_VARIANTS)
        c1, c2, c3, c4, c5 = st.columns(5)
        n_classes = min(bundle.num_classes, 10)
        seeds_per_class = c1.number_input("Seeds per class", 1, 8, 2)
        steps = c2.slider("DDIM steps", 5, 100, 50, step=5)
        guidance = c3.slider("Grid guidance", 1.0, 8.0, float(bundle.default_guidance), step=0.5)
        fid_n = c4.number_input("FID samples per model (0 = skip)", 0, 50000, 0, step=256,
                                help="FID below 2048 samples is biased; the count is shown next to every FID")
        fid_guidance = c5.number_input("FID guidance", 0.0, 20.0, float(bundle.eval_guidance), step=0.25,
                                       help="the FID protocol's guidance for this model (the value where FP's FID "
                                            "vs real is lowest); change it only to study guidance itself")
        save = st.checkbox("Save FID results to the run history", value=True)
        go = st.form_submit_button("Compare")
    if go:
        _run_comparison(bundle, chosen, session_variants, runs, int(seeds_per_class), int(steps), float(guidance),
                        int(fid_n), float(fid_guidance), save, n_classes)
    result = st.session_state.get("comparison")
    if result is not None and result["model"] == bundle.name:
        _show(result)


def _run_comparison(bundle, chosen, session_variants, runs, seeds_per_class, steps, guidance, fid_n, fid_guidance,
                    save, n_classes) -> None:
    from analysis.compare import compare, grid_layout
    from analysis.evaluate import EvalOptions, evaluate_variants, score_row

    by_label = {f"{RUN_PREFIX}{r.id} {r.label}": r for r in runs}
    variants = {}
    try:
        for name in chosen:
            variants[name] = session_variants[name] if name in session_variants else \
                _quantized_from_run(bundle, by_label[name])
    except Exception as exc:  # the engine's errors are messages for the user
        st.error(f"Could not rebuild {name}: {exc}")
        return
    classes = list(range(n_classes))
    labels, seeds = grid_layout(classes, seeds_per_class)
    bar = st.progress(0.0, text="Sampling ...")
    share = 0.5 if fid_n else 1.0
    comparison = compare(bundle, variants, labels, seeds, steps=steps, guidance=guidance,
                         on_progress=lambda stage, f: bar.progress(min(1.0, share * f), text=stage))
    scores = None
    if fid_n:
        opts = EvalOptions(num_samples=fid_n, steps=steps, guidance=fid_guidance)
        try:
            results = evaluate_variants(bundle, {"FP": None, **variants}, opts, store=store() if save else None,
                                        on_progress=lambda stage, f: bar.progress(0.5 + 0.5 * f, text=stage))
            scores = [score_row(r) for r in results]
        except ValueError as exc:
            st.error(str(exc))
    bar.empty()
    st.session_state["comparison"] = {"model": bundle.name, "comparison": comparison, "scores": scores,
                                      "ncol": len(classes)}


def _show(result: dict) -> None:
    from analysis.compare import comparison_table
    from analysis.plots.evaluation import drift_figure, metrics_figure, psnr_figure, step_error_figure

    cmp, scores = result["comparison"], result["scores"]
    rows, agreement = comparison_table(cmp, scores)
    psnr = {r["variant"]: r["psnr_vs_fp"] for r in rows}
    st.subheader(f"Samples: {cmp.steps} DDIM steps, guidance {cmp.guidance}; columns = classes, rows = seeds")
    cols = st.columns(len(cmp.names))
    for col, name in zip(cols, cmp.names):
        cap = f"{name}"
        value, n = agreement[name]
        if value is not None:
            cap += f" · label agreement {value:.1%} (N={n})"
        if name != cmp.names[0]:
            cap += f" · PSNR vs FP {psnr[name]}"
        col.image(_grid(cmp.images[name], result["ncol"]), caption=cap, width="stretch")
    if len(cmp.names) > 1:
        c1, c2 = st.columns(2)
        c1.plotly_chart(step_error_figure(cmp.step_error), width="stretch")
        c1.caption("The error rises toward the last steps: near t = 0 the noise left in x_t has std "
                   "sqrt(1 - alpha_bar_t), 0.006-0.01 at t = 0 for the usual schedules, less than one activation "
                   "quantization step, so the noise prediction there is mostly lost. It costs little: at those "
                   "steps the sampler scales the noise prediction by that same small factor.")
        c2.plotly_chart(drift_figure(cmp.drift), width="stretch")
        st.plotly_chart(psnr_figure(cmp.image_errors), width="stretch")
    st.subheader("Metrics")
    if scores:
        for w in {s["warning"] for s in scores if s.get("warning")}:
            st.warning(w)
        st.plotly_chart(metrics_figure(scores), width="stretch")
    else:
        st.caption("FID was not computed (set 'FID samples per model' above). Label agreement and PSNR are on "
                   f"the {len(cmp.labels)} grid images.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption("forward_ms / forward_peak_mib: each model's transformer forward on the same batch, timed here "
               "(fake-quantized models compute in float, so they are not faster; `dqlab sample --int8` and "
               "`dqlab bench` run W8A8 in real int8). weights_mib: the stored size at the model's bit-width.")


def history_view(bundle) -> None:
    runs = store().list()
    if not runs:
        st.info(f"No stored runs yet in {store().data_dir}. Runs are stored by `dqlab eval` and by comparisons "
                "with FID.")
        return
    df = pd.DataFrame([r.summary() for r in runs])
    c1, c2, c3 = st.columns(3)
    models = c1.multiselect("Model", sorted(df["model"].unique()), key="hist_models")
    methods = c2.multiselect("Method", sorted(df["method"].unique()), key="hist_methods")
    min_n = c3.number_input("At least N samples", 0, 10 ** 6, 0, key="hist_min_n")
    keep = df["num_samples"] >= min_n
    if models:
        keep &= df["model"].isin(models)
    if methods:
        keep &= df["method"].isin(methods)
    df = df[keep]
    st.caption(f"{len(df)} of {len(runs)} runs (stored in {store().data_dir}). FID is comparable only between runs "
               "with the same N, feature extractor, steps and guidance.")
    st.dataframe(df, hide_index=True, width="stretch")
    if df.empty:
        return
    run_id = st.selectbox("Run", df["run_id"].tolist(),
                          format_func=lambda i: f"#{i} {df.set_index('run_id').loc[i, 'label']}", key="hist_pick")
    if st.button("Reload", key="hist_reload"):
        st.session_state["hist_loaded"] = int(run_id)
    loaded = st.session_state.get("hist_loaded")
    if loaded is None:
        return
    try:
        run = store().get(loaded)
    except ValueError as exc:
        st.error(str(exc))
        return
    st.subheader(f"Run #{run.id}: {run.label} on {run.model}")
    m1, m2, m3, m4 = st.columns(4)
    from analysis.metrics import fid_text

    s = run.summary()
    m1.metric(f"FID vs real (N={run.num_samples})", fid_text(run.fid, s["fid_interval"]),
              help=None if s["fid_floor"] is None else f"real-vs-real floor at this N: {s['fid_floor']:.2f}")
    m2.metric(f"FID vs FP (N={run.num_samples})", fid_text(run.fid_vs_fp, s["fid_vs_fp_interval"]))
    m3.metric(f"Label agreement (N={run.num_samples})",
              "n/a" if run.label_agreement is None else f"{run.label_agreement:.1%}")
    m4.metric("Seconds (whole job)", f"{run.timings.get('total', 0):.0f}")
    if run.metrics.get("warning"):
        st.warning(run.metrics["warning"])
    cols = st.columns(2)
    for col, (name, caption) in zip(cols, [("grid.png", run.label), ("fp_grid.png", "FP, same seeds")]):
        if name in run.files and run.files[name].exists():
            col.image(str(run.files[name]), caption=caption)
    with st.expander("Configuration, timings and versions"):
        st.json({"config": run.config, "metrics": run.metrics, "timings": run.timings, "versions": run.versions,
                 "steps": run.steps, "guidance": run.guidance, "scheduler": run.scheduler})
    if run.model == bundle.name and run.method not in ("fp", "custom"):
        if st.button("Add to comparison", key="hist_add"):
            st.session_state["compare_add"] = f"{RUN_PREFIX}{run.id} {run.label}"
            st.rerun()


bundle = current_bundle()
if bundle is not None:
    tab_compare, tab_history = st.tabs(["Compare", "History"])
    with tab_compare:
        compare_view(bundle)
    with tab_history:
        history_view(bundle)
