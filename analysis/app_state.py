"""Objects the Streamlit pages share, kept free of Streamlit so they can be tested and reused.

The app caches the FP bundle with st.cache_resource, which hands the SAME object to every session:
nothing here or in the pages may modify it. Quantized variants are new models (quant.quantize returns one).
"""
from __future__ import annotations

DEFAULT_MODEL = "bundled:dit-mnist"
HOME_CLASSES = list(range(10))
