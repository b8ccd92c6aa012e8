"""The method registry: one file per method, each declaring a `METHOD = Method(...)`.

A method file holds its formulas, its options (a small dataclass of option() fields, checked in
__post_init__), its help text, and what it contributes to a quantization run, in the engine's order:

  balance   compute(model, groups, stats, options) -> {group name: GroupVector}: the per-input-channel vector
            b folded before wrapping (W diag(b), X diag(1/b)), plus extras for reports (SSC's rho and eta).
            `groups` are the foldable BalanceGroup's, `stats` the FP input statistics when
            needs_activations (observers.InputStats keyed by group name), else None.
  rotation  a LayerTransform: an orthogonal rotation of layer inputs (Hadamard), folded or online.
  lowrank   a LayerTransform: a float low-rank branch beside the quantized GEMM (SVDQuant).
  rounding  rounding(model, batches, options) -> report: the method's own weight rounding (GPTQ), run on the
            wrapped model after the activation ranges are calibrated.

Methods compose: QuantConfig.method may name several joined by "+" ("ptq4dit+gptq", "hadamard+gptq",
"svdquant+gptq"); compose() checks that at most one method fills each role and that no method refuses
another (Method.refuses, one reason per refused partner), and returns the canonical spelling.

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
class LayerTransform:
    """A change a method makes to quantized layers after wrapping and before calibration.

    plan(model, layers, options) -> {layer name: value}: the structure wrap_model adds to each layer (a
        rotation: "online" or "folded"; a low-rank branch: its rank). It depends on the model's structure and
        the options only, so a saved model is rebuilt with the same structure before its tensors load.
    apply(model, plan, options) -> report dict: fills that structure in (rotated weights, branch factors) on
        the wrapped model, whose FP weights it may change; the engine recalibrates the weight steps after.
    """

    plan: Callable
    apply: Callable


ROLES = ("balance", "rotation", "lowrank", "rounding")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    help: str  # one sentence for menus and --help
    compute: Callable | None = None  # balance: (model, groups, stats, options) -> dict[str, GroupVector]
    options: type = NoOptions  # dataclass of option() fields; __post_init__ checks them
    rotation: LayerTransform | None = None
    lowrank: LayerTransform | None = None
    rounding: Callable | None = None  # (model, batches, options) -> report dict
    refuses: tuple = ()  # ((other method or "recon:<mode>", why), ...): combinations the math does not allow
    quantizes: bool = True  # fp is the only one that does not
    needs_activations: bool = False  # its vectors need FP activation statistics (an extra pass)
    tpq_default: bool = False  # per-timestep activation ranges on unless the config says otherwise
    vector: str = "per-channel vector b_j"  # what the folded vector is, for plot titles
    order: int = 100  # place in menus (the references first)

    @property
    def roles(self) -> tuple[str, ...]:
        """What this method contributes to a run (ROLES), from what it declares."""
        has = {"balance": self.compute, "rotation": self.rotation, "lowrank": self.lowrank,
               "rounding": self.rounding}
        return tuple(r for r in ROLES if has[r] is not None)

    @property
    def composes(self) -> bool:
        """fp (no quantization) and baseline (no method) combine with nothing."""
        return self.quantizes and bool(self.roles)

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


def components(spec: str) -> list[Method]:
    """The methods a method string names ("ptq4dit" or "hadamard+gptq"), each checked to exist."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be a method name or names joined by '+', got {spec!r}")
    names = [n.strip() for n in spec.split("+")]
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"unknown method {n!r}; choose one of {', '.join(NAMES)} (or several joined by '+')")
    return [REGISTRY[n] for n in names]


def compose(spec: str, recon: str = "none") -> str:
    """The canonical spelling of a method string (components in registry order), or ValueError naming the
    first combination that is refused and why."""
    methods = components(spec)
    if len(methods) == 1:
        _check_refusals(methods, recon)
        return methods[0].name
    names = [m.name for m in methods]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"method {spec!r} names {dup} twice")
    for m in methods:
        if not m.composes:
            what = "quantizes nothing" if not m.quantizes else "is plain PTQ with no method of its own"
            raise ValueError(f"method {spec!r}: {m.name} {what}, so it combines with nothing; name the other "
                             "method(s) alone")
    owner: dict[str, str] = {}
    for m in methods:
        for role in m.roles:
            if role in owner:
                raise ValueError(f"method {spec!r}: {owner[role]} and {m.name} both set the {ROLE_WHAT[role]}; "
                                 "combine at most one of them")
            owner[role] = m.name
    _check_refusals(methods, recon)
    return "+".join(m.name for m in sorted(methods, key=lambda m: (m.order, m.name)))


ROLE_WHAT = {"balance": "per-channel vector b (balancing)", "rotation": "input rotation",
             "lowrank": "low-rank branch", "rounding": "weight rounding"}


def _check_refusals(methods: list[Method], recon: str) -> None:
    names = {m.name for m in methods} | {f"recon:{recon}"}
    for m in methods:
        for other, why in m.refuses:
            if other in names and other != m.name:
                shown = f"recon {other[6:]}" if other.startswith("recon:") else other
                raise ValueError(f"{m.name} does not combine with {shown}: {why}")


def owner_of(spec: str, role: str) -> Method | None:
    """The component of a method string that fills `role`, or None."""
    return next((m for m in components(spec) if role in m.roles), None)


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
