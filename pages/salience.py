"""Salience: which input channels of each layer carry extreme values, at which timesteps, and in which operand."""
from __future__ import annotations

import streamlit as st

from pages._shared import current_bundle, current_prompts, intro, progress_callback

KEEP_COLLECTIONS = 3  # collected statistics kept per session, newest last (each key: model + settings)
BIT_CHOICES = [2, 3, 4, 5, 6, 8]
MAX_CSV_ROWS = 3_000_000
MAX_CACHED_FIGURES = 300  # figures kept per session (a few MB of plotly JSON)  # ~300 MB of CSV; larger statistics are better read from the .npz file

st.title("Salience")
intro(
    "Quantization fails first where a few **outlier channels** stretch a layer's range. Collect one sampling pass "
    "and see, for every linear and conv layer and timestep, which input channels carry extreme activations and "
    "weights and how that moves over the denoising; the page opens on the layer the ranking finds hardest.",
    why="A uniform quantizer with $b$ bits splits its range into $2^b - 1$ steps. Activations are quantized per "
        "tensor, so **one outlier channel** 20x larger than a typical one leaves the typical channels only a "
        "handful of steps (figure a shows the error per channel). In a diffusion model the outliers **move with "
        "the timestep** (b, c): one static range clips or wastes resolution somewhere, hence per-timestep "
        "quantizers. If extreme activations sit on channels with ordinary weights (low Spearman $\\rho$, d and e), "
        "a per-channel factor $b_j$ moves range from $X$ to $W$ without changing $Y$; PTQ4DiT's channel salience "
        "balancing picks $b_j$ so both sides peak at their geometric mean, weighting timesteps by how "
        "complementary they are. Figure (f) ranks layers by how far the largest channel stands above the median. "
        "A convolution (a UNet's resnets, samplers and shortcuts) is read the same way: its tokens are the spatial "
        "positions, and $s(W_j)$ is the max over output channels and kernel positions.",
    math=[r"s(X_j) = \max_{\text{tokens}} |X_j|, \qquad s(W_j) = \max_{o} |W_{oj}|",
          r"Y = X W^\top = \big(X \operatorname{diag}(b)^{-1}\big)\big(W \operatorname{diag}(b)\big)^\top, \qquad "
          r"b_j = \sqrt{\tilde s(X_j) / s(W_j)}",
          r"\eta_t = \operatorname{softmax}_t(-\rho_t), \qquad \tilde s(X_j) = \sum_t \eta_t\, s(X_j^{(t)})"],
    links={"PTQ4DiT (Wu et al., NeurIPS 2024)": "https://arxiv.org/abs/2405.16005",
           "SmoothQuant (Xiao et al., ICML 2023)": "https://arxiv.org/abs/2211.10438"})

def _figure(make, stats, *args, **kwargs):
    """A figure built once per collection and arguments: going back to a layer or timestep, and the figures
    that do not depend on the layer (d over every layer, f), cost nothing on a rerun."""
    cache = st.session_state.setdefault("salience_figures", {})
    key = (st.session_state.get("salience_current"), make.__name__, args, tuple(sorted(kwargs.items())))
    if key not in cache:
        if len(cache) > MAX_CACHED_FIGURES:
            cache.clear()
        cache[key] = make(stats, *[list(a) if isinstance(a, tuple) else a for a in args], **kwargs)
    return cache[key]


def formats_tab(bundle, stats, layer: str, t: int, rows_info: str) -> None:
    """(g): the layer's values at this timestep under INT / FP4 / MXFP4 / NVFP4 grids, and each format's error
    per channel (analysis.quantization.format_view), computed on demand."""
    from analysis.quantization.format_view import OPERANDS, TEACHING_FORMATS, format_view
    from analysis.plots.formats import format_channel_error, format_histogram
    from quant.formats import FORMAT_NAMES

    with st.form("formats_form"):
        f1, f2, f3, f4 = st.columns([1, 1, 2, 1])
        operand = f1.radio("Values", OPERANDS, horizontal=True, help="the layer's input activations at this "
                           "timestep, or its weight columns")
        channel = f2.number_input("Channel (empty: the largest)", min_value=0, value=None, step=1)
        formats = f3.multiselect("Formats", FORMAT_NAMES, default=list(TEACHING_FORMATS),
                                 help="int is drawn at the bits below; FP and block formats at their own")
        bits = f4.selectbox("int bits", [2, 3, 4, 5, 6, 8], index=2)
        go = st.form_submit_button("Compare formats")
    views = st.session_state.setdefault("format_views", {})
    key = (current_key(), layer, int(t), operand, channel, tuple(formats), int(bits))
    if go:
        try:
            with st.spinner("recording the layer's inputs and quantizing them"):
                views.clear()
                views[key] = format_view(bundle, layer, t, channel, formats or TEACHING_FORMATS, int(bits), operand,
                                         steps=int(stats.info.get("steps", 25)), samples=4,
                                         guidance=stats.info.get("guidance"))
        except ValueError as exc:
            st.error(f"Could not compare formats: {exc}")
    view = views.get(key)
    if view is None:
        st.info("Press **Compare formats**: the layer's values at this timestep are quantized to each format. "
                "An FP grid spends its codes near zero; a block scale (MXFP4: 32 values share a power of two; "
                "NVFP4: 16 share an FP8 scale under one tensor scale) keeps an outlier's damage inside its block.")
        return
    st.plotly_chart(format_histogram(view))
    st.plotly_chart(format_channel_error(view))
    st.caption(f"{len(view.values)} values of channel {view.channel}{rows_info}; block formats' grid is drawn at "
               "the median scale of the channel's blocks.")


def current_key():
    return st.session_state.get("salience_current")


@st.fragment
def viewer(stats, current, bundle=None) -> None:
    """Layer, timestep and figures: a change here reruns this part only, not the sidebar and the form."""
    from analysis.plots import salience as figs
    from analysis.plots.axes import readable_layer
    from analysis.salience.collect import layer_menu
    from analysis.salience.measures import layer_difficulty

    menu = layer_menu(stats.layers)
    if st.session_state.get("salience_opened") != current:
        # a new collection opens on the layer the ranking (figure f) finds hardest, not on the first one
        hardest = layer_difficulty(stats)["layer"].iloc[0]
        st.session_state["sal_group"] = next(g for g, keys in menu.items() if hardest in keys)
        st.session_state["sal_layer"] = hardest
        st.session_state["salience_opened"] = current
    if st.session_state.get("sal_group") not in menu:
        st.session_state["sal_group"] = next(iter(menu))
    v1, v2, v3, v4 = st.columns([1, 2, 2, 1])
    group = v1.selectbox("Block", list(menu), key="sal_group")
    if st.session_state.get("sal_layer") not in menu[group]:
        st.session_state["sal_layer"] = menu[group][0]
    layer = v2.selectbox("Layer", menu[group], format_func=readable_layer, key="sal_layer",
                         help="the page opens on the hardest layer of the ranking (tab f)")
    t = v3.select_slider("Timestep (noisiest first)", options=stats.timesteps.tolist(),
                         value=int(stats.timesteps[len(stats.timesteps) // 2]))
    bit = v4.radio("Bit-width", list(stats.mse_bits), horizontal=True) if stats.mse_bits else None
    if len(stats.halves) == 2:
        rows = st.radio("Rows", ["all", "cond", "uncond"], horizontal=True,
                        format_func={"all": "both halves", "cond": "conditional",
                                     "uncond": "unconditional"}.get,
                        help="classifier-free guidance runs each step on a conditional and an "
                             "unconditional batch; their activations differ")
    else:
        rows = "all"
    step = stats.step_of(t)
    has_weight = layer in stats.weight_absmax

    tab_a, tab_bc, tab_de, tab_f, tab_g = st.tabs(["(a) Channels", "(b, c) Over timesteps", "(d, e) Complementarity",
                                                   "(f) All layers", "(g) Number formats"])
    with tab_a:
        st.plotly_chart(_figure(figs.channel_profile, stats, layer, step, bits=bit, rows=rows))
    with tab_bc:
        st.plotly_chart(_figure(figs.timestep_boxplot, stats, layer, split_halves=rows != "all"))
        st.plotly_chart(_figure(figs.channel_timestep_heatmap, stats, layer, rows=rows))
    with tab_de:
        scope = st.radio("Rank correlation for", ["this block", "every linear layer"], horizontal=True)
        chosen = [k for k in menu[group] if k in stats.weight_absmax] if scope == "this block" else None
        if chosen == []:
            st.info("This block has no linear layer (only attention operands were recorded for it).")
        else:
            st.plotly_chart(_figure(figs.spearman_over_timesteps, stats, tuple(chosen) if chosen else None))
        if has_weight:
            st.plotly_chart(_figure(figs.complementarity_scatter, stats, layer, step))
        else:
            st.info(f"{layer} is an attention operand, not a linear layer's input: it has no weight to "
                    "compare with.")
    with tab_f:
        st.plotly_chart(_figure(figs.layer_overview, stats))
    with tab_g:
        if bundle is None or not has_weight:
            st.info("Pick a linear or conv layer (attention operands have no number-format view).")
        else:
            formats_tab(bundle, stats, layer, t, " (both guidance halves)" if len(stats.halves) == 2 else "")


    d1, d2, d3 = st.columns(3)
    # Deferred: the CSV is built when the button is pressed, not on every rerun.
    d1.download_button("This layer as CSV", data=lambda key=layer: stats.to_csv([key]),
                       file_name=f"salience_{layer}.csv", mime="text/csv", on_click="ignore")
    n_rows = len(stats.timesteps) * sum(a.shape[-1] for a in stats.act_absmax.values())
    too_big = n_rows > MAX_CSV_ROWS
    d2.download_button("All layers as CSV", data=lambda: stats.to_csv(), file_name="salience_all_layers.csv",
                       mime="text/csv", on_click="ignore", disabled=too_big,
                       help=f"one row per layer, timestep and channel: {n_rows:,} rows" + (
                           " - too many for a CSV; use `dqlab salience --out stats.npz` and "
                           "analysis.salience.collect.SalienceStats.load instead" if too_big else ""))
    d3.download_button("Layer ranking as CSV", data=lambda: layer_difficulty(stats).to_csv(index=False),
                       file_name="salience_layer_ranking.csv", mime="text/csv", on_click="ignore")


def token_view(bundle, prompts: list[str]) -> None:
    """Cross-attention reads the prompt's embedding: its outliers sit on token positions (one value per prompt
    and position, the same at every timestep), so this view needs no sampling pass."""
    from analysis.plots.tokens import token_salience_figure
    from analysis.salience.tokens import token_salience

    st.subheader("Token salience of cross-attention's keys and values")
    st.markdown("Every cross-attention **k** and **v** projection reads the prompt's embedding, the same tensor at "
                "every timestep. Its outliers sit on a few **token positions** (MixDQ reports the BOS token of "
                "Stable Diffusion's CLIP embedding at 828 against 10-15 elsewhere), which is why these layers are "
                "the most sensitive of a text-to-image model. One row per sidebar prompt.")
    ts = token_salience(bundle, prompts)
    st.plotly_chart(token_salience_figure(ts), key="token_salience")
    top = ts.summary()["top"][:3]
    st.caption("Largest: " + ", ".join(f"“{t['token']}” at position {t['position']} of prompt {t['prompt']} "
                                       f"({t['absmax']:.3g})" for t in top))


bundle = current_bundle()
if bundle is not None:
    with st.form("salience_form"):
        c1, c2, c3 = st.columns(3)
        steps = c1.slider("DDIM steps", 5, 250, 50, step=5)
        samples = c2.number_input("Calibration samples (prompts of the sidebar cycle)" if bundle.text_conditioned
                                  else "Calibration samples (classes cycle 0, 1, ...)", 1, 64, 16)
        guidance = c3.slider("Guidance", 1.0, 8.0, float(bundle.default_guidance), step=0.5,
                             help="above 1 the conditional and unconditional halves are recorded apart")
        c4, c5, c6 = st.columns(3)
        bits = c4.multiselect("Bit-widths for the quantization error", BIT_CHOICES, default=[4, 8],
                              help="adds one forward per timestep after the sampling pass")
        pattern = c5.text_input("Only layers matching (regular expression, optional)", "",
                                placeholder=r"e.g. transformer_blocks\.(0|5)\. or down_blocks\.1\.")
        attention = c6.checkbox("Also record q, k, v and the softmax output", value=False)
        go = st.form_submit_button("Collect")

    from analysis.app_state import FP_SALIENCE, model_key, produced_by

    cache = st.session_state.setdefault("salience_stats", {})
    mkey = model_key(bundle)
    prompts = tuple(current_prompts()) if bundle.text_conditioned else None
    settings = (mkey, int(steps), int(samples), float(guidance), tuple(sorted(bits)), pattern.strip() or None,
                bool(attention), prompts, bundle.negative_prompt)
    if go:
        if settings not in cache:
            from analysis.app_state import session_view
            from analysis.salience.collect import SalienceConfig, collect

            # Rows reduced per timestep and half on the device: the figures use the maximum over samples, and a
            # large model at many steps would not fit per-sample rows in memory.
            config = SalienceConfig(steps=settings[1], samples=settings[2], guidance=settings[3],
                                    mse_bits=settings[4], layers=settings[5], attention=settings[6], per_sample=False,
                                    prompts=prompts)
            then = (f"Sampling done; now the quantization error at {', '.join(map(str, settings[4]))} bits (one "
                    "forward per timestep, about as long again as the sampling)" if settings[4] else None)

            def _collect():
                bar, on_step = progress_callback("Collecting: sampling step", then=then)
                try:
                    return collect(session_view(bundle), config, on_step=on_step)
                finally:
                    bar.empty()

            waiting = st.empty()
            try:
                # the FP model's statistics are the same for every session: collected once per process, with the
                # hooks on that collection's own modules (same weights), never on the shared cached model
                cache[settings] = FP_SALIENCE.get(settings, _collect, on_wait=lambda: waiting.info(
                    "Another session is collecting these statistics; they are shown here when done.")).value
                while len(cache) > KEEP_COLLECTIONS:
                    cache.pop(next(iter(cache)))
                st.session_state["salience_current"] = settings
            except ValueError as exc:  # bad settings; earlier statistics stay as they were
                st.error(f"Could not collect: {exc}")
            waiting.empty()
        else:
            st.session_state["salience_current"] = settings

    current = st.session_state.get("salience_current")
    stats = cache.get(current) if current is not None and current[0] == mkey else None
    if stats is None:
        st.info("Choose the settings above and press **Collect**: one sampling pass records every layer's "
                "input channels at every timestep, then one forward per timestep measures the quantization error "
                "at the chosen bit-widths. On the bundled model at these defaults that is one to three minutes "
                "on a busy 2-core CPU (fewer steps or samples, or no bit-widths, is quicker); the bar shows the "
                "stage and the time left.")
    else:
        info = stats.info
        st.caption(f"{produced_by(mkey)}: {len(stats.layers)} layers x {len(stats.timesteps)} timesteps, "
                   f"{info['samples']} samples, guidance {info['guidance']}, collected in {info['seconds']:.1f} s "
                   f"(plain sampling {info['sampling_seconds']:.1f} s)"
                   + (f", quantization error in {info['mse_seconds']:.1f} s" if "mse_seconds" in info else ""))
        viewer(stats, current, bundle)
    if bundle.text_conditioned:
        token_view(bundle, current_prompts())
