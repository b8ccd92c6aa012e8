"""dqlab: a lab for quantizing diffusion transformers. Run with `python app.py` (or `streamlit run app.py`)."""
from analysis.threads import configure

# Before anything imports torch: its thread pool's wait policy is fixed when the pool is created.
configure(server=True)  # sessions share one process (analysis.threads)

import streamlit as st  # noqa: E402
from streamlit import runtime  # noqa: E402

if not runtime.exists():  # `python app.py`: import the heavy modules first, then serve this file (pages/_serve.py)
    from pages._serve import main

    raise SystemExit(main(__file__))

# Library logging is configured where the model is loaded (pages/_shared.get_bundle): configuring it here
# would import diffusers (seconds) before the first page draws anything.
st.set_page_config(page_title="dqlab", page_icon=":material/tune:", layout="wide")

# Each page is its own file (so tests can drive it with AppTest); this list is the app's menu.
PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/salience.py", title="Salience", icon=":material/insights:"),
    st.Page("pages/quantize.py", title="Quantize", icon=":material/memory:"),
    st.Page("pages/sweep.py", title="Sweep", icon=":material/scatter_plot:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
]
st.navigation(PAGES).run()
