"""The lab's one speed and memory benchmark (bench/bench.py and `dqlab bench` print what this measures).

Two shape sets, each measured in the same run so that every figure is a ratio of two timings taken side by
side on the same machine:
    bundled   the bundled 16x16 digit DiT (width 128, 64 tokens): sampling, salience collection, every
              method's calibrate + quantize, and the transformer forward in FP32 / fake-quant / INT8
    dit-xl2   a random DiT with DiT-XL/2's block (width 1152, 16 heads of 72, MLP 4608, 256 tokens of a
              32x32x4 latent), as many blocks as asked: the forward and calibrate + quantize, where the
              papers' models spend their time
Times are medians of `repeats` runs after one warm-up. Peak memory is what a call allocates beyond what
was held before it (the weights): CUDA's max_memory_allocated above the start on a GPU, and on the CPU the
peak of live allocations replayed from torch's memory profiler in one extra, untimed call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import threading
import time
from typing import Callable

import torch

from analysis.models.bundle import ModelBundle
from quant.api import quantize
from quant.config import QuantConfig
from quant.int8 import int8_eligible, int8_layers, plan_int8, to_int8
from quant.modules import quant_layers

W8A8 = QuantConfig(method="baseline", w_bits=8, a_bits=8)
W8A8_SYMMETRIC = QuantConfig(method="baseline", w_bits=8, a_bits=8, w_symmetric=True)
# Number formats whose fake-quant forward is timed against FP32 (the CPU simulation's cost); FP8 W8A8 also runs
# in real FP8 (quant.fp8) on a GPU that has it, against BF16.
FORMAT_CONFIGS = {"fake_quant_fp8_e4m3": QuantConfig(method="baseline", w_bits=8, a_bits=8, w_format="fp8_e4m3",
                                                     a_format="fp8_e4m3"),
                  "fake_quant_mxfp4": QuantConfig(method="baseline", w_bits=4, a_bits=4, w_format="mxfp4",
                                                  a_format="mxfp4"),
                  "fake_quant_nvfp4": QuantConfig(method="baseline", w_bits=4, a_bits=4, w_format="nvfp4",
                                                  a_format="nvfp4")}
METHOD_CONFIGS = (QuantConfig(method="baseline", w_bits=8, a_bits=8),
                  QuantConfig(method="smoothquant", w_bits=8, a_bits=8),
                  QuantConfig(method="ptq4dit", w_bits=8, a_bits=8),
                  QuantConfig(method="dilatequant", w_bits=4, a_bits=4),
                  QuantConfig(method="hadamard", w_bits=4, a_bits=4),
                  QuantConfig(method="svdquant", w_bits=4, a_bits=4),
                  QuantConfig(method="gptq", w_bits=4, a_bits=4))
# What a rotation or a low-rank branch costs in the forward, measured with quantization off (only the extra
# ops run beside the FP GEMMs) and at W4A4 fake quant.
BRANCH_CONFIGS = {"online_rotation": dict(method="hadamard"), "lowrank_branch": dict(method="svdquant")}
# Targets of the speed work, as ratios measured in one run (checked by `targets`).
TARGETS = {"int8_speedup_vs_fp32_cpu": 1.5, "int8_fused_speedup_vs_fp32_cpu": 2.5, "int8_planned_vs_fp32_bundled": 1.0, "int8_speedup_vs_bf16_cuda": 1.3, "fake_quant_sampling_vs_fp": 1.25,
           "dit_xl2_quantize_seconds_cuda": 60.0}


@dataclasses.dataclass
class BenchOptions:
    device: str = "cpu"
    repeats: int = 5
    xl2_blocks: int = 2  # DiT-XL/2 has 28; each adds ~28M parameters
    xl2_batch: int = 4  # images per forward at DiT-XL/2 shapes (x 256 tokens)
    bundled_batch: int = 64  # images per forward of the bundled model (x 64 tokens)
    sample_images: int = 16
    sample_steps: int = 25
    shapes: tuple[str, ...] = ("bundled", "dit-xl2")

    def validate(self) -> "BenchOptions":
        # upper bounds: DiT-XL/2's real depth, and sizes that fit one GPU; beyond them a typo allocates gigabytes
        highs = {"repeats": 100, "xl2_blocks": 28, "xl2_batch": 512, "bundled_batch": 4096, "sample_images": 4096,
                 "sample_steps": 1000}
        for name, high in highs.items():
            value = getattr(self, name)
            if not 1 <= value <= high:
                raise ValueError(f"{name.replace('_', '-')} must be between 1 and {high}, got {value}")
        bad = [s for s in self.shapes if s not in ("bundled", "dit-xl2")]
        if bad or not self.shapes:
            raise ValueError(f"unknown shape set {bad[0] if bad else '(none)'}; choose bundled and/or dit-xl2")
        return self


@contextlib.contextmanager
def _profiler_lines_hidden():
    """The profiler's C++ side prints start/stop lines on file descriptor 2, whatever the log level: point
    that descriptor at /dev/null while it runs (Python exceptions still propagate; they are not printed)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (some embedded runtimes): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# torch's profiler is one per process: app sessions (threads) that measure at once take turns.
_PROFILER_LOCK = threading.Lock()


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated and not yet freed during one call of fn, on the CPU.

    From torch's profiler with memory profiling: each operator's own allocations at its start and the frees
    it records, replayed in time order. This counts what the call allocates (activations, workspaces), not
    memory held before it (weights), and is exact where resident-memory readings are not (the allocator
    keeps freed memory, so the process's resident size barely moves after the first call)."""
    from torch.profiler import ProfilerActivity, profile

    with _PROFILER_LOCK, _profiler_lines_hidden(), profile(activities=[ProfilerActivity.CPU],
                                                           profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> dict:
    """{"seconds": median wall time, "spread": (fastest, slowest) of the repeats, "peak_bytes": memory above the
    start during the runs, or None}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: allocator growth, kernel selection, lazy initialisation
    sync()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = _cpu_peak_bytes(fn)  # one more call, profiled (never timed)
    return {"seconds": sorted(times)[len(times) // 2], "spread": (min(times), max(times)), "peak_bytes": peak}


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """measure() for several paths whose timings are compared: one warm-up each, then `repeats` rounds that
    run every path once in turn, so a change in the machine's load during the run hits every path alike
    (timing one path's repeats after another's turns slow drift into a ratio). Peak memory as in measure()."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = _cpu_peak_bytes(fn)
        out[name] = {"seconds": sorted(times[name])[len(times[name]) // 2], "peak_bytes": peak}
    return out


def forward_profile(model, batch: tuple, repeats: int = 3) -> dict:
    """A model's measured forward on one (x, t, y) batch: median ms of `repeats` with the fastest and slowest
    (a busy machine shows as a wide spread), peak MiB above the start, stored MiB."""
    from quant.io import weight_bytes

    p = next(model.parameters())
    m = measure(_forward(model, batch, p.device, p.dtype), repeats, p.device)
    return {"forward_ms": round(m["seconds"] * 1e3, 2),
            "forward_ms_spread": f"{m['spread'][0] * 1e3:.0f}-{m['spread'][1] * 1e3:.0f} ({repeats} runs)",
            "forward_peak_mib": None if m["peak_bytes"] is None else round(m["peak_bytes"] / 2 ** 20, 1),
            "weights_mib": round(weight_bytes(model) / 2 ** 20, 2), "forward_rows": int(batch[0].shape[0])}


def dit_xl2(blocks: int, seed: int = 0):
    """A random DiTTransformer2DModel with DiT-XL/2's block: width 1152 (16 heads x 72), 32x32x4 latents,
    patch 2 (256 tokens), 1000 classes, learned sigma. Random weights: shapes, not quality."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=blocks, sample_size=32, patch_size=2,
                                 num_embeds_ada_norm=1000).eval().requires_grad_(False)


def random_batch(model, rows: int, timesteps=(999, 750, 500, 250, 20), seed: int = 0) -> tuple:
    """(x, t, y): Gaussian latents at a spread of timesteps, random classes (inputs for shapes and ranges)."""
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    s = (s, s) if isinstance(s, int) else tuple(s)
    t = torch.tensor(timesteps).repeat(rows // len(timesteps) + 1)[:rows]
    # a DiT's label table, or a UNet's class embedding (an unconditional UNet ignores the labels)
    classes = getattr(model.config, "num_embeds_ada_norm", None) or getattr(model.config, "num_class_embeds", None) or 1
    y = torch.randint(0, classes, (rows,), generator=g)
    return torch.randn(rows, c, *s, generator=g), t, y


def _forward(model, batch, device, dtype=torch.float32) -> Callable[[], object]:
    from quant.denoiser import denoise

    x, t, y = (v.to(device) for v in batch)
    x = x.to(dtype)

    @torch.no_grad()
    def run():
        return denoise(model, x, t, y)
    return run


def int8_bundle(bundle: ModelBundle, batch_images: int = 16, guidance: bool = True) -> tuple[ModelBundle, dict]:
    """(a bundle sampling with INT8 linears, the plan): a W8A8 bundle's linears converted where their shape
    measured faster in int8 here, on a forward of `batch_images` images (doubled by classifier-free
    guidance) at a mid timestep. Raises ValueError when the bundle holds no W8A8 layer."""
    model = bundle.denoiser
    if not any(int8_eligible(m) for m in quant_layers(model).values()):
        raise ValueError(f"{bundle.name} has no W8A8 layer to run in int8; quantize with --w-bits 8 --a-bits 8")
    rows = batch_images * (2 if guidance and bundle.conditional else 1)
    c, h, w = bundle.latent_shape
    g = torch.Generator().manual_seed(0)
    # an unconditional model ignores its labels (quant.denoiser.denoise): any value will do
    labels = torch.arange(rows) % bundle.num_classes if bundle.conditional else torch.zeros(rows, dtype=torch.long)
    example = (torch.randn(rows, c, h, w, generator=g), torch.full((rows,), 500), labels)
    plan = plan_int8(model, tuple(v.to(bundle.device) for v in example))
    return bundle.with_denoiser(to_int8(model, plan), name=f"{bundle.name} [int8]",
                                   quant_config=bundle.quant_config), plan


def forward_speed(fp_model, calibration: list, batch: tuple, opts: BenchOptions) -> dict:
    """The transformer forward in FP32, W8A8 fake-quant and W8A8 INT8 (all layers, and as planned), plus
    FP16 / BF16 on CUDA. Ratios are speedups of INT8 (> 1 = INT8 faster)."""
    device = torch.device(opts.device)
    fp = fp_model  # on `device` already
    cal = [tuple(v.to(device) for v in b) for b in calibration]
    q = quantize(fp, W8A8, cal)
    # symmetric weights: the MLP's fc1 then writes fc2's codes with GELU inside its GEMM (quant.int8.Int8FeedForward)
    q_sym = quantize(fp, W8A8_SYMMETRIC, cal)
    dev_batch = tuple(v.to(device) for v in batch)
    plan = plan_int8(q, dev_batch, repeats=max(2, opts.repeats // 2))
    plan_sym = plan_int8(q_sym, dev_batch, repeats=max(2, opts.repeats // 2))
    paths = {"fp32": (fp, torch.float32), "fake_quant_w8a8": (q, torch.float32),
             "int8_w8a8": (to_int8(q), torch.float32), "int8_w8a8_planned": (to_int8(q, plan), torch.float32),
             "fake_quant_w8a8_symmetric": (q_sym, torch.float32),
             "int8_w8a8_symmetric_unfused": (to_int8(q_sym, fuse=False), torch.float32),
             "int8_w8a8_symmetric": (to_int8(q_sym), torch.float32),
             "int8_w8a8_symmetric_planned": (to_int8(q_sym, plan_sym), torch.float32)}
    if device.type == "cuda":
        paths.update(fp16=(_copy_to(fp, torch.float16), torch.float16), bf16=(_copy_to(fp, torch.bfloat16), torch.bfloat16))
    paths.update(format_paths(fp, cal, device))
    out = measure_interleaved({name: _forward(m, batch, device, dtype) for name, (m, dtype) in paths.items()},
                              opts.repeats, device)
    int8_planned = paths["int8_w8a8_planned"][0]
    eligible = sum(int8_eligible(m) for m in quant_layers(q).values())
    ratios = {"int8_speedup_vs_fp32": out["fp32"]["seconds"] / out["int8_w8a8"]["seconds"],
              "int8_planned_speedup_vs_fp32": out["fp32"]["seconds"] / out["int8_w8a8_planned"]["seconds"],
              "int8_symmetric_unfused_speedup_vs_fp32": out["fp32"]["seconds"] / out["int8_w8a8_symmetric_unfused"]["seconds"],
              "int8_symmetric_speedup_vs_fp32": out["fp32"]["seconds"] / out["int8_w8a8_symmetric"]["seconds"],
              "int8_symmetric_planned_speedup_vs_fp32":
                  out["fp32"]["seconds"] / out["int8_w8a8_symmetric_planned"]["seconds"],
              "int8_speedup_vs_fake_quant": out["fake_quant_w8a8"]["seconds"] / out["int8_w8a8"]["seconds"],
              "fake_quant_forward_vs_fp32": out["fake_quant_w8a8"]["seconds"] / out["fp32"]["seconds"]}
    for name in ("fp16", "bf16"):
        if name in out:
            ratios[f"int8_speedup_vs_{name}"] = out[name]["seconds"] / out["int8_w8a8"]["seconds"]
    for name in FORMAT_CONFIGS:  # > 1: the simulation costs more than FP32
        ratios[f"{name}_forward_vs_fp32"] = out[name]["seconds"] / out["fp32"]["seconds"]
    if "fp8_w8a8" in out and "bf16" in out:
        ratios["fp8_speedup_vs_bf16"] = out["bf16"]["seconds"] / out["fp8_w8a8"]["seconds"]
    return {"forward": out, "ratios": ratios, "rows": int(batch[0].shape[0]),
            "plan": {"int8_layers": len(int8_layers(int8_planned)), "eligible_layers": eligible,
                     "shapes": sorted({(e["rows"], e["in_features"], e["out_features"], round(e["speedup"], 2))
                                       for e in plan.values()})}}


def branch_speed(fp_model, calibration: list, batch: tuple, opts: BenchOptions) -> dict:
    """The forward with Hadamard's online rotations and with SVDQuant's rank-32 branches, against FP32: with
    quantization off (the extra ops alone) and at W4A4 fake quant (against W4A4 baseline). Ratios > 1 = slower."""
    device = torch.device(opts.device)
    cal = [tuple(v.to(device) for v in b) for b in calibration]
    out = {"fp32": measure(_forward(fp_model, batch, device), opts.repeats, device)}
    out["w4a4_baseline"] = measure(_forward(quantize(fp_model, QuantConfig(method="baseline", w_bits=4, a_bits=4),
                                                     cal), batch, device), opts.repeats, device)
    ratios = {}
    for name, fields in BRANCH_CONFIGS.items():
        for bits, (w, a) in (("float", (None, None)), ("w4a4", (4, 4))):
            model = quantize(fp_model, QuantConfig(**fields, w_bits=w, a_bits=a), cal)
            out[f"{name}_{bits}"] = measure(_forward(model, batch, device), opts.repeats, device)
        base = out[f"{name}_float"]["seconds"]
        # the float run still passes through the (disabled) quantized modules: compare with their own cost
        plain = quantize(fp_model, QuantConfig(method="baseline", w_bits=None, a_bits=None), cal)
        out.setdefault("wrapped_float", measure(_forward(plain, batch, device), opts.repeats, device))
        ratios[f"{name}_vs_fp32"] = base / out["fp32"]["seconds"]
        ratios[f"{name}_vs_wrapped_float"] = base / out["wrapped_float"]["seconds"]
        ratios[f"{name}_w4a4_vs_baseline_w4a4"] = out[f"{name}_w4a4"]["seconds"] / out["w4a4_baseline"]["seconds"]
    return {"forward": out, "ratios": ratios, "rows": int(batch[0].shape[0])}


def format_paths(fp_model, cal: list, device: torch.device) -> dict:
    """name -> (model, dtype) for each of FORMAT_CONFIGS (fake-quant), and on a GPU with FP8 matmuls the FP8 W8A8
    model with its linears in real FP8 (quant.fp8.to_fp8), BF16 elsewhere."""
    from quant.fp8 import fp8_supported, to_fp8

    paths = {}
    for name, cfg in FORMAT_CONFIGS.items():
        q = quantize(fp_model, cfg, cal)
        paths[name] = (q, torch.float32)
        if name == "fake_quant_fp8_e4m3" and fp8_supported(device):
            real, _ = to_fp8(_copy_to(q, torch.bfloat16))  # the FP8 buffers made after the cast stay FP8
            paths["fp8_w8a8"] = (real, torch.bfloat16)
    return paths


def _copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def quantize_speed(fp_model, calibration: list, configs, device: torch.device) -> dict:
    """Calibrate + quantize wall seconds per method, the model on `device` (one run each: seconds, not ms)."""
    out = {}
    cal = [tuple(v.to(device) for v in b) for b in calibration]
    for cfg in configs:
        t0 = time.perf_counter()
        quantize(fp_model, cfg, cal)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[cfg.label] = round(time.perf_counter() - t0, 3)
    return out


def sampling_speed(bundle: ModelBundle, opts: BenchOptions) -> dict:
    """Plain FP sampling vs salience collection, fake-quant sampling (W8A8; W4A4 with TPQ) and INT8 sampling."""
    from analysis.models.sampling import sample
    from analysis.quantization.pipeline import calibration_for
    from analysis.salience.collect import SalienceConfig, collect

    device = torch.device(opts.device)
    labels = [i % bundle.num_classes for i in range(opts.sample_images)]
    seeds = list(range(opts.sample_images))

    def sampler(b):
        return lambda: sample(b, labels, seeds, steps=opts.sample_steps, guidance=bundle.eval_guidance, decode=False)

    cal = calibration_for(bundle)
    cal_batches = list(cal.batches(64))
    fq8 = bundle.with_denoiser(quantize(bundle.denoiser, W8A8, cal_batches))
    fq4 = bundle.with_denoiser(quantize(bundle.denoiser, QuantConfig(method="dilatequant", w_bits=4, a_bits=4),
                                           cal_batches))
    i8 = bundle.with_denoiser(to_int8(fq8.denoiser))
    config = SalienceConfig(steps=opts.sample_steps, samples=opts.sample_images, guidance=bundle.eval_guidance)
    out = {"fp": measure(sampler(bundle), opts.repeats, device),
           "fake_quant_w8a8": measure(sampler(fq8), opts.repeats, device),
           "fake_quant_w4a4_tpq": measure(sampler(fq4), opts.repeats, device),
           "int8_w8a8": measure(sampler(i8), opts.repeats, device),
           "salience_collection": measure(lambda: collect(bundle, config), opts.repeats, device)}
    fp = out["fp"]["seconds"]
    ratios = {"fake_quant_sampling_vs_fp": out["fake_quant_w8a8"]["seconds"] / fp,
              "fake_quant_w4a4_tpq_sampling_vs_fp": out["fake_quant_w4a4_tpq"]["seconds"] / fp,
              "int8_sampling_vs_fp": out["int8_w8a8"]["seconds"] / fp,
              "salience_collection_vs_sampling": out["salience_collection"]["seconds"] / fp}
    return {"sampling": out, "ratios": ratios, "images": opts.sample_images, "steps": opts.sample_steps,
            "calibration": cal_batches}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_benchmark(opts: BenchOptions, on_stage: Callable[[str], None] | None = None) -> dict:
    """Everything above, for the chosen shape sets, on models this function loads or builds itself."""
    opts.validate()
    say = on_stage or (lambda text: None)
    device = torch.device(opts.device)
    result = {"machine": machine(), "device": str(device), "repeats": opts.repeats}
    if "bundled" in opts.shapes:
        from analysis.models.loading import load

        bundle = load("bundled:dit-mnist", device=str(device))
        say("bundled: sampling, salience collection, fake-quant and INT8 sampling")
        samp = sampling_speed(bundle, opts)
        cal = samp.pop("calibration")
        say("bundled: calibrate + quantize per method")
        quant = quantize_speed(bundle.denoiser, cal, METHOD_CONFIGS, device)
        say("bundled: transformer forward, FP32 / fake-quant / INT8")
        rows = opts.bundled_batch
        fwd = forward_speed(bundle.denoiser, cal, random_batch(bundle.denoiser, rows, seed=1), opts)
        say("bundled: online rotation and low-rank branch forward cost")
        branches = branch_speed(bundle.denoiser, cal, random_batch(bundle.denoiser, rows, seed=1), opts)
        result["bundled"] = {**samp, "quantize_seconds": quant, **fwd, "branches": branches,
                             "ratios": {**samp["ratios"], **fwd["ratios"], **branches["ratios"]}}
    if "dit-xl2" in opts.shapes:
        say(f"dit-xl2: {opts.xl2_blocks} random blocks at DiT-XL/2 width")
        model = dit_xl2(opts.xl2_blocks).to(device)
        cal = [random_batch(model, 10, seed=2)]
        quant = quantize_speed(model, cal, (W8A8, QuantConfig(method="ptq4dit", w_bits=8, a_bits=8)), device)
        fwd = forward_speed(model, cal, random_batch(model, opts.xl2_batch, seed=3), opts)
        branches = branch_speed(model, cal, random_batch(model, opts.xl2_batch, seed=3), opts)
        result["dit-xl2"] = {"blocks": opts.xl2_blocks, "quantize_seconds": quant, **fwd, "branches": branches}
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> list[dict]:
    """Each target that this run measured: its value, the bound, and whether it held."""
    found = []
    cuda = result["device"].startswith("cuda")
    xl2, bundled = result.get("dit-xl2"), result.get("bundled")
    if xl2 and not cuda:
        found.append(("INT8 forward vs FP32, DiT-XL/2 shapes, CPU", xl2["ratios"]["int8_speedup_vs_fp32"],
                      ">=", TARGETS["int8_speedup_vs_fp32_cpu"]))
    if xl2 and not cuda:
        found.append(("INT8 forward vs FP32, symmetric weights, fused MLP, as planned, DiT-XL/2 shapes, CPU",
                      xl2["ratios"]["int8_symmetric_planned_speedup_vs_fp32"], ">=",
                      TARGETS["int8_fused_speedup_vs_fp32_cpu"]))
    if bundled and not cuda:
        found.append(("INT8 forward vs FP32, symmetric weights, as planned, bundled shapes, CPU",
                      bundled["ratios"]["int8_symmetric_planned_speedup_vs_fp32"], ">=",
                      TARGETS["int8_planned_vs_fp32_bundled"]))
    if xl2 and cuda and "int8_speedup_vs_bf16" in xl2["ratios"]:
        found.append(("INT8 forward vs BF16, DiT-XL/2 shapes, GPU", xl2["ratios"]["int8_speedup_vs_bf16"],
                      ">=", TARGETS["int8_speedup_vs_bf16_cuda"]))
    if xl2 and cuda:
        found.append(("calibrate + quantize W8A8, DiT-XL/2 shapes, GPU (s)", xl2["quantize_seconds"][W8A8.label],
                      "<", TARGETS["dit_xl2_quantize_seconds_cuda"]))
    if bundled:
        found.append(("fake-quant W8A8 sampling vs FP sampling", bundled["ratios"]["fake_quant_sampling_vs_fp"],
                      "<=", TARGETS["fake_quant_sampling_vs_fp"]))
    met = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    return [{"target": name, "value": round(v, 3), "bound": f"{op} {b:g}", "met": met[op](v, b)}
            for name, v, op, b in found]


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def markdown(result: dict) -> str:
    """The README's performance table: one row per measured path, its time, memory and ratio."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['processor']}, {m['threads']} torch threads"
    lines = [f"Measured on {where} (torch {m['torch']}, device {result['device']}), median of {result['repeats']}.", ""]
    for key, title in (("bundled", "bundled:dit-mnist"), ("dit-xl2", "random DiT, DiT-XL/2 block")):
        r = result.get(key)
        if not r:
            continue
        extra = f", {r['blocks']} blocks" if key == "dit-xl2" else ""
        lines += [f"**{title}{extra}**, forward of {r['rows']} images:", "",
                  "| path | ms | peak MiB | vs FP32 |", "|---|---|---|---|"]
        fp = r["forward"]["fp32"]["seconds"]
        for name, v in r["forward"].items():
            lines.append(f"| {name} | {v['seconds'] * 1e3:.1f} | {_mib(v['peak_bytes'])} | {fp / v['seconds']:.2f}x |")
        if "branches" in r:
            b = r["branches"]
            lines += ["", "Online rotation / low-rank branch, forward:", "", "| path | ms | vs FP32 |", "|---|---|---|"]
            lines += [f"| {name} | {v['seconds'] * 1e3:.1f} | {v['seconds'] / b['forward']['fp32']['seconds']:.2f}x |"
                      for name, v in b["forward"].items()]
        lines.append(f"\nINT8 plan: {r['plan']['int8_layers']} of {r['plan']['eligible_layers']} W8A8 layers "
                     "measured faster in int8 here.")
        if "sampling" in r:
            lines += ["", f"Sampling {r['images']} images x {r['steps']} DDIM steps:", "",
                      "| path | s | peak MiB | vs FP |", "|---|---|---|---|"]
            fp = r["sampling"]["fp"]["seconds"]
            for name, v in r["sampling"].items():
                lines.append(f"| {name} | {v['seconds']:.2f} | {_mib(v['peak_bytes'])} | {v['seconds'] / fp:.2f}x |")
        lines += ["", "Calibrate + quantize (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["quantize_seconds"].items()),
                  ""]
    if result.get("targets"):
        lines += ["| target | measured | bound | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {t['bound']} | {'yes' if t['met'] else 'no'} |"
                  for t in result["targets"]]
    return "\n".join(lines)
