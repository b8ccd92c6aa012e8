"""Options described once, where they are declared: a dataclass field made with option() carries its label,
help, kind, choices and bounds, and describe() reads them back. The CLI's flags and the Quantize page's form
are built from these descriptions, so an option added to QuantConfig or to a method's Options appears in
both without another line (torchao's config-dataclass pattern, with the UI derived from the config).
"""
from __future__ import annotations

import dataclasses
from typing import Any

KINDS = ("bool", "int", "float", "str", "bits", "tristate", "patterns", "optional_float", "optional_int")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: the field's name and default, and how a person sets it."""

    name: str
    kind: str  # one of KINDS; "bits": 2-8 or None (float), "tristate": True / False / None (the default)
    default: Any
    label: str
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused (a learning rate must be > 0)
    method: str | None = None  # the method whose Options declare it; None for QuantConfig's own fields
    group: str = "quantization"  # "quantization" or "recon" (block-wise optimization)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def option(default, label: str, help: str, kind: str | None = None, choices: tuple = (), low=None, high=None,
           low_open: bool = False, group: str = "quantization"):
    """A dataclass field that describes itself (see describe)."""
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}")
    meta = {"option": dict(kind=kind, label=label, help=help, choices=tuple(choices), low=low, high=high,
                           low_open=low_open, group=group)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe(cls, method: str | None = None) -> list[Option]:
    """The Option of every described field of dataclass `cls`, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append(Option(name=f.name, default=default, method=method, **meta))
    return out


def check(opt: Option, value) -> None:
    """Raise ValueError naming the option and what it accepts when `value` does not fit it."""
    kind = opt.kind
    ok = True
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "tristate":
        ok = value is None or isinstance(value, bool)
    elif kind in ("int", "optional_int"):
        ok = (value is None and kind == "optional_int") or (isinstance(value, int) and not isinstance(value, bool))
    elif kind in ("float", "optional_float"):
        ok = (value is None and kind == "optional_float") or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            and abs(value) != float("inf"))
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "patterns":
        ok = isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)
    elif kind == "bits":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and (2 <= value <= 8 or value == 16))
    if not ok:
        raise ValueError(f"{opt.name} must be {_accepts(opt)}, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ValueError(f"unknown {opt.name} {value!r}; choose one of {', '.join(map(str, opt.choices))}")
    if value is not None and kind in ("int", "optional_int", "float", "optional_float"):
        below = opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low)
        if below or (opt.high is not None and value > opt.high):
            raise ValueError(f"{opt.name} must be {_accepts(opt)}, got {value!r}")


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_text(opt: Option, text: str):
    """The value of `opt` a person typed (a CLI NAME=VALUE), in the option's kind and checked; ValueError naming
    the option and what it accepts otherwise."""
    t = text.strip()
    low = t.lower()
    try:
        if low in ("none", "null") and opt.kind in ("optional_int", "optional_float", "tristate", "bits"):
            value = None
        elif opt.kind in ("bool", "tristate"):
            value = BOOL_WORDS[low]
        elif opt.kind in ("int", "optional_int", "bits"):
            value = int(t)
        elif opt.kind in ("float", "optional_float"):
            value = float(t)
        elif opt.kind == "patterns":
            value = [p for p in t.split() if p]
        else:
            value = t
    except (KeyError, ValueError):
        raise ValueError(f"{opt.name} must be {_accepts(opt)}, got {text!r}") from None
    check(opt, value)
    return value


def check_all(obj, method: str | None = None) -> None:
    for opt in describe(type(obj), method):
        check(opt, getattr(obj, opt.name))


def _accepts(opt: Option) -> str:
    what = {"bool": "true or false", "tristate": "true, false or null (the method's default)",
            "int": "an integer", "optional_int": "an integer", "float": "a finite number",
            "optional_float": "a finite number",
            "str": "a string", "patterns": "a list of layer name patterns",
            "bits": "an integer from 2 to 8, or 16 / None for no quantization"}[opt.kind]
    low = None if opt.low is None else f"{'>' if opt.low_open else '>='} {opt.low:g}"
    high = None if opt.high is None else f"<= {opt.high:g}"
    if low and high:
        what += f" in {'(' if opt.low_open else '['}{opt.low:g}, {opt.high:g}]"
    elif low or high:
        what += f" {low or high}"
    return what + (", or null (the default)" if opt.kind in ("optional_float", "optional_int") else "")
