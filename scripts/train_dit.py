"""Train the bundled class-conditional diffusion transformer `bundled:dit-mnist` from scratch.

    python scripts/train_dit.py --steps 4000 --ckpt-dir checkpoints/dit-mnist --out assets/dit-mnist
    python scripts/train_dit.py --init-from assets/dit-mnist --steps 3000 --lr 3e-4 --warmup 100 \
        --ckpt-dir checkpoints/dit-mnist-ft --out assets/dit-mnist      # continue training a shipped model

A diffusers DiTTransformer2DModel (adaLN-Zero blocks, the DiT-XL/2 block structure at a small width)
learns to predict the noise of 16x16 MNIST digits under a 1000-step DDPM schedule. Labels are dropped to
the null class 10% of the time (diffusers' LabelEmbedding does this in train mode), which is what
classifier-free guidance needs. Checkpoints are written every --ckpt-every steps; running the same
command again resumes from the newest one, so a stopped run loses at most that many steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from analysis.digits import NUM_CLASSES, RESOLUTION, load_digits, random_shift


def build_model(width: int, depth: int, head_dim: int, patch: int):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=depth,
        sample_size=RESOLUTION,
        patch_size=patch,
        num_embeds_ada_norm=NUM_CLASSES,  # label table has NUM_CLASSES + 1 rows: the last is the null class
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


def lr_at(step: int, args) -> float:
    # Linear warm-up, then cosine decay to 10% of the peak over the planned steps.
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step: int, cap: float) -> float:
    # Warm-up so the random init does not linger in the average (DESIGN.md section 7).
    return min(cap, (1 + step) / (10 + step))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir: Path, step: int, model, ema, opt, gen, losses, elapsed) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f"step_{step}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                "elapsed": elapsed}, tmp)
    os.replace(tmp, ckpt_dir / f"step_{step}.pt")  # atomic: a kill mid-write leaves the old checkpoint
    for old in sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-2]:
        old.unlink()


def export(out: Path, ema, args, step: int, losses: list[float], elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "transformer", safe_serialization=True)
    build_scheduler().save_pretrained(out / "scheduler")
    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:]))
    info = {"steps": step, "batch_size": args.batch, "lr": args.lr, "warmup": args.warmup, "ema_cap": args.ema,
            "width": args.width, "depth": args.depth, "head_dim": args.head_dim, "patch": args.patch,
            "seed": args.seed, "final_loss_mean_last_200": round(final_loss, 5),
            "train_seconds": round(elapsed, 1), "threads": torch.get_num_threads()}
    prior = getattr(args, "prior", None)
    if prior:  # continued from an exported model: record both stages
        info.update(continued_from={"steps": prior["steps"], "train_seconds": prior["train_seconds"]},
                    total_steps=prior["steps"] + step,
                    total_train_seconds=round(prior["train_seconds"] + elapsed, 1))
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/dit-mnist"))
    p.add_argument("--out", type=Path, default=Path("assets/dit-mnist"))
    p.add_argument("--export-only", action="store_true", help="write the newest checkpoint's EMA to --out")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from an exported model folder (its transformer/ safetensors), e.g. to train the "
                        "shipped model longer; the optimizer starts fresh (--steps counts the new steps)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 25%% slower a step on CPU)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    images, labels = load_digits()
    model = build_model(args.width, args.depth, args.head_dim, args.patch)
    ema = build_model(args.width, args.depth, args.head_dim, args.patch)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = build_scheduler()
    alphas_cumprod = sched.alphas_cumprod
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
        from diffusers import DiTTransformer2DModel

        start = DiTTransformer2DModel.from_pretrained(args.init_from / "transformer", use_safetensors=True)
        model.load_state_dict(start.state_dict()); ema.load_state_dict(start.state_dict())
        print(f"initialised from {args.init_from}", flush=True)
    prior = args.init_from / "training.json" if args.init_from is not None else None
    if prior is not None and prior.exists():  # the card reports the whole history: earlier steps carry over
        info = json.loads(prior.read_text())
        args.prior = {"steps": info.get("total_steps", info.get("steps", 0)),
                      "train_seconds": info.get("total_train_seconds", info.get("train_seconds", 0.0))}
    if args.export_only:
        export(args.out, ema, args, step, losses, elapsed)
        return

    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, threads {torch.get_num_threads()}", flush=True)
    model.train()
    forward = model if args.no_compile else torch.compile(model)  # shares parameters with `model`
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
        pred = forward(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
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
    export(args.out, ema, args, step, losses, elapsed)
    print(f"done: {step} steps in {elapsed:.0f}s, exported to {args.out}", flush=True)


if __name__ == "__main__":
    main()
