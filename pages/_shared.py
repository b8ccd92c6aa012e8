"""Streamlit helpers shared by the pages: the cached FP model and the model picker.

st.cache_resource hands the SAME bundle to every session, so no page may modify it; quantization
returns new models. This module is not a page (app.py lists the pages with st.navigation).
"""
from __future__ import annotations

import streamlit as st

from analysis.app_state import DEFAULT_MODEL


@st.cache_resource(show_spinner="Loading the model ...")
def get_bundle(source: str = DEFAULT_MODEL, device: str = "auto"):
    """One FP bundle per (source, device), shared by every session: never modify it."""
    from analysis.models import load

    return load(source, device=device)


def current_bundle():
    """The FP bundle chosen in the sidebar (bundled model by default), or None after showing the error."""
    from analysis.models import ModelLoadError

    source = st.sidebar.text_input("Model", value=st.session_state.get("model_source", DEFAULT_MODEL),
                                   help="bundled:dit-mnist, bundled:unet-mnist, a local diffusers folder (DiT or "
                                        "UNet, pipeline layout or bare model), or a hub id such as "
                                        "facebook/DiT-XL-2-256 (needs network or a cached copy)")
    st.session_state["model_source"] = source
    try:
        return get_bundle(source)
    except ModelLoadError as exc:
        st.error(str(exc))
        return None


def progress_callback(text: str):
    """A progress bar and the on_step(done, total) callback that drives it."""
    bar = st.progress(0.0, text=text)
    return bar, (lambda done, total: bar.progress(min(1.0, done / total), text=f"{text} {done}/{total}"))


BITS = [2, 3, 4, 5, 6, 7, 8, 16]
TRISTATE = {"default": None, "on": True, "off": False}


def option_widget(container, opt, key: str):
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
                                    placeholder="e.g. pos_embed.proj, *.ff.net.2, transformer_blocks.0")
        return [p.strip() for p in text.split(",") if p.strip()]
    if opt.choices:
        choices = list(opt.choices)
        return container.selectbox(label, choices, index=choices.index(opt.default), key=key, help=help_text)
    if opt.kind == "int":
        return int(container.number_input(label, min_value=None if opt.low is None else int(opt.low),
                                          max_value=None if opt.high is None else int(opt.high),
                                          value=int(opt.default), step=1, key=key, help=help_text))
    if opt.kind in ("float", "optional_float"):
        value = container.number_input(label, min_value=None if opt.low is None or opt.low_open else float(opt.low),
                                       max_value=None if opt.high is None else float(opt.high),
                                       value=None if opt.default is None else float(opt.default),
                                       format="%g", key=key, help=help_text)
        return None if value is None else float(value)
    return container.text_input(label, value=str(opt.default), key=key, help=help_text)


def option_grid(options, key_prefix: str, columns: int = 4) -> dict:
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
            values[opt.name] = option_widget(st, opt, f"{key_prefix}{opt.name}")
    return values
