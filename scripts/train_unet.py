"""Train the bundled class-conditional UNet `bundled:unet-mnist` from scratch.

    OMP_NUM_THREADS=1 python scripts/train_unet.py --steps 4000 --ckpt-dir checkpoints/unet-mnist \
        --out assets/unet-mnist

A diffusers UNet2DModel (the DDPM architecture: ResNet blocks with GroupNorm and SiLU, self-attention at 8x8
and in the middle block) learns to predict the noise of the same 16x16 digits, schedule and augmentation as
`bundled:dit-mnist` (scripts/diffusion_training.py holds the shared loop). The class enters through
`num_class_embeds` = 11: ten digits and a null class 10, which the label is dropped to 10% of the time so
classifier-free guidance works. Running the same command again resumes from the newest checkpoint.
"""
from __future__ import annotations

import argparse

import torch
from diffusion_training import Family, add_common_arguments, train  # this script's folder is on sys.path

from analysis.models.digits import NUM_CLASSES, RESOLUTION

LABEL_DROP = 0.1  # the share of labels replaced by the null class in training (as diffusers' DiT does)


def build_model(args):
    from diffusers import UNet2DModel

    widths = tuple(int(w) for w in args.widths.split(","))
    # Attention only at the middle resolution (8x8) and in the middle block (4x4): at 16x16 it would cost
    # most of the compute for little gain on digits.
    down = tuple("AttnDownBlock2D" if i == 1 else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i == len(widths) - 2 else "UpBlock2D" for i in range(len(widths)))
    return UNet2DModel(
        sample_size=RESOLUTION, in_channels=1, out_channels=1,
        block_out_channels=widths, down_block_types=down, up_block_types=up,
        layers_per_block=args.layers_per_block, norm_num_groups=args.groups, attention_head_dim=args.head_dim,
        num_class_embeds=NUM_CLASSES + 1,  # the last row is the null class for guidance
    )


def drop_labels(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(y.shape, generator=gen) < LABEL_DROP, torch.full_like(y, NUM_CLASSES), y)


def family():
    from diffusers import UNet2DModel

    return Family(build=build_model, forward=lambda net, x, t, y: net(x, t, class_labels=y).sample,
                  model_class=UNet2DModel, subfolder="unet", drop_labels=drop_labels,
                  hyper=("widths", "layers_per_block", "groups", "head_dim"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, ckpt_dir="checkpoints/unet-mnist", out="assets/unet-mnist")
    p.add_argument("--widths", default="32,64,64", help="channels per resolution (16x16, 8x8, 4x4)")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    p.add_argument("--head-dim", type=int, default=32)
    train(family(), p.parse_args(argv))


if __name__ == "__main__":
    main()
