"""Train the bundled digit classifier (label agreement and offline FID features).

    python scripts/train_classifier.py --out assets/digit-classifier

Trains on 90% of the 5000 bundled digits with one-pixel random shifts and reports accuracy on the
held-out 10% (a fixed split, seed 0). Deterministic for a given seed and thread count.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from analysis.evaluation.classifier import DigitClassifier
from analysis.models.digits import load_digits, random_shift, train_test_split


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("assets/digit-classifier"))
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    images, labels = load_digits()
    train_idx, test_idx = train_test_split(len(images))
    gen = torch.Generator().manual_seed(args.seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_idx) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm), args.batch):
            idx = perm[i:i + args.batch]
            loss = F.cross_entropy(model(random_shift(images[idx], gen)), labels[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
        print(f"epoch {epoch + 1} loss {loss.item():.4f} held-out accuracy {acc:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "model.safetensors")
    info = {"held_out_accuracy": round(acc, 4), "held_out_images": len(test_idx), "train_images": len(train_idx),
            "epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "seed": args.seed,
            "train_seconds": round(time.time() - start, 1)}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
