"""Files shipped with the package (the `assets` package data), found through importlib.resources."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

ASSETS_PACKAGE = "assets"


def asset_path(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. asset_path("dit-mnist"). The assets are installed as plain
    files (not zipped), so the resource is a real folder that diffusers and safetensors can open."""
    try:
        root = importlib.resources.files(ASSETS_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError("the bundled assets are not installed: reinstall dqlab (pip install .) so its "
                                "`assets` package is present") from None
    return Path(str(root.joinpath(*parts)))
