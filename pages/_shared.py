"""Streamlit helpers shared by the pages: the sidebar (model, device, dtype), the cached FP model, the run store.

st.cache_resource hands the SAME bundle to every session, so no page may modify it; quantization
returns new models. This module is not a page (app.py lists the pages with st.navigation).
"""
from __future__ import annotations

import os

import streamlit as st

from analysis.app_state import DEFAULT_MODEL

SOURCES = {"Bundled": "a model that ships with the lab", "Local folder": "a diffusers folder on this machine",
           "Hub id": "a Hugging Face hub id such as facebook/DiT-XL-2-256 (needs network or a cached copy)"}
DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["float32", "float16", "bfloat16"]


# Models kept in memory at once, across every session (each (source, device, dtype) is one); a server with more
# memory raises it with DQLAB_MODEL_CACHE. The least recently loaded model is evicted first.
MODEL_CACHE_ENTRIES = max(1, int(os.environ.get("DQLAB_MODEL_CACHE", "2") or 2))


@st.cache_resource
def _model_cache_log():
    from analysis.app_state import ModelCacheLog

    return ModelCacheLog(MODEL_CACHE_ENTRIES)


@st.cache_resource(show_spinner="Loading the model ...", max_entries=MODEL_CACHE_ENTRIES)
def get_bundle(source: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32"):
    """One FP bundle per (source, device, dtype), shared by every session: never modify it. At most
    MODEL_CACHE_ENTRIES stay loaded; _model_cache_log records what a load evicted."""
    from analysis.models.loading import load
    from analysis.quiet import configure_logging

    configure_logging()  # before diffusers logs anything about the model it loads
    bundle = load(source, device=device, dtype=dtype)
    _model_cache_log().loaded((source, device, dtype))
    return bundle


@st.cache_resource
def _detected_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu (no CUDA GPU found)"


def _remembered(key: str, default):
    """A sidebar choice kept across pages: each page draws its own widgets, so the value lives apart from them."""
    return st.session_state.get(key, default)


def sidebar_choice() -> tuple[str, str, str]:
    """(model source, device, dtype) as chosen in the sidebar; every page draws the same sidebar."""
    from analysis.models.loading import available_models

    sb = st.sidebar
    sb.subheader("Model")
    kinds = list(SOURCES)
    kind = sb.radio("Source", kinds, index=kinds.index(_remembered("model_kind", "Bundled")),
                    captions=list(SOURCES.values()), key="_sb_kind")
    if kind == "Bundled":
        names = [m["name"] for m in available_models() if m["kind"] == "bundled"]
        prev = _remembered("model_bundled", DEFAULT_MODEL)
        source = sb.selectbox("Bundled model", names, index=names.index(prev) if prev in names else 0, key="_sb_bundled")
        st.session_state["model_bundled"] = source
    elif kind == "Local folder":
        source = sb.text_input("Folder", value=_remembered("model_folder", ""), key="_sb_folder",
                               placeholder="e.g. ./DiT-XL-2-256 or a folder saved by the Quantize page")
        st.session_state["model_folder"] = source
    else:
        source = sb.text_input("Hub id", value=_remembered("model_hub", "facebook/DiT-XL-2-256"), key="_sb_hub")
        st.session_state["model_hub"] = source
    device = sb.selectbox("Device", DEVICES, index=DEVICES.index(_remembered("model_device", "auto")), key="_sb_device",
                          help=f"auto picks a CUDA GPU when there is one; detected here: {_detected_device()}")
    sb.caption(f"Detected: {_detected_device()}")
    dtype = sb.selectbox("Precision of the FP model", DTYPES, index=DTYPES.index(_remembered("model_dtype", "float32")),
                         key="_sb_dtype", help="float16 / bfloat16 halve memory on a GPU; on a CPU keep float32")
    st.session_state.update(model_kind=kind, model_device=device, model_dtype=dtype, model_source=source.strip())
    return source.strip(), device, dtype


def current_bundle():
    """The FP bundle chosen in the sidebar (bundled model by default), or None after showing why not."""
    from analysis.models.bundle import ModelLoadError

    import re

    source, device, dtype = sidebar_choice()
    if not source:
        st.info("Enter the model's folder in the sidebar.")
        return None
    if st.session_state.get("model_kind") == "Hub id" and not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        st.error(f"'{source}' is not a hub id: a hub id is exactly owner/name, such as facebook/DiT-XL-2-256. "
                 "For a folder on this machine choose **Local folder** in the sidebar.")
        return None
    log = _model_cache_log()
    key = (source, device, dtype)
    was_evicted = key in log.evicted
    before = list(log.evicted)
    try:
        bundle = get_bundle(source, device, dtype)
    except ModelLoadError as exc:
        st.error(exc.ui)
        return None
    st.sidebar.caption(f"Loaded `{bundle.name}` on {bundle.device}, {str(bundle.dtype).removeprefix('torch.')}")
    log.touched(key)
    pushed = [k for k in log.evicted if k not in before]
    if was_evicted and key not in log.evicted:
        st.sidebar.caption(f":orange[`{source}` had been evicted from memory (the app keeps {MODEL_CACHE_ENTRIES} "
                           "models loaded across all sessions) and was loaded again.]")
    if pushed:
        st.sidebar.caption(f":orange[Loading it evicted {', '.join(f'`{k[0]}` ({k[1]}, {k[2]})' for k in pushed)} "
                           f"from memory: the app keeps {MODEL_CACHE_ENTRIES} models loaded across all sessions.]")
    if bundle.device.type == "cpu":
        from analysis.threads import current

        st.sidebar.caption(f"CPU: {current().describe()}")
    if bundle.text_conditioned:
        bundle = _prompt_controls(bundle)
    return bundle


def _prompt_controls(bundle):
    """A text-to-image model takes prompts where a class model takes classes: the sidebar holds them (one a line)
    and the negative prompt, for every page. Returns the bundle with that negative prompt (a new bundle object
    sharing the cached model's modules, which stay unchanged)."""
    from analysis.models.prompts import parse_prompts, read_prompt_set

    sb = st.sidebar
    sb.subheader("Prompts")
    text = sb.text_area("Prompts, one a line", value=_remembered("prompts_text", "\n".join(read_prompt_set("evaluation")[:4])),
                        key="_sb_prompts", height=120,
                        help="sampled on every page where a class model shows classes; quantization calibrates on the "
                             "bundled calibration prompts, evaluations score on the bundled evaluation prompts")
    negative = sb.text_input("Negative prompt", value=_remembered("negative_prompt", ""), key="_sb_negative",
                             help="guidance's unconditional branch; empty = the empty prompt, as the pipelines do")
    st.session_state.update(prompts_text=text, negative_prompt=negative)
    try:
        st.session_state["prompts"] = parse_prompts(text, "the prompt box")
        bundle = bundle.with_negative_prompt(negative)
    except ValueError as exc:
        sb.error(str(exc))
        st.session_state["prompts"] = read_prompt_set("evaluation")[:4]
    sb.caption(f"{bundle.text.kind.upper()} text encoder and VAE stay in FP and are never quantized; "
               "only the denoiser is.")
    return bundle


def current_prompts() -> list[str]:
    """The sidebar's prompts (a text-to-image model; current_bundle draws them)."""
    return list(st.session_state.get("prompts") or [])


def intro(text: str, why: str, math: list[str] | None = None, links: dict[str, str] | None = None) -> None:
    """The opening every page shares: two or three sentences, then a collapsible 'why' with the formulas
    rendered as math and links to the papers."""
    st.markdown(text)
    with st.expander("Why, and the math behind it"):
        st.markdown(why)
        for formula in math or []:
            st.latex(formula)
        if links:
            st.markdown("Read more: " + " · ".join(f"[{name}]({url})" for name, url in links.items()))


@st.cache_resource
def _store(data_dir: str | None):
    """The run store (one per data folder). Reads and writes are transactional, so sharing it is safe."""
    from analysis.evaluation.store import Store

    store = Store(data_dir)
    store.sweep_orphans()  # folders left by jobs killed before their row committed (older than an hour)
    return store


def store():
    import os

    from analysis.evaluation.store import DATA_ENV

    return _store(os.environ.get(DATA_ENV) or None)


def progress_callback(text: str, then: str | None = None):
    """A progress bar and the on_step(done, total) callback that drives it: the stage, the step, and the time
    left estimated from the steps done so far; at the last step it names the stage that follows (`then`),
    so a bar at 'step 50/50' never sits there silently."""
    import time

    bar = st.progress(0.0, text=text)
    start = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        if done >= total and then:
            bar.progress(1.0, text=then)
            return
        elapsed = time.perf_counter() - start
        left = f", about {elapsed / done * (total - done):.0f} s left" if done and done < total else ""
        bar.progress(min(1.0, done / total), text=f"{text} {done}/{total}{left}")
    return bar, on_step


BITS = [2, 3, 4, 5, 6, 7, 8, 16]
TRISTATE = {"default": None, "on": True, "off": False}


# Examples of layer-name patterns, in the model's own names (a UNet has no transformer_blocks).
PATTERN_EXAMPLES = {"dit": "e.g. pos_embed.proj, *.ff.net.2, transformer_blocks.0",
                    "unet": "e.g. conv_in, *.conv_shortcut, down_blocks.0"}


def option_widget(container, opt, key: str, family: str = "dit"):
    """The widget for one quant.options.Option (a QuantConfig field or a method's option), returning a value
    the config accepts. Every form that sets quantization options draws them with this, from the registry."""
    label, help_text = opt.label, opt.help
    if opt.kind == "bits":
        value = container.select_slider(label, BITS + ["float"], value=opt.default or "float", key=key,
                                        help=help_text + " (16 and float both leave it unquantized)")
        return None if value == "float" else int(value)
    if opt.kind == "bool":
        return container.checkbox(label, value=opt.default, key=key, help=help_text)
    if opt.kind == "tristate":
        names = list(TRISTATE)
        value = container.selectbox(label, names, index=names.index("default"), key=key, help=help_text)
        return TRISTATE[value]
    if opt.kind == "patterns":
        text = container.text_input(label, value=", ".join(opt.default), key=key, help=help_text + "; comma-separated",
                                    placeholder=PATTERN_EXAMPLES.get(family, PATTERN_EXAMPLES["dit"]))
        return [p.strip() for p in text.split(",") if p.strip()]
    if opt.choices:
        choices = list(opt.choices)
        return container.selectbox(label, choices, index=choices.index(opt.default), key=key, help=help_text)
    if opt.kind == "int":
        return int(container.number_input(label, min_value=None if opt.low is None else int(opt.low),
                                          max_value=None if opt.high is None else int(opt.high),
                                          value=int(opt.default), step=1, key=key, help=help_text))
    if opt.kind == "optional_int":
        value = container.number_input(label, min_value=None if opt.low is None else int(opt.low),
                                       max_value=None if opt.high is None else int(opt.high),
                                       value=None if opt.default is None else int(opt.default), step=1,
                                       key=key, help=help_text + " (empty: none)")
        return None if value is None else int(value)
    if opt.kind in ("float", "optional_float"):
        value = container.number_input(label, min_value=None if opt.low is None or opt.low_open else float(opt.low),
                                       max_value=None if opt.high is None else float(opt.high),
                                       value=None if opt.default is None else float(opt.default),
                                       format="%g", key=key, help=help_text,
                                       placeholder="default" if opt.default is None else None)
        return None if value is None else float(value)
    return container.text_input(label, value=str(opt.default), key=key, help=help_text)


def option_grid(options, key_prefix: str, columns: int = 4, family: str = "dit") -> dict:
    """Widgets for `options` laid out in rows of `columns`; {option name: value}."""
    values = {}
    for start in range(0, len(options), columns):
        cols = st.columns(columns)
        for col, opt in zip(cols, options[start:start + columns]):
            if opt.kind == "patterns":  # a long text field gets its own row below
                continue
            values[opt.name] = option_widget(col, opt, f"{key_prefix}{opt.name}")
    for opt in options:
        if opt.kind == "patterns":
            values[opt.name] = option_widget(st, opt, f"{key_prefix}{opt.name}", family)
    return values
