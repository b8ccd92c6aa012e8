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

from diffusion_training import Family, add_common_arguments, train  # this script's folder is on sys.path

from analysis.models.digits import NUM_CLASSES, RESOLUTION


def build_model(args):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=args.width // args.head_dim,
        attention_head_dim=args.head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=args.depth,
        sample_size=RESOLUTION,
        patch_size=args.patch,
        num_embeds_ada_norm=NUM_CLASSES,  # label table has NUM_CLASSES + 1 rows: the last is the null class
    )


def family():
    from diffusers import DiTTransformer2DModel

    return Family(build=build_model, forward=lambda net, x, t, y: net(x, timestep=t, class_labels=y).sample,
                  model_class=DiTTransformer2DModel, subfolder="transformer",
                  hyper=("width", "depth", "head_dim", "patch"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, ckpt_dir="checkpoints/dit-mnist", out="assets/dit-mnist")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch", type=int, default=2)
    train(family(), p.parse_args(argv))


if __name__ == "__main__":
    main()
