"""The lab's measures, each defined once: every method, page and command uses these definitions.

- weight salience s(W_j) = max over output rows of |W_oj| (PTQ4DiT eq. 3), one value per input channel (a
  convolution's rows are its output channels and kernel positions);
- outlier ratio max / median over channels: how far the most salient channel stands above a typical one;
- Spearman's rho with scipy's tie handling (tied values share the average of their ranks), vectorized over
  rows; bf16 statistics hold many ties, so breaking them by position would change rho;
- relative RMS error sqrt(sum (pred - ref)^2 / sum ref^2), overall and per timestep (the square of it is the
  relative MSE; the lab reports the root everywhere so one name means one number).
"""
from __future__ import annotations

import torch

TINY = 1e-12


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """s(W_j) = max over output rows of |W_oj| for a weight [out, in] -> [in]; for a convolution's
    [out, in, kh, kw], the max over output channels and kernel positions -> [in]."""
    w = weight.detach().abs()
    return w.amax(dim=0) if w.dim() == 2 else w.transpose(0, 1).flatten(1).amax(dim=1)


def outlier_ratio(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """max / median of salience along `dim`, in float64; the median of an even count is the mean of the two
    middle values (numpy's and the model card's definition, not torch.median's lower one)."""
    s = torch.as_tensor(s).double()
    return s.amax(dim=dim) / torch.quantile(s, 0.5, dim=dim).clamp_min(TINY)


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim in float64; tied values get the average of their ranks (scipy's 'average').

    One sort per row; the average of a tie group is (first position + last position) / 2, found with a
    running max / min over the sorted row, so the whole tensor is ranked without a Python loop.
    """
    x = torch.as_tensor(x)
    n = x.shape[-1]
    s, order = x.sort(dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)  # a tie group starts where the sorted value changes
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(s.shape)
    if bool(new.all()):
        avg = pos
    else:
        end = torch.ones_like(new)
        end[..., :-1] = new[..., 1:]
        first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=-1).values
        last = torch.where(end, pos, torch.full_like(pos, float("inf"))).flip(-1).cummin(dim=-1).values.flip(-1)
        avg = (first + last) / 2
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho along the last dim for every row at once (a [..., C] and b broadcast, e.g. activation
    salience [T, C] against weight salience [C]); float64, NaN where one side is constant (no ranking)."""
    ra, rb = rankdata(a), rankdata(b)  # each side ranked at its own shape: a [C] weight side once, not per row
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    ra, rb = torch.broadcast_tensors(ra, rb)
    den = (ra.pow(2).sum(-1) * rb.pow(2).sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(den, float("nan")))


def rel_rms(err_sq: float, ref_sq: float) -> float:
    """sqrt(sum err^2 / sum ref^2) from the two sums; 0 when the reference is all zeros."""
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


class RelRmsByTimestep:
    """Accumulates relative RMS error of predictions against references, overall and per timestep.

    add(pred [B, ...], ref [B, ...], t [B]) per batch; total() and per_timestep() ({t: rel RMS}, noisiest
    timestep first) read it out. Sums are per sample, so batches may mix timesteps.
    """

    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0
        self.by_t: dict[int, list[float]] = {}

    def add(self, pred: torch.Tensor, ref: torch.Tensor, t: torch.Tensor) -> None:
        pred, ref = pred.double(), ref.double().to(pred.device)
        e = (pred - ref).pow(2).flatten(1).sum(1).cpu()
        r = ref.pow(2).flatten(1).sum(1).cpu()
        self.err, self.ref = self.err + float(e.sum()), self.ref + float(r.sum())
        for ti, ei, ri in zip(torch.as_tensor(t).reshape(-1).tolist(), e.tolist(), r.tolist()):
            acc = self.by_t.setdefault(int(ti), [0.0, 0.0])
            acc[0] += ei
            acc[1] += ri

    def total(self) -> float:
        return rel_rms(self.err, self.ref)

    def per_timestep(self) -> dict[int, float]:
        return {t: rel_rms(e, r) for t, (e, r) in sorted(self.by_t.items(), reverse=True)}

    def step_median(self) -> float:
        """The headline error: median over timesteps of the per-timestep relative RMS error (step_median)."""
        return step_median(self.per_timestep())


def step_median(per_timestep) -> float:
    """Median over timesteps of a per-timestep relative RMS error ({t: e}, or [[t, e], ...] as stored).

    The headline error of a quantized model. The error pooled over all timesteps (total()) is dominated by
    the last step or two, where the noise left in x_t is below one activation quantization step and the
    relative error of the noise prediction blows up (0.85 against 0.04-0.08 elsewhere for a W4A8 DiT), while
    the sampler scales the noise prediction by that same small factor there, so it costs the image little.
    The median over steps reads as the typical step's error and ignores one or two such steps; the curve per
    timestep shows them. 0.0 when there are no timesteps."""
    values = list(per_timestep.values()) if isinstance(per_timestep, dict) else [e for _, e in per_timestep]
    if not values:
        return 0.0
    values = sorted(float(v) for v in values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def relative_rms(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error of pred against ref over the whole tensor: scale-free, so timesteps compare."""
    pred, ref = pred.double(), ref.double()
    return rel_rms(float((pred - ref).pow(2).sum()), float(ref.pow(2).sum()))
