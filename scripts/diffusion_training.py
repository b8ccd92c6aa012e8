"""What the bundled diffusion models' training scripts share: data, schedule, EMA, checkpoints, the loop.

`train_dit.py` and `train_unet.py` differ only in the network they build, how it is called and how it drops
labels for classifier-free guidance; everything here is the same for both, so a fix (such as shifting the
digits in pixel space) reaches both models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from analysis.models.digits import load_digits, random_shift


@dataclass
class Family:
    """How one network family is built, called and saved by the shared loop."""

    build: Callable[[argparse.Namespace], torch.nn.Module]  # a fresh random model from the parsed arguments
    forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x_t, t, y) -> eps
    model_class: type  # diffusers class, for --init-from
    subfolder: str  # where the weights go inside the exported folder ("transformer", "unet")
    hyper: tuple[str, ...]  # the argument names that describe the architecture (written to training.json)
    # Labels to feed in training: diffusers' DiT drops them itself in train mode; a UNet needs it done here.
    drop_labels: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = lambda y, gen: y


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


def add_common_arguments(p: argparse.ArgumentParser, ckpt_dir: str, out: str) -> None:
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--ckpt-dir", type=Path, default=Path(ckpt_dir))
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--export-only", action="store_true", help="write the newest checkpoint's EMA to --out")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from an exported model folder (its safetensors), e.g. to train the shipped model "
                        "longer; the optimizer starts fresh (--steps counts the new steps)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 25%% slower a step on CPU)")


def lr_at(step: int, args) -> float:
    # Linear warm-up, then cosine decay to 10% of the peak over the planned steps.
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step: int, cap: float) -> float:
    # Warm-up so the random init does not linger in the average.
    return min(cap, (1 + step) / (10 + step))


def _ckpts(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = _ckpts(ckpt_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir: Path, step: int, model, ema, opt, gen, losses, elapsed) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f"step_{step}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                "elapsed": elapsed}, tmp)
    os.replace(tmp, ckpt_dir / f"step_{step}.pt")  # atomic: a kill mid-write leaves the old checkpoint
    for old in _ckpts(ckpt_dir)[:-2]:
        old.unlink()


def export(out: Path, ema, family: Family, args, step: int, losses: list[float], elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / family.subfolder, safe_serialization=True)
    build_scheduler().save_pretrained(out / "scheduler")
    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:]))
    info = {"steps": step, "batch_size": args.batch, "lr": args.lr, "warmup": args.warmup, "ema_cap": args.ema,
            **{name: getattr(args, name) for name in family.hyper},
            "seed": args.seed, "final_loss_mean_last_200": round(final_loss, 5),
            "train_seconds": round(elapsed, 1), "threads": torch.get_num_threads()}
    prior = getattr(args, "prior", None)
    if prior:  # continued from an exported model: record both stages
        info.update(continued_from={"steps": prior["steps"], "train_seconds": prior["train_seconds"]},
                    total_steps=prior["steps"] + step,
                    total_train_seconds=round(prior["train_seconds"] + elapsed, 1))
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def train(family: Family, args) -> None:
    """Train (or resume, or export) the model `family` builds, with eps prediction on the bundled digits."""
    torch.manual_seed(args.seed)
    images, labels = load_digits()
    model = family.build(args)
    ema = family.build(args)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    alphas_cumprod = build_scheduler().alphas_cumprod
    gen = torch.Generator().manual_seed(args.seed)
    step, losses, elapsed = 0, [], 0.0

    ckpt = latest_checkpoint(args.ckpt_dir)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"]); opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"]); torch.set_rng_state(state["torch_rng"])
        step, losses, elapsed = state["step"], list(state["losses"]), state["elapsed"]
        print(f"resumed from {ckpt} at step {step}", flush=True)
    elif args.init_from is not None:
        start = family.model_class.from_pretrained(args.init_from / family.subfolder, use_safetensors=True)
        model.load_state_dict(start.state_dict()); ema.load_state_dict(start.state_dict())
        print(f"initialised from {args.init_from}", flush=True)
    prior = args.init_from / "training.json" if args.init_from is not None else None
    if prior is not None and prior.exists():  # the card reports the whole history: earlier steps carry over
        info = json.loads(prior.read_text())
        args.prior = {"steps": info.get("total_steps", info.get("steps", 0)),
                      "train_seconds": info.get("total_train_seconds", info.get("train_seconds", 0.0))}
    if args.export_only:
        export(args.out, ema, family, args, step, losses, elapsed)
        return

    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, threads {torch.get_num_threads()}", flush=True)
    model.train()
    net = model if args.no_compile else torch.compile(model)  # shares parameters with `model`
    t_last = time.time()
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        idx = torch.randint(0, len(images), (args.batch,), generator=gen)
        # Shift in [0, 1] pixel space, where the padding (0) is the black background, THEN map to the model's
        # [-1, 1]. Padding in model space would add mid-gray borders the model learns to draw.
        x0 = random_shift(images[idx], gen) * 2 - 1
        y = labels[idx]
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(family.forward(net, xt, t, family.drop_labels(y, gen)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = ema_decay(step, args.ema)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        losses.append(loss.item())
        now = time.time(); elapsed += now - t_last; t_last = now
        if step % 50 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / 50:.4f} lr {lr_at(step, args):.2e} "
                  f"{elapsed:.0f}s", flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(args.ckpt_dir, step, model, ema, opt, gen, losses, elapsed)
    export(args.out, ema, family, args, step, losses, elapsed)
    print(f"done: {step} steps in {elapsed:.0f}s, exported to {args.out}", flush=True)
