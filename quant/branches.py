"""What a quantized layer may run beside its quantized GEMM: an online input rotation and a low-rank branch.

    y = Q_a(R x) Q_w(W R^T)^T + b                      online rotation R (quant.rotation), W R^T folded offline
    y = Q_a(x) Q_w(Res)^T + x (L1 L2)^T + b             SVDQuant's branch: W = L1 L2 + Res, L1 L2 in 16 bits

Both are submodules of QuantLinear / QuantConv2d (attributes `rotation` and `lowrank`, None when absent), so
they are in the state dict, move with .to() and are saved with the model (quant.io). wrap_model creates them
from the config (quant.methods.layer_plan), so a saved model is rebuilt with the same structure before its
tensors are loaded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.rotation import rotate, rotation_kind, rotation_matrix

# The branch's storage type: SVDQuant keeps L1 and L2 in 16 bits (BF16 on GPUs; FP16 here, whose finer
# mantissa suits the small factors).
LOWRANK_DTYPE = torch.float16


class OnlineRotation(nn.Module):
    """x -> R x over the channel dimension (the last one), by the fast Walsh-Hadamard transform where it can.

    Only the random orthogonal fallback stores its matrix (a buffer, so it is saved); Walsh and Paley sizes
    are recomputed, which is exact and costs no memory."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.kind = rotation_kind(channels)
        if self.kind == "random":
            self.register_buffer("matrix", rotation_matrix(channels).float())
        else:
            self.matrix = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.matrix)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind}"


class LowRankBranch(nn.Module):
    """x (L1 L2)^T computed as (x L2^T) L1^T: 2 r (in + out) multiply-adds per token instead of 2 in out.

    l1 [out, r] = U_r S_r and l2 [r, in] = V_r^T of the (smoothed) weight, stored in LOWRANK_DTYPE, computed
    in the input's dtype. For a convolution, l2 is a conv with r output channels (the layer's kernel, stride,
    padding) and l1 a 1x1 conv."""

    def __init__(self, out_features: int, in_shape: tuple[int, ...], rank: int):
        super().__init__()
        self.rank = rank
        self.register_buffer("l1", torch.zeros(out_features, rank, dtype=LOWRANK_DTYPE))
        self.register_buffer("l2", torch.zeros(rank, *in_shape, dtype=LOWRANK_DTYPE))

    @torch.no_grad()
    def set(self, l1: torch.Tensor, l2: torch.Tensor) -> None:
        self.l1.copy_(l1.to(LOWRANK_DTYPE))
        self.l2.copy_(l2.reshape(self.l2.shape).to(LOWRANK_DTYPE))

    def weight(self) -> torch.Tensor:
        """L1 L2 as a dense weight of the layer's shape (float32), for the exactness checks and the views."""
        return (self.l1.float() @ self.l2.float().reshape(self.rank, -1)).reshape(self.l1.shape[0],
                                                                                 *self.l2.shape[1:])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.l2.to(x.dtype)), self.l1.to(x.dtype))

    def conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        h = F.conv2d(x, self.l2.to(x.dtype), None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(h, self.l1.to(x.dtype)[:, :, None, None])

    def extra_bytes(self) -> int:
        return (self.l1.numel() + self.l2.numel()) * self.l1.element_size()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, dtype={self.l1.dtype}"
