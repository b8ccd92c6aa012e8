"""Library log noise, configured once at each entry point (the CLI's main, the app's script).

diffusers logs warnings through its own handler on stderr (e.g. about optional packages); for a CLI whose
contract is "stderr is one line naming what was wrong" and for an app whose users read the page, those
are noise. Errors still show. Set DQLAB_VERBOSE=1 to see every library message.
"""
from __future__ import annotations

import os
import sys


def configure_logging() -> None:
    """Library loggers at error level, unless DQLAB_VERBOSE or the library's own variable says otherwise."""
    if os.environ.get("DQLAB_VERBOSE", "0") not in ("", "0"):
        return
    from diffusers.utils import logging as diffusers_logging

    if "DIFFUSERS_VERBOSITY" not in os.environ:
        diffusers_logging.set_verbosity_error()
    # transformers (text encoders of text-to-image pipelines) reads these when first imported: set them without
    # importing it, so commands that load no text encoder do not pay for its import. Its per-file "Loading
    # weights" bars follow huggingface_hub's switch.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        if "transformers" in sys.modules:  # imported already: its switches were read then
            from transformers.utils import logging as transformers_logging

            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
