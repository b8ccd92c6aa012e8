"""Plotly figures built from statistics and results (no Streamlit here): one module per subject."""
