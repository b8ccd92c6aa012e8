"""How many layers of a model can take a folded per-channel scale, and how many channels weight dilation
(DilateQuant's WD) would stretch in them.

    python bench/wd_stretch.py --model bundled:unet-mnist --model bundled:dit-mnist --json

DilateQuant (Liu et al. 2024) argues that unsaturated input channels (those holding no output row's max or
min) are common, so WD can stretch them without changing any weight step size. Per model this prints:
- the balance plan: quantized layers, those whose input scale folds exactly into an affine producer, and
  their share (quant.graph.balance_plan);
- over the foldable groups (where WD is applied): the fraction of input channels with s > 1, and the median
  and maximum stretch;
- over every quantized layer (what WD could do if the scale were applied online where it cannot fold): the
  same fraction, with a convolution's channel stretched by the smallest s over its kernel positions.
"""
from __future__ import annotations

import argparse
import json

from analysis.threads import configure

configure()  # the lab's thread policy, before torch makes its pool (see analysis.threads)

import torch

from analysis.models.loading import load
from quant.graph import balance_groups, balance_plan
from quant.methods.dilatequant import dilation_vector
from quant.reparam import group_weight
from quant.wrap import covered_layers


def layer_dilation(weight: torch.Tensor) -> torch.Tensor:
    """s per input channel of a linear [out, in] or conv [out, in, kh, kw] weight. For a conv, every kernel
    position of channel j is a column of the output channel's row; the channel stretches by the smallest s of
    its columns, so no output channel's range changes."""
    w = weight.detach().float()
    if w.dim() == 2:
        return dilation_vector(w)
    out, cin = w.shape[:2]
    return dilation_vector(w.reshape(out, -1)).reshape(cin, -1).amin(dim=1)


def summary(vectors: list[torch.Tensor]) -> dict:
    s = torch.cat(vectors) if vectors else torch.ones(0)
    stretched = s > 1 + 1e-6
    return {"channels": int(s.numel()), "stretched_fraction": round(float(stretched.float().mean()), 4) if s.numel() else None,
            "median_stretch_of_stretched": round(float(s[stretched].median()), 3) if stretched.any() else None,
            "max_stretch": round(float(s.max()), 3) if s.numel() else None}


def measure(source: str) -> dict:
    model = load(source).denoiser
    plan = balance_plan(model)
    foldable = [dilation_vector(group_weight(model, g).float()) for g in balance_groups(model)]
    every = [layer_dilation(m.weight) for m in covered_layers(model).values()]
    return {"model": source, "family": plan["family"], "layers": plan["layers"],
            "foldable_layers": plan["foldable_layers"], "foldable_share": round(plan["foldable_share"], 4),
            "wd_foldable_groups": summary(foldable), "wd_all_layers": summary(every)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, help="repeatable (default: both bundled models)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [measure(m) for m in (args.model or ["bundled:unet-mnist", "bundled:dit-mnist"])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        f, a = r["wd_foldable_groups"], r["wd_all_layers"]
        print(f"{r['model']}: {r['foldable_layers']} of {r['layers']} layers fold exactly ({r['foldable_share']:.0%}); "
              f"WD stretches {f['stretched_fraction']:.1%} of {f['channels']} channels in foldable groups "
              f"(median stretch {f['median_stretch_of_stretched']}), {a['stretched_fraction']:.1%} of "
              f"{a['channels']} over all layers")


if __name__ == "__main__":
    main()
