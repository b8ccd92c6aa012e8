"""Salience: which input channels of each linear or conv layer carry extreme values, per timestep and sample.

For a linear layer Y = X W^T (W is [out, in]) and input channel j (docs/ARCHITECTURE.md; PTQ4DiT, Wu et al.
2024, eq. 3):
    activation salience  s(X_j) = max over tokens of |X_j|   (one value per sample and timestep)
    weight salience      s(W_j) = max over output rows of |W_oj|
For a convolution (a UNet's convs, a DiT's patch embedding) the tokens are the spatial positions and the
weight's rows are its output channels and kernel positions: s(W_j) = max over o, kh, kw of |W[o, j, kh, kw]|.
A channel that is salient in X but not in W (or the reverse) can be balanced by a per-channel scale; that
is what PTQ4DiT's CSB and SmoothQuant exploit, and why the timestep matters: s(X) moves as denoising goes on.

`collect(bundle, SalienceConfig(...))` runs ONE sampling pass (analysis.models.sampling.sample) with forward hooks
(quant.observers.InputObserver) on every layer the quantizer covers (nn.Linear and nn.Conv2d), and
optionally on the attention operands q, k, v and the softmax output. The hooks reduce on the model's device; results move to the CPU
once, after the pass. The guidance batch's halves stay apart: rows are ordered [conditional samples;
unconditional samples], each with its label (the null label marks the unconditional half). A module that
runs twice in one forward (block 0's embedding, called again by the final layer) gets a second key "name@2".

The result, SalienceStats, holds numpy arrays, saves to and loads from one .npz file, and converts to tidy
pandas frames. Derived measures (rank correlation, quantization error, temporal variability, layer
difficulty) live in analysis.salience.measures; figures in analysis.plots.salience.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from analysis.models.bundle import ModelBundle
from analysis.salience.channel_error import activation_quant_mse_bits, weight_quant_mse
from quant.families import (all_kinds, attention_modules, base_name, layer_block, layer_info,  # noqa: F401
                            layer_kind, layer_stage)
from quant.forward import forward_batches
from quant.measures import weight_salience
from quant.observers import LayerInputHooks

FORMAT = "dqlab-salience"
FORMAT_VERSION = 1

# Layer kinds, stages and readable names come from the family table (quant.families).
KINDS = all_kinds()


def layer_menu(layers: list[str], family: str | None = None) -> dict[str, list[str]]:
    """Layers grouped for a picker by stage ({"block 0": [...], ..., "final layer": [...]} for a DiT,
    {"input", "down 0", ..., "middle", "up 0", ..., "output"} for a UNet), stages in forward order, each in
    the order data flows through it (the family's kind order). Within a kind, layers keep the order of
    `layers` (module order for SalienceStats.layers)."""
    infos = {key: layer_info(key, family) for key in layers}
    groups: dict[tuple[int, str], list[str]] = {}
    for key, info in infos.items():
        groups.setdefault((info.stage_position, info.stage), []).append(key)
    return {label: sorted(keys, key=lambda k: infos[k].kind_index)  # stable: module order within a kind
            for (_, label), keys in sorted(groups.items())}


@dataclasses.dataclass
class SalienceConfig:
    """What one collecting pass samples and records.

    per_sample: keep one row per calibration sample (and half); False reduces each forward on the device to
        one row per half (max of |X| and max, min of min over the samples), which a DiT-XL/2 run at many
        steps needs: per-sample rows there take [steps x 2N x ~360k channels] floats.
    attention: also record q, k, v (per channel) and the softmax output (per head) of every attention.
    layers: a regular expression; only layers (and attention modules) whose name matches are observed.
    mse_bits: bit-widths for the per-channel quantization error; weights at each, and activations by a
        second forward per timestep over the recorded inputs (timed apart from the collecting pass).
    """

    steps: int = 50
    samples: int = 16
    guidance: float | None = None  # None: the bundle's default
    scheduler: str = "ddim"
    batch_size: int | None = None
    first_seed: int = 0  # sample i uses seed first_seed + i
    labels: tuple[int, ...] | None = None  # None: sample i gets class i mod num_classes
    prompts: tuple[str, ...] | None = None  # a text-to-image model: sample i gets prompt i mod P (None: the
    # bundled calibration set)
    per_sample: bool = True
    attention: bool = False
    layers: str | None = None
    mse_bits: tuple[int, ...] = ()

    def validate(self, bundle: ModelBundle) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.labels is not None and len(self.labels) != self.samples:
            raise ValueError(f"got {len(self.labels)} labels for {self.samples} samples; give one per sample")
        bad = [b for b in self.mse_bits if not 2 <= int(b) <= 8]
        if bad:
            raise ValueError(f"mse_bits must be between 2 and 8, got {bad[0]}")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as exc:
                raise ValueError(f"layers {self.layers!r} is not a valid regular expression: {exc}") from None

    def sample_labels(self, num_classes: int) -> list[int] | None:
        """Sample i's class (i mod num_classes unless given); None for an unconditional model (num_classes 0)."""
        if num_classes == 0:
            return None
        return list(self.labels) if self.labels is not None else [i % num_classes for i in range(self.samples)]

    def seeds(self) -> list[int]:
        return [self.first_seed + i for i in range(self.samples)]

    def labels_for(self, bundle) -> list[int] | None:
        """What each sample is conditioned on: a prompt id for a text-to-image model (each prompt encoded once),
        a class for a class-conditional one, None for an unconditional one."""
        if bundle.text_conditioned:
            return bundle.prompt_ids(self.prompt_list())
        if self.prompts:
            raise ValueError(f"{bundle.name} is not a text-to-image model: collect its salience without prompts")
        return self.sample_labels(bundle.num_classes)

    def prompt_list(self) -> list[str]:
        """Sample i's prompt (a text-to-image model)."""
        from analysis.models.prompts import cycle, read_prompt_set

        return cycle(list(self.prompts) if self.prompts else read_prompt_set("calibration"), self.samples)


@dataclasses.dataclass
class SalienceStats:
    """Per-channel statistics of every observed layer. Arrays are numpy float32 on the CPU.

    Rows: R = H x N for per-sample statistics (N samples per half; halves ordered cond, uncond), or R = H
    when reduced on the device (then row_labels is -1 for the conditional half, classes mixed).
    """

    model: str
    timesteps: np.ndarray  # [T] int64, in sampling order (noisiest first)
    row_labels: np.ndarray  # [R] class of each row; null_label marks the unconditional half
    row_seeds: np.ndarray  # [R] seed of each row; -1 when rows were reduced
    halves: list[str]  # ["cond", "uncond"], or ["cond"] without guidance
    null_label: int
    act_absmax: dict[str, np.ndarray]  # key -> [T, R, C] max over tokens of |X_j|
    act_min: dict[str, np.ndarray]  # key -> [T, H, C] min over tokens and the half's samples
    act_max: dict[str, np.ndarray]  # key -> [T, H, C] max over tokens and the half's samples
    weight_absmax: dict[str, np.ndarray]  # linear key -> [C] max over output rows of |W_j|
    mse_bits: tuple[int, ...] = ()
    act_mse: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # key -> [T, len(bits), C]
    weight_mse: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # key -> [len(bits), C]
    info: dict = dataclasses.field(default_factory=dict)  # steps, guidance, scheduler, seconds, ...
    # Derived measures computed from the arrays above (rank correlations, the difficulty table), kept so an
    # app rerun does not redo them: at DiT-XL/2 size (56 linear layers x 250 steps x up to 4608 channels)
    # ranking every layer's channels takes seconds. Not saved; cleared when the statistics change.
    derived: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- shape and naming -------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.act_absmax)

    @property
    def per_sample(self) -> bool:
        return bool((self.row_seeds >= 0).any())

    @property
    def row_uncond(self) -> np.ndarray:
        """[R] True for rows of the unconditional half."""
        return self.row_labels == self.null_label

    def step_of(self, timestep: int) -> int:
        """Index of `timestep` in sampling order; ValueError naming the recorded range otherwise."""
        hits = np.flatnonzero(self.timesteps == int(timestep))
        if not hits.size:
            raise ValueError(f"timestep {timestep} was not recorded; recorded: {self.timesteps.min()}-"
                             f"{self.timesteps.max()} ({len(self.timesteps)} steps)")
        return int(hits[0])

    def check_layer(self, layer: str) -> None:
        if layer not in self.act_absmax:
            raise KeyError(f"no statistics for layer {layer!r}; {len(self.layers)} layers recorded, "
                           f"e.g. {self.layers[:3]}")

    def channel_salience(self, layer: str, rows: str = "all", reduce: str = "max") -> np.ndarray:
        """[T, C]: per timestep, the activation salience over the chosen rows ("all", "cond", "uncond").

        reduce="max" is what a per-timestep quantizer must cover; "mean" is the typical sample.
        """
        self.check_layer(layer)
        a = self.act_absmax[layer]
        if rows != "all":
            if rows not in ("cond", "uncond"):
                raise ValueError(f"rows must be 'all', 'cond' or 'uncond', got {rows!r}")
            keep = self.row_uncond if rows == "uncond" else ~self.row_uncond
            if not keep.any():
                raise ValueError(f"no {rows} rows were recorded (guidance off?)")
            a = a[:, keep]
        if reduce == "max":
            return a.max(axis=1)
        if reduce == "mean":
            return a.mean(axis=1)
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")

    # ---- save / load --------------------------------------------------------------------------------
    def save(self, path: str | Path, compress: bool = False) -> Path:
        """One .npz file: a JSON header plus one array per (statistic, layer). Loads without pickle."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"salience statistics save to a .npz file, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        layers = self.layers
        header = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.model, "halves": self.halves,
                  "null_label": self.null_label, "layers": layers, "mse_bits": list(self.mse_bits),
                  "weight_layers": [k for k in layers if k in self.weight_absmax],
                  "mse_layers": [k for k in layers if k in self.act_mse],
                  "weight_mse_layers": [k for k in layers if k in self.weight_mse], "info": self.info}
        arrays = {"header": np.array(json.dumps(header, default=str)), "timesteps": self.timesteps,
                  "row_labels": self.row_labels, "row_seeds": self.row_seeds}
        for i, key in enumerate(layers):  # indexed names: layer names contain dots and '@'
            arrays[f"act_absmax_{i}"] = self.act_absmax[key]
            arrays[f"act_min_{i}"] = self.act_min[key]
            arrays[f"act_max_{i}"] = self.act_max[key]
            for field in ("weight_absmax", "act_mse", "weight_mse"):
                if key in getattr(self, field):
                    arrays[f"{field}_{i}"] = getattr(self, field)[key]
        (np.savez_compressed if compress else np.savez)(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SalienceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no salience file at {path}; create one with `dqlab salience --out {path.name}`")
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files:
                raise ValueError(f"{path} is not a salience statistics file (no header)")
            header = json.loads(str(z["header"]))
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a salience statistics file (format {header.get('format')!r})")
            layers = header["layers"]
            get = {field: {k: z[f"{field}_{i}"] for i, k in enumerate(layers) if f"{field}_{i}" in z.files}
                   for field in ("act_absmax", "act_min", "act_max", "weight_absmax", "act_mse", "weight_mse")}
            return cls(model=header["model"], timesteps=z["timesteps"], row_labels=z["row_labels"],
                       row_seeds=z["row_seeds"], halves=header["halves"], null_label=int(header["null_label"]),
                       mse_bits=tuple(header["mse_bits"]), info=header["info"], **get)

    # ---- tidy frames --------------------------------------------------------------------------------
    def layer_frame(self):
        """One row per observed key: layer, block, kind, channels, whether it has a weight."""
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "block": [layer_block(k) for k in self.layers],
                             "kind": [layer_kind(k) for k in self.layers],
                             "channels": [self.act_absmax[k].shape[-1] for k in self.layers],
                             "has_weight": [k in self.weight_absmax for k in self.layers]})

    def frame(self, layers: list[str] | None = None, per_row: bool = False):
        """Tidy activation statistics: one row per (layer, timestep, channel[, sample row]).

        Columns: layer, block, kind, step, timestep, channel, absmax (max over the rows unless per_row),
        min, max (over all rows); per_row adds row, label, seed, uncond and gives absmax per row.
        """
        import pandas as pd

        parts = []
        for key in self._pick(layers):
            a = self.act_absmax[key]
            T, R, C = a.shape
            step, chan = np.meshgrid(np.arange(T), np.arange(C), indexing="ij")
            cols = {"layer": key, "block": layer_block(key), "kind": layer_kind(key)}
            lo, hi = self.act_min[key].min(axis=1), self.act_max[key].max(axis=1)
            if per_row:
                rep = lambda v: np.repeat(v[:, None, :], R, axis=1).ravel()  # noqa: E731  [T, C] -> [T, R, C]
                row = np.broadcast_to(np.arange(R)[None, :, None], a.shape).ravel()
                parts.append(pd.DataFrame({**cols, "step": rep(step), "timestep": self.timesteps[rep(step)],
                                           "row": row, "label": self.row_labels[row], "seed": self.row_seeds[row],
                                           "uncond": self.row_uncond[row], "channel": rep(chan),
                                           "absmax": a.ravel(), "min": rep(lo), "max": rep(hi)}))
            else:
                parts.append(pd.DataFrame({**cols, "step": step.ravel(), "timestep": self.timesteps[step.ravel()],
                                           "channel": chan.ravel(), "absmax": a.max(axis=1).ravel(),
                                           "min": lo.ravel(), "max": hi.ravel()}))
        return pd.concat(parts, ignore_index=True)

    def weight_frame(self, layers: list[str] | None = None):
        """Tidy weight statistics: layer, block, kind, channel, weight_absmax (+ weight_mse_w{b} per bit-width)."""
        import pandas as pd

        parts = []
        for key in self._pick(layers):
            if key not in self.weight_absmax:
                continue
            w = self.weight_absmax[key]
            cols = {"layer": key, "block": layer_block(key), "kind": layer_kind(key),
                    "channel": np.arange(w.shape[0]), "weight_absmax": w}
            for i, b in enumerate(self.mse_bits):
                if key in self.weight_mse:
                    cols[f"weight_mse_w{b}"] = self.weight_mse[key][i]
            parts.append(pd.DataFrame(cols))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["layer", "block", "kind", "channel", "weight_absmax"])

    def channel_table(self, layers: list[str] | None = None):
        """Everything per (layer, timestep, channel) in one tidy frame, e.g. for a CSV download.

        Columns: layer, block, kind, step, timestep, channel, absmax (max over all rows), absmax_cond and
        absmax_uncond with guidance, min, max, weight_absmax (empty for attention operands), and per
        collected bit-width act_mse_a{b} / weight_mse_w{b}.
        """
        import pandas as pd

        parts = []
        for key in self._pick(layers):
            part = self.frame([key])
            T = len(self.timesteps)
            at = part.columns.get_loc("absmax") + 1
            if len(self.halves) == 2:  # inserted after absmax, uncond first so cond ends up before it
                for half in ("uncond", "cond"):
                    part.insert(at, f"absmax_{half}", self.channel_salience(key, rows=half).ravel())
            w = self.weight_absmax.get(key)
            part["weight_absmax"] = np.tile(w, T) if w is not None else np.nan
            for i, b in enumerate(self.mse_bits):
                part[f"act_mse_a{b}"] = self.act_mse[key][:, i].ravel() if key in self.act_mse else np.nan
                part[f"weight_mse_w{b}"] = np.tile(self.weight_mse[key][i], T) if key in self.weight_mse else np.nan
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    def to_csv(self, layers: list[str] | None = None) -> bytes:
        """channel_table as UTF-8 CSV bytes (what the app's download button hands out)."""
        return self.channel_table(layers).to_csv(index=False).encode()

    def _pick(self, layers: list[str] | None) -> list[str]:
        layers = self.layers if layers is None else list(layers)
        for key in layers:
            self.check_layer(key)
        return layers


# ---- collection ----------------------------------------------------------------------------------------
def observed_modules(transformer: torch.nn.Module, pattern: str | None = None,
                     attention: bool = False) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """(linear and conv layers, attention modules) of the denoiser whose names match `pattern`."""
    from quant.wrap import covered_layers

    match = (lambda name: True) if pattern is None else (lambda name: re.search(pattern, name) is not None)  # noqa: E731
    linears = {n: m for n, m in covered_layers(transformer).items() if match(n)}
    attns = {}
    if attention:
        attns = {n: m for n, m in attention_modules(transformer).items() if match(n)}
    if not linears and not attns:
        raise ValueError(f"no layer of the model matches {pattern!r}; try e.g. 'transformer_blocks\\.0\\.' "
                         "(a DiT) or 'down_blocks\\.0\\.' (a UNet)")
    return linears, attns


@torch.no_grad()
def collect(bundle: ModelBundle, config: SalienceConfig | None = None,
            on_step: Callable[[int, int], None] | None = None) -> SalienceStats:
    """One sampling pass with hooks on every observed layer -> SalienceStats (see the module docstring).

    info["seconds"] is the wall time of the collecting pass (sampling with hooks, the host copy and the
    arrangement into arrays), info["cpu_seconds"] the CPU time this process spent on it (all threads; it
    is what stays comparable on a machine shared with other jobs); info["mse_seconds"] the optional
    quantization-error pass after it.
    """
    from analysis.models.sampling import sample
    from quant.observers import InputObserver

    config = config or SalienceConfig()
    config.validate(bundle)
    model = bundle.denoiser
    seeds = config.seeds()
    labels = config.labels_for(bundle)
    guidance = bundle.default_guidance if config.guidance is None else float(config.guidance)
    linears, attns = observed_modules(model, config.layers, config.attention)
    start, cpu_start = time.perf_counter(), time.process_time()
    # The with-block removes every hook on exit, also when sampling raises.
    with InputObserver(model, linears, attention=attns,
                       group_null_label=None if config.per_sample else bundle.null_label) as observer:
        result = sample(bundle, labels, seeds, steps=config.steps, guidance=guidance, scheduler=config.scheduler,
                        batch_size=config.batch_size, on_step=on_step, decode=False,
                        record="all" if config.mse_bits else None)
    raw = observer.stats()
    guided = guidance > 1.0
    halves = ["cond", "uncond"] if guided else ["cond"]
    timesteps = np.array(list(dict.fromkeys(raw.t.tolist())), dtype=np.int64)
    if config.per_sample:
        labels = result.labels  # the sampler's labels (-1 for every row of an unconditional model)
        row_labels = np.array(labels + ([bundle.null_label] * len(labels) if guided else []), dtype=np.int64)
        row_seeds = np.array(seeds * len(halves), dtype=np.int64)
        place = _per_sample_places(raw.t.numpy(), raw.y.numpy(), timesteps, row_labels, len(labels),
                                   config.batch_size or len(labels), guided)
    else:
        row_labels = np.array([-1, bundle.null_label][:len(halves)], dtype=np.int64)
        row_seeds = np.full(len(halves), -1, dtype=np.int64)
        place = (_step_index(raw.t.numpy(), timesteps), (raw.y.numpy() == bundle.null_label).astype(np.int64))
    act_absmax, act_min, act_max = {}, {}, {}
    for key in raw.layers:
        act_absmax[key], act_min[key], act_max[key] = _arrange(raw.absmax[key], raw.cmin[key], raw.cmax[key],
                                                               place, len(timesteps), len(row_labels), len(halves))
    modules = dict(model.named_modules())
    weight_absmax = {key: _weight_salience(modules[base_name(key)]) for key in act_absmax
                     if isinstance(modules.get(base_name(key)), (torch.nn.Linear, torch.nn.Conv2d))}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    info = {"steps": config.steps, "samples": config.samples, "guidance": guidance, "scheduler": config.scheduler,
            "batch_size": config.batch_size, "per_sample": config.per_sample, "attention": config.attention,
            "layers_pattern": config.layers, "device": str(bundle.device), "dtype": str(bundle.dtype).replace("torch.", ""),
            "seconds": seconds, "cpu_seconds": cpu_seconds, "sampling_seconds": result.seconds}
    if result.prompts is not None:
        info["prompts"] = list(dict.fromkeys(result.prompts))
        info["negative_prompt"] = bundle.negative_prompt
    stats = SalienceStats(model=bundle.name, timesteps=timesteps, row_labels=row_labels, row_seeds=row_seeds,
                          halves=halves, null_label=bundle.null_label, act_absmax=act_absmax, act_min=act_min,
                          act_max=act_max, weight_absmax=weight_absmax, info=info)
    if config.mse_bits:
        t0 = time.perf_counter()
        add_quant_error(stats, model, result.calibration, config.mse_bits)
        stats.info["mse_seconds"] = time.perf_counter() - t0
    return stats


def _weight_salience(linear: torch.nn.Module) -> np.ndarray:
    return weight_salience(linear.weight).float().cpu().numpy()


def _step_index(t: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Index into `timesteps` (sampling order) of every value of t."""
    order = np.argsort(timesteps)
    return order[np.searchsorted(timesteps, t, sorter=order)]


def _per_sample_places(t: np.ndarray, y: np.ndarray, timesteps: np.ndarray, row_labels: np.ndarray, n: int,
                       batch_size: int, guided: bool) -> tuple[np.ndarray, np.ndarray]:
    """(step, row) of every observed row, from the sampler's order: for each batch of samples, every step
    feeds [batch cond; batch uncond]. Checked against the recorded labels, so a change of order fails loudly."""
    if len(np.unique(timesteps)) != len(timesteps):
        raise RuntimeError("a timestep repeats within the sampling pass; rows cannot be told apart by timestep")
    step = _step_index(t, timesteps)
    # position of each row among the rows of its step, in arrival order
    by_step = np.argsort(step, kind="stable")
    starts = np.searchsorted(step[by_step], np.arange(len(timesteps)))
    pos = np.empty_like(step)
    pos[by_step] = np.arange(len(step)) - starts[step[by_step]]
    arrival = []
    for b0 in range(0, n, batch_size):
        idx = np.arange(b0, min(n, b0 + batch_size))
        arrival += [idx, idx + n] if guided else [idx]
    arrival = np.concatenate(arrival)
    if pos.max() >= len(arrival) or not np.array_equal(row_labels[arrival[pos]], y):
        raise RuntimeError("the observed rows do not follow the sampler's [cond; uncond] batch order; "
                           "collect with per_sample=False")
    return step, arrival[pos]


def _arrange(absmax: torch.Tensor, cmin: torch.Tensor, cmax: torch.Tensor, place: tuple[np.ndarray, np.ndarray],
             n_steps: int, n_rows: int, n_halves: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scatter observed rows to [T, R, C] (max / min where several rows land on one place), halves to [T, H, C]."""
    step, row = (torch.from_numpy(v) for v in place)
    flat = step * n_rows + row
    c = absmax.shape[1]

    def scatter(values: torch.Tensor, how: str, size: int, index: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros((size, c))
        return out.scatter_reduce(0, index[:, None].expand(-1, c), values, how, include_self=False)

    a = scatter(absmax, "amax", n_steps * n_rows, flat).reshape(n_steps, n_rows, c)
    per_half = n_rows // n_halves
    half_index = step * n_halves + row // per_half
    lo = scatter(cmin, "amin", n_steps * n_halves, half_index).reshape(n_steps, n_halves, c)
    hi = scatter(cmax, "amax", n_steps * n_halves, half_index).reshape(n_steps, n_halves, c)
    return a.numpy(), lo.numpy(), hi.numpy()


@torch.no_grad()
def add_quant_error(stats: SalienceStats, model: torch.nn.Module, calibration, bits: tuple[int, ...]) -> SalienceStats:
    """Fill stats.act_mse / weight_mse: per-channel MSE of fake quantization at each bit-width.

    Weights: per output channel (axis 0), MSE averaged over output rows -> one value per input channel.
    Activations: one per-tensor min-max quantizer per timestep (what a time-step-aware quantizer, TPQ, would
    calibrate on exactly these inputs), MSE averaged over tokens and samples. Runs one forward per timestep
    over the recorded transformer inputs, with hooks on the linear layers of `stats`. The errors stay on the
    model's device until the last timestep (no host copy per hook), and layers fed the very same tensor
    (to_q, to_k, to_v) share one computation.
    """
    if calibration is None:
        raise ValueError("no recorded transformer inputs: collect with mse_bits set to get activation errors")
    bits = tuple(int(b) for b in bits)
    modules = dict(model.named_modules())
    keys = [k for k in stats.layers if k in stats.weight_absmax]
    stats.weight_mse = {k: np.stack([weight_quant_mse(modules[base_name(k)].weight, b) for b in bits]) for k in keys}
    errors: dict[str, list[torch.Tensor]] = {k: [] for k in keys}  # key -> one [len(bits), C] per timestep
    names = sorted({base_name(k) for k in keys})

    def on_input(key: str, x: torch.Tensor) -> None:
        if key in errors:  # layers fed the very same tensor (to_q, to_k, to_v) share one computation
            errors[key].append(hooks.cached(x, lambda v: activation_quant_mse_bits(v, bits)))

    # one forward per timestep, so each call's error lands in that timestep's row
    per_step = [(calibration.x[m], calibration.t[m], calibration.y[m])
                for m in (calibration.t == t for t in stats.timesteps.tolist())]
    with LayerInputHooks(model, {n: modules[n] for n in names}, on_input) as hooks:
        forward_batches(model, per_step)
    T = len(stats.timesteps)
    for key, per_step in errors.items():
        if len(per_step) != T:
            raise RuntimeError(f"{key} ran {len(per_step)} times over {T} timesteps; cannot place its errors")
    stats.act_mse = {k: torch.stack(v).float().cpu().numpy() for k, v in errors.items()}  # [T, len(bits), C]
    stats.derived.clear()
    stats.mse_bits = bits
    return stats


def collect_timed(bundle: ModelBundle, config: SalienceConfig, repeats: int = 1, baseline: bool = True,
                  say: Callable[[str], None] | None = None) -> tuple[SalienceStats, dict]:
    """collect(), timed against plain sampling with identical settings in the same run: a one-step warm-up,
    then `repeats` pairs of a plain pass (when `baseline`) and a collecting pass.

    Returns (stats of the last collecting pass, timing): seconds (fastest collecting pass), plain_seconds and
    collect_seconds (every pass), their process CPU times, overhead_vs_sampling (fastest over fastest, which
    discounts bursts of load from other processes), cpu_overhead_vs_sampling (the same in CPU time, which a
    busy machine moves far less) and overhead_paired_median (median over repeats of collecting / the plain
    pass just before it). Ratios are None without the baseline. The ratios are also put into stats.info."""
    from analysis.models.sampling import sample

    say = say or (lambda text: None)
    seeds = config.seeds()
    labels = config.labels_for(bundle)
    # Warm-up: the first forward pays one-off allocation costs that would otherwise bias the first timed pass.
    sample(bundle, labels and labels[:1], seeds[:1], steps=1, guidance=config.guidance, scheduler=config.scheduler, decode=False)
    plain, collecting, plain_cpu, collecting_cpu, stats = [], [], [], [], None
    for r in range(repeats):
        if baseline:
            say(f"plain sampling pass {r + 1}/{repeats} ...")
            t0, c0 = time.perf_counter(), time.process_time()
            sample(bundle, labels, seeds, steps=config.steps, guidance=config.guidance, scheduler=config.scheduler,
                   batch_size=config.batch_size, decode=False)
            plain.append(time.perf_counter() - t0)
            plain_cpu.append(time.process_time() - c0)
        say(f"collecting pass {r + 1}/{repeats} ...")
        stats = collect(bundle, config)
        collecting.append(stats.info["seconds"])
        collecting_cpu.append(stats.info["cpu_seconds"])
    seconds = min(collecting)
    timing = {
        "seconds": seconds, "plain_seconds": plain, "collect_seconds": collecting,
        "plain_cpu_seconds": plain_cpu, "collect_cpu_seconds": collecting_cpu,
        "overhead_vs_sampling": round(seconds / min(plain), 3) if plain else None,
        "cpu_overhead_vs_sampling": round(min(collecting_cpu) / min(plain_cpu), 3) if plain_cpu else None,
        "overhead_paired_median": (round(float(np.median([c / p for c, p in zip(collecting, plain)])), 3)
                                   if plain else None),
    }
    stats.info.update(overhead_vs_sampling=timing["overhead_vs_sampling"],
                      cpu_overhead_vs_sampling=timing["cpu_overhead_vs_sampling"], plain_seconds=plain,
                      collect_seconds=collecting)
    return stats, timing
