"""The method registry: one file per method, each declaring a `METHOD = Method(...)`.

A method file holds its formulas, its options (a small dataclass of option() fields, checked in
__post_init__), its help text, whether its vectors need FP activation statistics (an extra pass), and a
compute(model, groups, stats, options) -> {group name: GroupVector} that returns the per-input-channel vector
b the engine folds (W diag(b), X diag(1/b)) plus extras for reports (SSC's rho and eta per timestep).
`groups` are the foldable reparam.BalanceGroup's and `stats` the FP input statistics (observers.InputStats
keyed by group name, or None when the method needs none). A method with no vectors returns {}.

METHODS, QuantConfig's validation, the CLI's options and the Quantize page's form all read this registry,
so adding a method is adding one file here.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import torch

from quant.options import Option, check_all, describe


@dataclasses.dataclass
class NoOptions:
    """Options of a method that has none."""


@dataclasses.dataclass
class GroupVector:
    """What a method computed for one balance group: the vector it folds and extras for the report."""

    b: torch.Tensor  # [C] per input channel; 1 leaves a channel alone
    extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    help: str  # one sentence for menus and --help
    compute: Callable  # (model, groups, stats, options) -> dict[str, GroupVector]
    options: type = NoOptions  # dataclass of option() fields; __post_init__ checks them
    quantizes: bool = True  # fp is the only one that does not
    needs_activations: bool = False  # its vectors need FP activation statistics (an extra pass)
    tpq_default: bool = False  # per-timestep activation ranges on unless the config says otherwise
    vector: str = "per-channel vector b_j"  # what the folded vector is, for plot titles
    order: int = 100  # place in menus (the references first)

    def describe_options(self) -> list[Option]:
        return describe(self.options, self.name)

    def make_options(self, values: dict | None = None):
        """This method's options from a dict; unknown names are an error naming the known ones."""
        values = dict(values or {})
        known = [o.name for o in self.describe_options()]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"method {self.name} has no option(s) {unknown}; its options: {known or 'none'}")
        return self.options(**values)


def checked(options) -> None:
    """For an Options dataclass's __post_init__: raise ValueError on the first value that does not fit."""
    check_all(options)


def _discover() -> dict[str, Method]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


REGISTRY: dict[str, Method] = _discover()
NAMES = tuple(REGISTRY)


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]


def all_options() -> list[Option]:
    """Every method's options, in registry order (an option name may be declared by one method only)."""
    out, seen = [], {}
    for m in REGISTRY.values():
        for opt in m.describe_options():
            if opt.name in seen:
                raise RuntimeError(f"option {opt.name} is declared by both {seen[opt.name]} and {m.name}")
            seen[opt.name] = m.name
            out.append(opt)
    return out
