"""One small module per method. Each defines

    NAME: str
    QUANTIZES: bool                   (fp is the only one that does not)
    NEEDS_ACTIVATIONS: bool           (its vectors need FP activation statistics, an extra pass)
    compute(model, groups, stats, config) -> {group name: {"b": vector, ...extras}}

`groups` are the foldable reparam.BalanceGroup's, `stats` the FP input statistics (observers.InputStats keyed
by each group's name) and b the per-input-channel vector the engine folds (W diag(b), X diag(1/b)).
A method with no vectors returns {}. Extras (such as SSC's rho and eta per timestep) go to the report.
"""
from __future__ import annotations

import importlib

NAMES = ("fp", "baseline", "smoothquant", "ptq4dit", "dilatequant")


def get_method(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"quant.methods.{name}")
