"""Block-wise optimization of a quantized DiT or UNet against its FP model, one unit at a time (the units its family declares,
quant.families).

For unit k, with x_fp the FP prefix's output and x_q the quantized prefix's output on the same rows:

    target   = unit_fp(x_fp)                        the FP unit on FP activations
    minimise   loss(unit_q(x_q), target)            only unit k's parameters move (quant.recon.trainers)
    then       x_fp <- target,  x_q <- unit_q(x_q)  with unit k frozen, and go on to unit k + 1

So each unit learns to undo the error its quantized prefix hands it (recon_input="fp" feeds x_fp instead).
Calibration rows (x_t, t, y) are drawn across all recorded timesteps of an FP sampling run; only the current
unit's inputs and outputs are held (quant.recon.cache), never a tensor per block.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn as nn

from quant.config import QuantConfig
from quant.families import Unit, recon_units
from quant.modules import find_timestep_context
from quant.recon.cache import ActivationCache
from quant.recon.trainers import TRAINERS, guided_view

ProgressFn = Callable[[int, int, int, float], None]  # (unit index, number of units, iteration, loss)
LOSS_POINTS = 50  # losses recorded (and progress calls made) per unit
EVAL_ROWS = 128  # rows per forward in the passes over all calibration rows


@dataclasses.dataclass
class ReconReport:
    """What the optimization did. units: one dict per unit with name, error_before / error_after (relative
    output error ||unit_q(x) - target|| / ||target|| over all rows, before and after its optimization),
    seconds, iterations, losses [[iteration, loss], ...], and the mode's convergence summary (adaround:
    rounding_binary, rounding_flipped; bkd: codes_changed)."""

    mode: str
    rows: int
    units: list[dict]
    seconds: float
    peak_cached_tensors: int
    peak_cached_bytes: int
    peak_device_bytes: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def calibration_rows(batches, rows: int, seed: int = 0,
                     paired: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rows` (x, t, y) rows drawn at random (fixed seed) from all calibration batches, so every recorded
    timestep is represented in proportion; all rows when there are fewer.

    paired: draw rows // 2 (conditional, unconditional) pairs (guidance_pairs) instead, returned as all the
    conditional rows followed by their unconditional twins in the same order (row i pairs with row i + P)."""
    x, t, y = (torch.cat([b[i] for b in batches]) for i in range(3))
    t, y = t.reshape(-1).long(), y.reshape(-1).long()
    gen = torch.Generator().manual_seed(seed)
    if paired:
        cond, uncond = guidance_pairs(x, t, y)
        if rows // 2 < len(cond):
            keep = torch.randperm(len(cond), generator=gen)[:max(rows // 2, 1)].sort().values
            cond, uncond = cond[keep], uncond[keep]
        order = torch.cat([cond, uncond])
        return x[order], t[order], y[order]
    if rows < len(x):
        keep = torch.randperm(len(x), generator=gen)[:rows].sort().values
        x, t, y = x[keep], t[keep], y[keep]
    return x, t, y


def guidance_pairs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional rows, their unconditional twins): classifier-free guidance feeds every image twice at a
    step, the same x_t and t with its class and with the null class. Twins are found by equal (x_t, t); the
    null class is the label every pair holds. ValueError when the rows do not come in such pairs (sampled
    without guidance, or by an unconditional model)."""
    groups: dict = {}
    for i in range(len(x)):
        groups.setdefault((int(t[i]), x[i].detach().cpu().numpy().tobytes()), []).append(i)
    pairs = [g for g in groups.values() if len(g) == 2 and int(y[g[0]]) != int(y[g[1]])]
    if not pairs or 2 * len(pairs) != len(x):
        raise ValueError("the guided reconstruction loss needs calibration rows in (conditional, unconditional) "
                         "pairs, as sampling with guidance > 1 records them; calibrate with guidance or use "
                         "recon_loss='rows'")
    common = set(int(v) for v in y[pairs[0]].tolist())
    for g in pairs[1:]:
        common &= set(int(v) for v in y[g].tolist())
    if len(common) != 1:
        raise ValueError("cannot tell the null class: no label is shared by every (conditional, unconditional) pair")
    null = common.pop()
    cond = torch.tensor([g[0] if int(y[g[1]]) == null else g[1] for g in pairs])
    uncond = torch.tensor([g[1] if int(y[g[1]]) == null else g[0] for g in pairs])
    return cond, uncond


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, batches, config: QuantConfig,
                on_progress: ProgressFn | None = None, copy_model: bool = True, autocast: bool = True,
                seed: int = 0, guidance: float | None = None) -> tuple[nn.Module, ReconReport]:
    """(optimized model, report). qmodel: a calibrated quantized model (quant.quantize); fp_model: its FP
    original (same module names); batches: (x, t, y) calibration batches. With copy_model the result is a new
    model and qmodel is left as it was. autocast: bfloat16 autocast for the quantized forward on CUDA.
    guidance: the scale s of config.recon_loss == "guided" (config.recon_guidance wins when set)."""
    if config.recon_guidance is not None:
        guidance = float(config.recon_guidance)
    if config.recon not in TRAINERS:
        raise ValueError(f"recon {config.recon!r} is not an optimization mode; choose one of {', '.join(TRAINERS)}")
    model = copy.deepcopy(qmodel) if copy_model else qmodel
    ctx = find_timestep_context(model)
    if ctx is None:
        raise ValueError("reconstruct needs a model made by quant.quantize (it routes timesteps to quantizers)")
    start = time.perf_counter()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    guided = config.recon_loss == "guided"
    if guided and guidance is None:
        raise ValueError("recon_loss='guided' needs the guidance scale: set recon_guidance, or calibrate on data "
                         "that records its guidance")
    x, t, y = calibration_rows(batches, config.recon_rows, seed, paired=guided)
    # the streams are float32 (the quantized copy trains in float32); the FP model runs in its own dtype
    fp_dtype = next(fp_model.parameters()).dtype
    x, t, y = x.to(device, torch.float32), t.to(device), y.to(device)
    quantized_input = config.recon_input == "quantized"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast and device.type == "cuda" \
        else contextlib.nullcontext
    gen = torch.Generator().manual_seed(seed)
    units = recon_units(model)
    cache = ActivationCache()
    cache.put("fp_in", x)
    cache.put("q_in", x)
    reports = []
    if dtype != torch.float32:
        model.float()  # optimizer state and rounding need float32; cast back at the end
    try:
        for k, unit in enumerate(units):
            unit_start = time.perf_counter()
            fp_in = cache["fp_in"]
            q_in = cache["q_in"] if quantized_input else fp_in
            with torch.no_grad():
                cache.put("fp_out", _run_all(fp_model, unit, fp_in.to(fp_dtype), t, y, None).float())
            target = cache["fp_out"]
            with torch.no_grad():
                before, _ = _run_and_compare(model, unit, ctx, q_in, target, t, y, keep=False)
            trainer = TRAINERS[config.recon](model, unit, *config.recon_lrs, p=config.recon_p,
                                             sum_over=config.recon_sum)
            losses = []
            if trainer.groups:
                report_fn = (lambda it, loss: on_progress(k, len(units), it, loss)) if on_progress else None
                losses = _optimize(model, unit, ctx, trainer, q_in, target, t, y, config, gen, amp, report_fn,
                                   guidance if guided else None)
            summary = trainer.finish()
            with torch.no_grad():
                after, q_out = _run_and_compare(model, unit, ctx, q_in, target, t, y,
                                                keep=unit.advances and quantized_input)
            if q_out is not None:
                cache.put("q_out", q_out)
            reports.append({"name": unit.name, "error_before": before, "error_after": after,
                            "iterations": config.recon_iters if trainer.groups else 0, "losses": losses,
                            "seconds": round(time.perf_counter() - unit_start, 3), **summary})
            _advance(cache, unit, quantized_input)
    finally:
        ctx.t = None
        if dtype != torch.float32:
            model.to(dtype)
    model.eval().requires_grad_(False)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return model, ReconReport(mode=config.recon, rows=len(x), units=reports,
                              seconds=round(time.perf_counter() - start, 3), peak_cached_tensors=cache.peak_tensors,
                              peak_cached_bytes=cache.peak_bytes, peak_device_bytes=peak)


def _advance(cache: ActivationCache, unit: Unit, quantized_input: bool) -> None:
    """The unit's outputs become the next unit's inputs; an embedding unit leaves the stream as it was."""
    fp_out, q_out = cache.pop("fp_out"), cache.pop("q_out")
    if not unit.advances:
        return
    cache.pop("fp_in")
    cache.pop("q_in")
    cache.put("fp_in", fp_out)
    cache.put("q_in", q_out if quantized_input else fp_out)


def _run_all(model: nn.Module, unit: Unit, stream: torch.Tensor, t, y, ctx) -> torch.Tensor:
    """The unit on every row, in chunks; returns the concatenated outputs."""
    outs = []
    for i in range(0, len(t), EVAL_ROWS):
        if ctx is not None:
            ctx.t = t[i:i + EVAL_ROWS]
        outs.append(unit.run(model, stream[i:i + EVAL_ROWS], t[i:i + EVAL_ROWS], y[i:i + EVAL_ROWS]))
    return torch.cat(outs)


def _run_and_compare(model, unit, ctx, q_in, target, t, y, keep: bool):
    """(relative error of the quantized unit vs target over all rows, its outputs when keep)."""
    num = den = 0.0
    outs = []
    for i in range(0, len(t), EVAL_ROWS):
        sl = slice(i, i + EVAL_ROWS)
        ctx.t = t[sl]
        out = unit.run(model, q_in[sl], t[sl], y[sl])
        ref = unit.part(target[sl])
        if keep:
            outs.append(out)
        out = unit.part(out)
        num += float((out.float() - ref.float()).pow(2).sum())
        den += float(ref.float().pow(2).sum())
    return (math.sqrt(num / den) if den > 0 else 0.0), (torch.cat(outs) if keep else None)


def _optimize(model, unit, ctx, trainer, q_in, target, t, y, config: QuantConfig, gen, amp, report_fn,
              guidance: float | None = None) -> list:
    """Adam over the trainer's groups for recon_iters steps of recon_batch random rows; returns the losses.
    guidance: rows are (conditional, unconditional) pairs (calibration_rows(paired=True)); each step draws
    recon_batch // 2 pairs and the loss compares trainers.guided_view of both sides."""
    iters = config.recon_iters
    groups = [{k: v for k, v in g.items() if k != "cosine"} for g in trainer.groups]
    opt = torch.optim.Adam(groups)
    cosine = [g["cosine"] for g in trainer.groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [
        (lambda i: 0.5 * (1 + math.cos(math.pi * i / iters))) if c else (lambda i: 1.0) for c in cosine])
    every = max(1, iters // LOSS_POINTS)
    losses = []
    with torch.enable_grad():
        for it in range(iters):
            if guidance is None:
                idx = torch.randint(len(t), (min(config.recon_batch, len(t)),), generator=gen).to(t.device)
            else:
                half = len(t) // 2
                pick = torch.randint(half, (max(1, min(config.recon_batch // 2, half)),), generator=gen)
                idx = torch.cat([pick, pick + half]).to(t.device)
            trainer.install()
            ctx.t = t[idx]
            with amp():
                out = unit.run(model, q_in[idx], t[idx], y[idx])
            out, ref = unit.part(out).float(), unit.part(target[idx]).float()
            if guidance is not None:
                out, ref = guided_view(out, guidance), guided_view(ref, guidance)
            loss, rec = trainer.loss(out, ref, it, iters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            trainer.project()
            if (it + 1) % every == 0 or it == iters - 1:
                value = float(rec.detach())
                losses.append([it + 1, value])
                if report_fn is not None:
                    report_fn(it + 1, value)
    trainer.install()  # the final values, without the graph of the last step
    return losses
