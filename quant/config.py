"""QuantConfig: every choice a quantization run makes, serialisable to JSON so a saved model says how it was made.

Fields common to every method are declared here; a method's own knobs (SmoothQuant's alpha, PTQ4DiT's SSC)
are declared by its file in quant.methods and live in `options`. Every field is an option() (quant.options),
so the CLI's flags and the Quantize page's form are derived from these declarations. A config checks
itself when it is made (and dataclasses.replace re-checks): an invalid QuantConfig cannot exist.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Iterable

from quant.methods import NAMES, REGISTRY, all_options, components, compose
from quant.options import check_all, describe, option
from quant.formats import FORMAT_NAMES, FormatSpec, format_bits, int_format, parse_format
from quant.quantizers import SEARCHES, is_off

METHODS = NAMES  # every registered method, in menu order (quant.methods discovers them)


def quantizes(config) -> bool:
    """Whether a setting changes the model: the one place FP is told apart from quantization. `config` is a
    QuantConfig, its dict form, a method name, or None (no setting: the FP model). A method quantizes unless
    its declaration says otherwise (quant.methods.fp); a name no method has ("custom": a model quantized
    elsewhere) counts as quantized."""
    if config is None:
        return False
    method = config if isinstance(config, str) else (config.get("method") if isinstance(config, dict)
                                                      else config.method)
    return method is not None and (method not in REGISTRY or REGISTRY[method].quantizes)
# Block-wise optimization after the scales are set (quant.recon): none, PTQ4DiT's AdaRound reconstruction, or
# DilateQuant's block-wise distillation.
RECON_MODES = ("none", "adaround", "bkd")
RECON_INPUTS = ("quantized", "fp")
# Learning rates when recon_lr / recon_act_lr are None: (rounding or weight lr, activation-parameter lr).
# adaround: Adam's default for V and the step-size lr the official PTQ4DiT run uses: its script parses
# --cali_lr 4e-4 but never passes it on, so BRECQ's block_reconstruction default, 4e-5, applies.
RECON_LRS = {"adaround": (1e-3, 4e-5), "bkd": (1e-4, 1e-3)}
# How the Lp reconstruction loss (adaround) reduces a unit's output: "dim1" sums |out - target|^p over
# dimension 1 and averages the rest (BRECQ's lp_loss, which the official PTQ4DiT code calls: dimension 1 is
# the tokens of a DiT block's [B, N, C] output, the channels of a conv's [B, C, H, W]); "last" sums over the
# last dimension (a DiT block's features), which moves the balance against the rounding penalty by C / N.
RECON_SUMS = ("dim1", "last")
# "rows": each calibration row (conditional and unconditional alike) is matched on its own. "guided": rows come
# in (conditional, unconditional) pairs of one image and step, and the loss matches the unconditional output
# and the guided combination u + s (c - u), so the class signal c - u is weighed by the guidance scale s.
RECON_LOSSES = ("rows", "guided")
# Values a config written before these fields existed ran with (QuantConfig.from_dict restores them).
LEGACY_RECON = {"recon_p": 2.4, "recon_sum": "last", "adaround_act_lr": 4e-4}


# Number-format fields and their defaults (today's int grids); quant.formats holds the formats themselves.
FORMAT_DEFAULTS = {"w_format": "int", "a_format": "int", "w_group": None, "a_group": None, "a_per_token": False}


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch pattern, or a plain module name that is the layer itself or one of its parents."""
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + ".") for p in patterns)


@dataclasses.dataclass
class QuantConfig:
    """How to quantize a diffusion transformer.

    method: a registered method (quant.methods): fp (no quantization), baseline (plain PTQ), smoothquant,
        ptq4dit (CSB + SSC), dilatequant (weight dilation + TPQ), hadamard (input rotation), svdquant
        (smoothing + low-rank branch), gptq (second-order weight rounding); or several joined by "+" where
        the math composes them ("ptq4dit+gptq", "hadamard+gptq", "svdquant+gptq"; quant.methods.compose
        says which are refused and why). Stored in canonical order.
    options: the options of the method(s) by name (each method's Options dataclass; missing ones take their
        defaults), e.g. {"alpha": 0.5} for smoothquant, {"ssc": True, "ssc_rho": "per_timestep"} for ptq4dit.
        `options_for(name)` is one component's typed, checked object.
    tpq: one activation (scale, zero) per timestep; None = the method's default (on for dilatequant only).
    exclude: layer name patterns left in floating point (fnmatch patterns; a plain name also excludes
        everything under it, e.g. "transformer_blocks.0" or "*.norm1.linear").
    layer_bits: mixed precision: layer name pattern (as in exclude) -> [w_bits, a_bits] for the matching
        layers instead of w_bits / a_bits; the first matching pattern wins. E.g. the layers a sensitivity
        analysis ranks hardest kept at 8 bits while the rest run at 4 (analysis.quantization.sensitivity). A per-layer
        table, not a form field: it comes from a sweep or a config file.
    recon: block-wise optimization after calibration (quant.recon): "none"; "adaround" (PTQ4DiT: learned
        weight rounding + activation step sizes, Lp loss); "bkd" (DilateQuant: weights with straight-through
        rounding, weight steps, activation scale and zero point per timestep, MSE). Any method combines with
        any mode, so e.g. baseline + tpq + bkd is DilateQuant's "BKD without WD" ablation.
    The other fields' meanings are in their option() help.
    """

    method: str = option("baseline", "Method", "the quantization method: one of " + ", ".join(NAMES)
                         + ", or several joined by '+' (e.g. hadamard+gptq)")
    w_bits: int | None = option(8, "Weight bits", "weight bit-width, 2-8; 16 or None leaves weights in float",
                                kind="bits")
    a_bits: int | None = option(8, "Activation bits", "activation bit-width, 2-8; 16 or None leaves them in float",
                                kind="bits")
    attn_bits: int | None = option(None, "Attention operand bits", "bit-width of the attention operands q, k, v "
                                   "and the softmax output (None = not quantized)", kind="bits")
    w_format: str = option("int", "Weight format", "weight number format: int is the uniform grid; fp8_e4m3, "
                           "fp8_e5m2, fp6_e3m2, fp6_e2m3 and fp4_e2m1 are OCP MX float elements; mxfp8, mxfp6 and "
                           "mxfp4 share a power-of-two scale per 32 values, nvfp4 an FP8 scale per 16 under a tensor "
                           "scale, int4-g32/g64/g128 an fp16 scale and zero point per group; the element bits must "
                           "equal w_bits", choices=FORMAT_NAMES)
    a_format: str = option("int", "Activation format", "activation number format, the same names as the weight "
                           "format; block formats compute their block scales from each tensor at run time",
                           choices=FORMAT_NAMES)
    w_group: int | None = option(None, "Weight block size", "elements per block along the input dimension, each "
                                 "block with its own scale; unset: per channel or per tensor, presets fix their own",
                                 kind="optional_int", low=2, high=4096)
    a_group: int | None = option(None, "Activation block size", "elements per block along the input dimension, "
                                 "scales computed at run time; unset: per tensor, or per token", kind="optional_int",
                                 low=2, high=4096)
    a_per_token: bool = option(False, "Per-token activations", "one activation scale per token, computed at run "
                               "time, instead of one calibrated scale per tensor")
    w_per_channel: bool = option(True, "Per-channel weights", "one weight scale per output channel (else one "
                                 "per tensor)")
    a_symmetric: bool = option(False, "Symmetric activations", "symmetric activation quantizers (no zero point)")
    w_symmetric: bool = option(False, "Symmetric weights", "symmetric weight quantizers (no zero point)")
    scale_search: str = option("minmax", "Range search", "clip-range search for weights and activations: minmax, "
                               "percentile clipping, or an MSE search over clip ratios", choices=SEARCHES)
    percentile: float = option(99.99, "Percentile", "the percentile (in percent) of the percentile range search",
                               low=50.0, high=100.0, low_open=True)
    tpq: bool | None = option(None, "Per-timestep ranges (TPQ)", "one activation range per timestep; unset = the "
                              "method's default (on for dilatequant only)", kind="tristate")
    exclude: list[str] = option([], "Keep in float", "layer name patterns left in floating point: fnmatch "
                                "patterns such as '*.ff.net.2' or module names such as transformer_blocks.0",
                                kind="patterns")
    options: dict = dataclasses.field(default_factory=dict)
    layer_bits: dict = dataclasses.field(default_factory=dict)
    recon: str = option("none", "Reconstruction", "block-wise optimization after calibration: none, adaround "
                        "(PTQ4DiT: learned rounding + activation steps) or bkd (DilateQuant: weights, weight steps, "
                        "per-timestep activation parameters)", choices=RECON_MODES, group="recon")
    recon_iters: int = option(200, "Iterations per block", "optimization steps per unit (PTQ4DiT: 20000, "
                              "DilateQuant: 5000); the default suits the bundled model on a CPU", low=1, group="recon")
    recon_batch: int = option(32, "Batch", "calibration rows per step (both papers: 32)", low=1, group="recon")
    recon_lr: float | None = option(None, "Learning rate", "lr of the rounding variables (adaround) or weights and "
                                    "weight steps (bkd); unset = the mode's", kind="optional_float", low=0.0,
                                    low_open=True, group="recon")
    recon_act_lr: float | None = option(None, "Activation learning rate", "lr of the activation step sizes (and "
                                        "zero points in bkd); unset = the mode's", kind="optional_float", low=0.0,
                                        low_open=True, group="recon")
    recon_rows: int = option(256, "Calibration rows", "calibration rows drawn across timesteps for the "
                             "optimization (DilateQuant: 5120 samples)", low=1, group="recon")
    recon_input: str = option("quantized", "Block input", "quantized (each block sees the quantized prefix's "
                              "output, the papers') or fp", choices=RECON_INPUTS, group="recon")
    recon_p: float = option(2.0, "Lp exponent", "exponent p of adaround's Lp reconstruction loss (the official "
                            "PTQ4DiT run: 2.0; its unused --cali_p: 2.4)", low=1.0, high=4.0, group="recon")
    recon_sum: str = option("dim1", "Lp sum over", "adaround's Lp loss sums over dimension 1 (tokens of a DiT "
                            "block: BRECQ and the official PTQ4DiT code) or the last one (features)",
                            choices=RECON_SUMS, group="recon")
    recon_loss: str = option("rows", "Rows matched", "rows: each calibration row on its own; guided: pairs of a "
                             "conditional and an unconditional row, matching the unconditional and the guided output "
                             "(protects the class signal guidance amplifies)", choices=RECON_LOSSES, group="recon")
    recon_guidance: float | None = option(None, "Guidance of the loss", "the guidance scale s of the guided loss; "
                                          "unset = the calibration's", kind="optional_float", low=1.0,
                                          group="recon")

    def __post_init__(self) -> None:
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        self.validate()

    @property
    def method_options(self):
        """The Options dataclass of a single method (defaults filled in, checked); see options_for."""
        return self.options_for(components(self.method)[0].name)

    def options_for(self, name: str):
        """The Options dataclass of component `name` of this config's method, from `options`."""
        method = next(m for m in components(self.method) if m.name == name)
        own = {o.name for o in method.describe_options()}
        return method.make_options({k: v for k, v in self.options.items() if k in own})

    @property
    def changed_options(self) -> dict:
        """The method options set away from their defaults, in declaration order (for labels: a rank-4 point
        is not named like the rank-32 one)."""
        out = {}
        for m in self.methods:
            for opt in m.describe_options():
                value = self.options.get(opt.name, opt.default)
                if value != opt.default:
                    out[opt.name] = value
        return out

    @property
    def methods(self):
        """The quant.methods.Method's this config runs, in the engine's order."""
        return components(self.method)

    @property
    def recon_lrs(self) -> tuple[float, float]:
        """(rounding-or-weight lr, activation lr) resolved against the mode's defaults."""
        lr, act_lr = RECON_LRS.get(self.recon, (None, None))
        return (lr if self.recon_lr is None else float(self.recon_lr),
                act_lr if self.recon_act_lr is None else float(self.recon_act_lr))

    @property
    def use_tpq(self) -> bool:
        """TPQ resolved against the method default."""
        return any(m.tpq_default for m in self.methods) if self.tpq is None else bool(self.tpq)

    @property
    def quantizes(self) -> bool:
        """False for a method that leaves the model as it is (fp): see quantizes()."""
        return quantizes(self)

    @property
    def label(self) -> str:
        """A short name such as 'ptq4dit W4A8' or 'dilatequant W4A4 TPQ'."""
        if not self.quantizes:
            return "fp"
        bits = lambda b: "16" if b is None else str(b)  # noqa: E731
        name = f"{self.method} W{bits(self.w_bits)}A{bits(self.a_bits)}"
        name += self.format_label
        name += "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.changed_options.items())
        if self.attn_bits is not None:
            name += f" attn{self.attn_bits}"
        if self.layer_bits:
            kept = sorted({f"W{bits(w)}A{bits(a)}" for w, a in self.layer_bits.values()})
            name += f" +{len(self.layer_bits)} at {'/'.join(kept)}"
        if self.use_tpq:
            name += " TPQ"
        if self.recon != "none":
            name += " +" + {"adaround": "AdaRound", "bkd": "BKD"}.get(self.recon, self.recon)
            if self.recon_loss == "guided":
                name += " guided"

        return name

    @property
    def format_label(self) -> str:
        """'' for today's int grids, else e.g. ' mxfp4', ' w:nvfp4' or ' w:int4-g32 a:fp8_e4m3' ('+tok' for
        per-token activations)."""
        w = self.w_spec.describe() if self.w_spec is not None else "int"
        a = self.a_spec.describe() if self.a_spec is not None else "int"
        if self.a_per_token:
            a += "/tok"
        if w == a and w != "int":
            return " " + w
        return "".join(f" {side}:{f}" for side, f in (("w", w), ("a", a)) if f != "int")

    @property
    def w_spec(self) -> FormatSpec | None:
        """The weights' FormatSpec (None when weights stay in float)."""
        return None if is_off(self.w_bits) else parse_format(self.w_format, self.w_bits, self.w_group, "w")

    @property
    def a_spec(self) -> FormatSpec | None:
        """The activations' FormatSpec (None when activations stay in float)."""
        return None if is_off(self.a_bits) else parse_format(self.a_format, self.a_bits, self.a_group, "a")

    def formats_for(self, layer: str) -> tuple[FormatSpec | None, FormatSpec | None]:
        """(weight, activation) FormatSpec of one layer. A layer_bits entry whose bits the chosen format cannot
        hold (keep8 layers under mxfp4) runs that side on the int grid at its own bits."""
        w_bits, a_bits = self.bits_for(layer)
        out = []
        for side, bits, name, group in (("w", w_bits, self.w_format, self.w_group),
                                        ("a", a_bits, self.a_format, self.a_group)):
            if is_off(bits):
                out.append(None)
            elif format_bits(name) not in (None, bits):
                out.append(int_format(bits))
            else:
                out.append(parse_format(name, bits, group, side))
        return out[0], out[1]

    def validate(self) -> "QuantConfig":
        """Raise ValueError naming the first bad field and what it accepts; return self when valid. Runs when
        the config is made; call it again only after assigning a field directly."""
        if not isinstance(self.recon, str):
            raise ValueError(f"recon must be a string, got {self.recon!r}")
        self.method = compose(self.method, self.recon)
        check_all(self)
        self.w_spec, self.a_spec  # noqa: B018 (each parses its format and bits, raising on a mismatch)
        if self.a_per_token and self.a_group is not None:
            raise ValueError("a_per_token and a_group both set: choose per-token or per-block activation scales")
        if self.a_per_token and self.a_spec is not None and self.a_spec.blocked:
            raise ValueError(f"a_per_token with a_format {self.a_format}: a block format has its own scales")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of the method's options, got {self.options!r}")
        known = {o.name for m in self.methods for o in m.describe_options()}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ValueError(f"method {self.method} has no option(s) {unknown}; its options: "
                             f"{sorted(known) or 'none'}")
        # the full, checked set: a stored config names every value it ran with
        self.options = {k: v for m in self.methods for k, v in dataclasses.asdict(self.options_for(m.name)).items()}
        self._check_layer_bits()
        if self.recon != "none" and not self.quantizes:
            raise ValueError("recon needs a quantizing method; method 'fp' quantizes nothing")
        return self

    def _check_layer_bits(self) -> None:
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"layer_bits must map layer name patterns to [w_bits, a_bits], got {self.layer_bits!r}")
        for pattern, pair in self.layer_bits.items():
            if not isinstance(pattern, str) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"layer_bits[{pattern!r}] must be [w_bits, a_bits], got {pair!r}")
            for v in pair:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == 16)):
                    raise ValueError(f"layer_bits[{pattern!r}] holds {v!r}; bits are integers from 2 to 8, "
                                     "or 16 / null for no quantization")
        self.layer_bits = {k: list(v) for k, v in self.layer_bits.items()}

    def bits_for(self, layer: str) -> tuple[int | None, int | None]:
        """(w_bits, a_bits) of one layer: its layer_bits entry if a pattern matches, else the global ones."""
        for pattern, (w, a) in self.layer_bits.items():
            if is_excluded(layer, [pattern]):
                return w, a
        return self.w_bits, self.a_bits

    def to_dict(self) -> dict:
        """Every field; the number-format fields only when set, so a config of the int grids serialises (and
        keys stored runs) exactly as before formats existed."""
        d = dataclasses.asdict(self)
        for name, default in FORMAT_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        d["exclude"] = list(self.exclude)
        d["options"] = dict(self.options)
        d["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, strict: bool = False) -> "QuantConfig":
        """Build and validate; unknown keys are an error (a typo must not silently fall back to a default).

        Method options may also be given flat, beside the common fields ({"method": "smoothquant",
        "alpha": 0.3}), as configs stored earlier hold them: a flat option of the chosen method goes into
        `options`. A flat option of another method is ignored in a stored config (those held them all) and,
        with `strict` (a file a person wrote: dqlab quantize --config), refused by name."""
        if not isinstance(d, dict):
            raise ValueError(f"a quantization config must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        method = d.get("method", cls.method)
        if not isinstance(method, str):
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(NAMES)}")
        own = {o.name for m in components(method) for o in m.describe_options()}  # names an unknown method
        owners = {o.name: o.method for o in all_options()}
        flat = {k: d.pop(k) for k in list(d) if k not in names and k in own}
        foreign = [k for k in d if k not in names and k in owners]
        if strict and foreign:
            raise ValueError(f"{foreign[0]} is an option of {owners[foreign[0]]}, not of {method}; drop it or set "
                             f"\"method\": \"{owners[foreign[0]]}\"")
        for k in foreign:
            d.pop(k)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; known fields: {sorted(names)}")
        if d.get("options") is not None and not isinstance(d["options"], dict):
            raise ValueError(f"options must be a dict of the method's options, got {d['options']!r}")
        if flat:
            d["options"] = {**flat, **(d.get("options") or {})}
        if "exclude" in d and d["exclude"] is not None:
            if not isinstance(d["exclude"], (list, tuple)):
                raise ValueError(f"exclude must be a list of layer name patterns, got {d['exclude']!r}; write "
                                 f"[{json.dumps(d['exclude'])}] for one pattern")
            d["exclude"] = list(d["exclude"])
        if "recon_input" in d and "recon_p" not in d and d.get("recon") == "adaround":
            # a whole config written before the Lp settings were fields: it ran with the earlier defaults
            d.setdefault("recon_p", LEGACY_RECON["recon_p"])
            d.setdefault("recon_sum", LEGACY_RECON["recon_sum"])
            if d.get("recon_act_lr") is None:
                d["recon_act_lr"] = LEGACY_RECON["adaround_act_lr"]
        return cls(**d)

    @classmethod
    def describe(cls):
        """The common options (quant.options.Option), in declaration order."""
        return describe(cls)

    @classmethod
    def from_json(cls, text: str, strict: bool = True) -> "QuantConfig":
        """A config from JSON text a person wrote or downloaded: size and depth bounded (quant.guards), and a
        flat option of another method refused (see from_dict)."""
        from quant.guards import loads_json

        return cls.from_dict(loads_json(text, "quantization config"), strict=strict)
