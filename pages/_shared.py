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
