"""Compare: FP and up to three quantized variants at the same seeds; errors per timestep; FID; run history."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._shared import current_bundle, current_prompts, intro, store
from quant.config import quantizes

MAX_VARIANTS = 3  # plus FP: four grids side by side
RUN_PREFIX = "run #"

st.title("Compare variants")
intro(
    "The FP model and up to three quantized variants draw the same classes from the same seeds, side by side. "
    "Differences are measured per image (PSNR vs FP), per sampling step (noise-prediction error on FP's inputs, "
    "and the drift of each variant's own x_t), and over many samples with FID; comparisons are kept in the run "
    "store, so they are still here after a reload.",
    why="**FID vs real** asks whether the images still look like the data: read it against the real-vs-real floor "
        "at the same N (the dashed line), what a perfect model would score. **FID vs FP** asks how far "
        "quantization moved the model from its own FP images at the same seeds; it is 0 for FP by construction. "
        "Bars carry 95% bootstrap intervals: variants whose intervals overlap are not told apart at this N. FID "
        "is sampled at the model's evaluation guidance (the FID protocol), not at the stronger guidance of the "
        "grids. PSNR of an image identical to FP's is infinite and reads *identical*.",
    math=[r"\mathrm{FID} = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - "
          r"2 (\Sigma_1 \Sigma_2)^{1/2}\big)",
          r"\mathrm{PSNR} = 10 \log_{10} \frac{1}{\mathrm{MSE}(x_q, x_{\mathrm{FP}})} \;\text{dB}"],
    links={"FID (Heusel et al., NeurIPS 2017)": "https://arxiv.org/abs/1706.08500",
           "PTQ4DiT's evaluation protocol": "https://arxiv.org/abs/2405.16005"})


def _quantized_from_run(bundle, run):
    """A stored run's model rebuilt from its recipe (config + calibration) on the current FP model, kept for
    this session: the model whose scores the run shows."""
    from analysis.quantization.pipeline import rebuild

    cache = st.session_state.setdefault("reloaded_variants", {})
    key = (bundle.name, run.id)
    if key not in cache:
        with st.spinner(f"Rebuilding {RUN_PREFIX}{run.id} ({run.label}) from its recipe ..."):
            cache[key] = rebuild(run, bundle)
    return cache[key]


# The form's settings, kept in the page's address after a comparison so a reload shows it again.
FORM_PARAMS = {"cmp_seeds": ("seeds", int), "cmp_steps": ("steps", int), "cmp_guidance": ("guidance", float),
               "cmp_fid_n": ("fid_n", int), "cmp_fid_guidance": ("fid_guidance", float)}


def _form_defaults(bundle) -> None:
    """Widget values for a fresh session: from the page's address when it holds a comparison (a reload),
    else the defaults (grid guidance = the FID protocol's guidance, so grids and FID show the same model)."""
    defaults = {"cmp_seeds": 2, "cmp_steps": 50, "cmp_guidance": float(bundle.eval_guidance), "cmp_fid_n": 0,
                "cmp_fid_guidance": float(bundle.eval_guidance)}
    for key, (param, cast) in FORM_PARAMS.items():
        if key not in st.session_state:
            try:
                st.session_state[key] = cast(st.query_params[param]) if param in st.query_params else defaults[key]
            except ValueError:  # an edited address: keep the default
                st.session_state[key] = defaults[key]
    if not bundle.conditional:
        st.session_state["cmp_guidance"] = 1.0


def compare_view(bundle) -> None:
    from analysis.app_state import model_key, owned_variants, produced_by
    from analysis.evaluation.compare import latest_comparison

    mkey = model_key(bundle)
    everything = st.session_state.get("variants", {})
    session_variants = {n: everything[n] for n in
                        owned_variants(everything, st.session_state.get("variant_origin", {}), mkey)}
    mine = st.session_state.setdefault("my_runs", set())
    cid = st.query_params.get("cmp")
    # after a reload: the comparison this page's address names (yours), never someone else's latest one; its runs
    # are yours again
    stored = latest_comparison(store(), bundle.name, comparison=cid) if cid else None
    if stored is not None:
        mine.update(stored["run_ids"])
    pending = st.session_state.pop("compare_add", None)
    kept = {*st.session_state.get("compare_pick", []), pending}
    everyone = st.toggle("List everyone's stored runs too", key="cmp_everyone",
                         help="off: your variants of this session and the runs you stored; on: every run in the "
                              "store for this model, newest first (each rebuilt from its recipe when picked)")
    runs, seen = [], set()
    for r in store().list(model=bundle.name):  # newest first: one entry per configuration, plus any picked one
        key = repr(sorted(r.config.items()))
        label = f"{RUN_PREFIX}{r.id} {r.label}"
        if not quantizes(r.method) or r.method == "custom" or not (everyone or r.id in mine or label in kept):
            continue
        if key not in seen or label in kept:
            seen.add(key)
            runs.append(r)
    options = list(session_variants) + [f"{RUN_PREFIX}{r.id} {r.label}" for r in runs]
    if "compare_pick" not in st.session_state:  # the session's own variants, preselected
        st.session_state["compare_pick"] = list(session_variants)[-MAX_VARIANTS:]
    st.session_state["compare_pick"] = [p for p in st.session_state["compare_pick"] if p in options]
    if pending and pending in options:
        picked = st.session_state["compare_pick"]
        st.session_state["compare_pick"] = (picked + [pending])[-MAX_VARIANTS:]
    if not options:
        st.info("No quantized variants yet: make some on the **Quantize** page (or list everyone's stored runs "
                "above). FP alone can still be sampled and scored below.")
    if bundle.quant_config:
        st.warning(f"The sidebar's model `{bundle.name}` is itself quantized ({bundle.quant_config.get('method')} "
                   f"W{bundle.quant_config.get('w_bits')}A{bundle.quant_config.get('a_bits')}): it stands where FP "
                   "stands below, so every 'vs FP' number is measured against it, not against a float model.")
    _form_defaults(bundle)
    with st.form("compare_form"):
        chosen = st.multiselect(f"Variants (up to {MAX_VARIANTS}, FP is always shown)", options,
                                key="compare_pick", max_selections=MAX_VARIANTS)
        c1, c2, c3, c4, c5 = st.columns(5)
        n_classes = min(bundle.num_classes, 10)
        seeds_per_class = c1.number_input("Seeds per prompt" if bundle.text_conditioned else "Seeds per class", 1, 8,
                                          key="cmp_seeds")
        steps = c2.slider("DDIM steps", 5, 100, step=5, key="cmp_steps")
        guidance = c3.slider("Grid guidance", 1.0, 8.0 if bundle.conditional else 1.0, step=0.5, key="cmp_guidance",
                             disabled=not bundle.conditional,
                             help="starts at the FID protocol's guidance, so the grids show the model FID scores")
        fid_n = c4.number_input("FID samples per model (0 = skip)", 0, 50000, step=256, key="cmp_fid_n",
                                help="FID below 2048 samples is biased; the count is shown next to every FID")
        fid_guidance = c5.number_input("FID guidance", 0.0, 20.0, step=0.25, key="cmp_fid_guidance",
                                       help="the FID protocol's guidance for this model (the value where FP's FID "
                                            "vs real is lowest); change it only to study guidance itself")
        save = st.checkbox("Save FID results to the run history", value=True)
        go = st.form_submit_button("Compare")
    if go:
        _run_comparison(bundle, chosen, session_variants, runs, int(seeds_per_class), int(steps), float(guidance),
                        int(fid_n), float(fid_guidance), save, n_classes)
    result = st.session_state.get("comparison")
    if result is not None and result["model_key"] == list(mkey):
        st.caption(f"Compared on {produced_by(mkey)}.")
        _show(result["view"])
        return
    if stored is not None:
        st.info(f"Your comparison of {stored['created']}, kept in the run store"
                + (f" ({stored['produced_by']})" if stored.get("produced_by") else "")
                + ". Press **Compare** for a new one.")
        _show(stored)


def _run_comparison(bundle, chosen, session_variants, runs, seeds_per_class, steps, guidance, fid_n, fid_guidance,
                    save, n_classes) -> None:
    from analysis.evaluation.compare import compare, comparison_view, grid_layout, latest_comparison, store_comparison
    from analysis.evaluation.evaluate import EvalOptions, evaluate_variants, score_row

    by_label = {f"{RUN_PREFIX}{r.id} {r.label}": r for r in runs}
    variants = {}
    try:
        for name in chosen:
            variants[name] = session_variants[name] if name in session_variants else \
                _quantized_from_run(bundle, by_label[name])
    except Exception as exc:  # the engine's errors are messages for the user
        st.error(f"Could not rebuild {name}: {exc}")
        return
    # a text-to-image model: one column per sidebar prompt (its table id stands where a class does)
    classes = bundle.prompt_ids(current_prompts()) if bundle.text_conditioned else list(range(n_classes))
    labels, seeds = grid_layout(classes, seeds_per_class)
    bar = st.progress(0.0, text="Sampling ...")
    share = 0.5 if fid_n else 1.0
    # a quantized folder loaded as the model is the reference here: named as what it is, not "FP"
    base = "FP" if not bundle.quant_config else f"{bundle.name} (loaded, quantized)"
    comparison = compare(bundle, variants, labels, seeds, steps=steps, guidance=guidance, base_name=base,
                         on_progress=lambda stage, f: bar.progress(min(1.0, share * f), text=stage))
    scores = None
    if fid_n:
        opts = EvalOptions(num_samples=fid_n, steps=steps, guidance=fid_guidance)
        try:
            results = evaluate_variants(bundle, {base: None, **variants}, opts, store=store() if save else None,
                                        on_progress=lambda stage, f: bar.progress(0.5 + 0.5 * f, text=stage))
            scores = [score_row(r) for r in results]
        except ValueError as exc:
            st.error(str(exc))
    bar.empty()
    from analysis.app_state import model_key, produced_by

    view = comparison_view(comparison, scores, ncol=len(classes))
    mine = st.session_state.setdefault("my_runs", set())
    mine.update(s["run_id"] for s in scores or [] if s.get("run_id") is not None)
    if save:  # kept in the run store, so the variants and this result survive a reload of the page
        cid = store_comparison(store(), bundle.name, view, comparison, variants,
                               produced_by=produced_by(model_key(bundle)))
        stored = latest_comparison(store(), bundle.name, comparison=cid)
        mine.update(stored["run_ids"] if stored else [])
        # the page's address names this comparison and its settings: a reload shows it again
        st.query_params.update(cmp=cid, seeds=str(seeds_per_class), steps=str(steps), guidance=str(guidance),
                               fid_n=str(fid_n), fid_guidance=str(fid_guidance))
    st.session_state["comparison"] = {"model": bundle.name, "model_key": list(model_key(bundle)), "view": view}


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _show(view: dict) -> None:
    from PIL import Image

    from analysis.plots.evaluation import drift_figure, metrics_figure, psnr_figure, step_error_figure

    rows = {r["model"]: r for r in view["rows"]}
    st.subheader(f"Samples: {view['steps']} DDIM steps, guidance {view['guidance']}; columns = classes (prompts for a text-to-image model), rows = seeds")
    st.caption("Hover a grid and press its fullscreen button to enlarge it; each grid downloads as a PNG.")
    names = view["names"]
    for start, name in enumerate(names):  # one grid a row: about 100 px a digit, readable on a projector
        r = rows[name]
        cap = name
        if r.get("label agreement") is not None:
            cap += f" · label agreement {r['label agreement']:.1%} (N={r['label agreement N']})"
        if name != names[0]:
            cap += f" · PSNR vs FP {r['PSNR vs FP (grid)']}"
        grid = view["grids"][name]
        image = grid if not isinstance(grid, (str, bytes)) and hasattr(grid, "save") else Image.open(grid)
        st.image(image, caption=cap, width="stretch")
        st.download_button(f"{name} grid (PNG)", _png(image), file_name=f"grid_{_file_name(name)}.png",
                           mime="image/png", key=f"grid_dl_{start}_{name}")
    if len(names) > 1 and view["step_error"]:
        c1, c2 = st.columns(2)
        c1.plotly_chart(step_error_figure(view["step_error"]), width="stretch")
        c1.caption("The error rises toward the last steps: near t = 0 the noise left in x_t has std "
                   "sqrt(1 - alpha_bar_t), 0.006-0.01 at t = 0 for the usual schedules, less than one activation "
                   "quantization step, so the noise prediction there is mostly lost. It costs little: at those "
                   "steps the sampler scales the noise prediction by that same small factor.")
        c2.plotly_chart(drift_figure(view["drift"]), width="stretch")
        st.plotly_chart(psnr_figure(view["image_errors"]), width="stretch")
    st.subheader("Metrics")
    scores = view.get("scores")
    if scores:
        for w in {s["warning"] for s in scores if s.get("warning")}:
            st.warning(w)
        st.plotly_chart(metrics_figure(scores), width="stretch")
    else:
        st.caption("FID was not computed (set 'FID samples per model' above). Label agreement and PSNR are on "
                   f"the {view['n_images']} grid images.")
    table = pd.DataFrame(view["rows"])
    st.dataframe(rounded(table), hide_index=True, width="stretch")
    st.download_button("Metrics as CSV", table.to_csv(index=False), file_name="comparison_metrics.csv",
                       mime="text/csv", key="cmp_csv")
    st.caption("forward ms: the median of repeated forwards of each model on the same batch, with the fastest and "
               "slowest beside it (a wide range means the machine was busy: compare medians of one run only); "
               "forward peak MiB: memory above the start, timed here "
               "(fake-quantized models compute in float, so they are not faster; `dqlab sample --int8` and "
               "`dqlab bench` run W8A8 in real int8). weights MiB: the stored size at the model's bit-width.")


def rounded(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Float columns to `digits` significant digits (10.0749 -> 10.07): what a reader compares, not float noise.
    The CSV download keeps the full values."""
    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: v if pd.isna(v) else float(f"{v:.{digits}g}"))
    return out


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def history_view(bundle) -> None:
    runs = store().list()
    if not runs:
        st.info(f"No stored runs yet in {store().data_dir}. Runs are stored by `dqlab eval` and by comparisons "
                "with FID.")
        return
    mine = st.session_state.get("my_runs", set())
    everyone = st.toggle("Everyone's runs", key="hist_everyone",
                         help="off: the runs you stored in this session; on: every run in the store (other people's, "
                              "and `dqlab eval` / `dqlab sweep` runs)")
    if not everyone:
        runs = [r for r in runs if r.id in mine]
        if not runs:
            st.info("You have not stored a run in this session yet (comparisons with FID are stored). Switch on "
                    "**Everyone's runs** to browse the whole run store.")
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
    st.dataframe(rounded(df), hide_index=True, width="stretch")
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
    from analysis.evaluation.metrics import fid_text

    s = run.summary()
    m1.metric(f"FID vs real (N={run.num_samples})", fid_text(run.fid, s["fid_interval"]),
              help=None if s["fid_floor"] is None else f"real-vs-real floor at this N: {s['fid_floor']:.2f}")
    m2.metric(f"FID vs FP (N={run.num_samples})", fid_text(run.fid_vs_fp, s["fid_vs_fp_interval"]))
    m3.metric(f"Label agreement (N={run.num_samples})",
              "n/a" if run.label_agreement is None else f"{run.label_agreement:.1%}")
    m4.metric("Seconds (whole job)", f"{run.timings.get('total', 0):.0f}")
    if s.get("ssim_vs_fp") is not None:
        from analysis.evaluation.per_seed import per_seed_text

        st.caption(f"Per seed vs FP (N={run.num_samples}, 95% intervals): {per_seed_text(s)}")
    if run.metrics.get("warning"):
        st.warning(run.metrics["warning"])
    cols = st.columns(2)
    for col, (name, caption) in zip(cols, [("grid.png", run.label), ("fp_grid.png", "FP, same seeds")]):
        if name in run.files and run.files[name].exists():
            col.image(str(run.files[name]), caption=caption)
    with st.expander("Configuration, timings and versions"):
        st.json({"config": run.config, "metrics": run.metrics, "timings": run.timings, "versions": run.versions,
                 "steps": run.steps, "guidance": run.guidance, "scheduler": run.scheduler})
    if run.model == bundle.name and quantizes(run.method) and run.method != "custom":
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
