"""The bundled model and digit classifier, shipped as package data so an installed dqlab finds them.

Code reaches these files through importlib.resources (analysis.models.resources.asset_path), never through a path
relative to a source file, so `pip install .` (not only an editable install) loads `bundled:dit-mnist`.
"""
