"""Orthogonal rotations of a layer's input: y = W x = (W Q^T)(Q x) for any orthonormal Q (docs/ARCHITECTURE.md section 7).

A normalized Hadamard matrix spreads one outlier channel evenly over all channels (every entry is +-1/sqrt(n)),
so after the rotation the activation's per-tensor range is set by the typical channel instead of the largest
(QuaRot, Ashkboos et al. 2024; HQ-DiT, Liu et al. 2024). The weight side W Q^T is folded once, offline.

Sizes n:
- a power of two: the Walsh-Hadamard (Sylvester) matrix H_2^m, applied online by the fast Walsh-Hadamard
  transform (quant.rotation.fwht: Kronecker factors of at most 64, no n x n matrix);
- n = k 2^m with a Paley Hadamard matrix H_k of order k = q + 1 (q a prime = 3 mod 4: 4, 8, 12, 20, 24, 32, 44,
  48, ...): the block construction H_k (x) H_2^m, applied online as the fast transform over the 2^m part
  followed by a small k x k matmul;
- anything else: a random orthogonal matrix (QR of a seeded Gaussian), applied as a dense matmul. The
  report names which construction each layer got (`kind`).

Where x comes from a linear producer with no nonlinearity between, Q is folded into the producer too
(rows of the producer times Q), and inference pays nothing; elsewhere QuantLinear applies Q online
(quant.modules.OnlineRotation).
"""
from __future__ import annotations

import functools
import math

import torch

# Seed of the random orthogonal fallback: the same matrix for the same size, on every machine.
FALLBACK_SEED = 2024


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


@functools.lru_cache(maxsize=None)
def paley_hadamard(k: int) -> torch.Tensor:
    """The (unnormalized, +-1) Paley type-I Hadamard matrix of order k = q + 1, q a prime with q = 3 mod 4.

    Q is the Jacobsthal matrix Q_ij = chi(j - i) (chi the quadratic character mod q); H = I + S with
    S = [[0, 1^T], [-1, Q]] skew-symmetric, and S S^T = q I, so H H^T = k I.
    """
    q = k - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley construction of order {k}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(k, k, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(k, dtype=torch.float64)


def split_size(n: int) -> tuple[int, int] | None:
    """(k, 2^m) with n = k 2^m and a Hadamard matrix of order k known here (k = 1 or a Paley order), else None."""
    if _is_power_of_two(n):
        return 1, n
    p = n & -n  # the largest power of two dividing n
    k = n // p
    while p >= 1:
        try:
            paley_hadamard(k)
            return k, p
        except ValueError:
            # a Paley order may hold a factor 2 itself (12 = 3 * 4): move powers of two into k and retry
            if p == 1:
                return None
            k, p = k * 2, p // 2
    return None


def rotation_kind(n: int) -> str:
    """'walsh' (power of two), 'paley<k>x<2^m>' (block construction) or 'random' (orthogonal fallback)."""
    split = split_size(n)
    if split is None:
        return "random"
    k, p = split
    return "walsh" if k == 1 else f"paley{k}x{p}"


# Largest factor of the fast transform done as one dense matmul (2^6 = 64): see fwht.
FACTOR_BITS = 6


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix H_2^m / sqrt(n) (symmetric), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard transform over the last dimension (a power of two n = 2^m), normalized: x H.

    H_2^m = H_2^a (x) H_2^b (x) ... with every factor at most 2^FACTOR_BITS: each factor is one small dense
    matmul over its axis, then the axes rotate by one, so after all factors they are back in order. Cost
    n (2^a + 2^b + ...) multiply-adds per row instead of n^2 (n log2 n at factor size 2, where the butterfly
    stages' memory traffic dominates on a CPU; small factors keep the arithmetic in BLAS)."""
    n = x.shape[-1]
    if not _is_power_of_two(n):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power of two, got {n}")
    m = n.bit_length() - 1
    parts = max(1, -(-m // FACTOR_BITS))
    bits = [m // parts + (1 if i < m % parts else 0) for i in range(parts)]
    shape = x.shape
    y = x.reshape(-1, n)
    for b in bits:
        f = 2 ** b
        y = y.reshape(-1, f) @ _sylvester(f).to(x)
        if len(bits) > 1:
            y = y.reshape(-1, n // f, f).transpose(1, 2)
    return y.reshape(shape)


@functools.lru_cache(maxsize=None)
def _random_orthogonal(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(FALLBACK_SEED + n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # a unique Q (Haar-distributed)


def rotation_matrix(n: int) -> torch.Tensor:
    """The orthonormal n x n matrix Q this module applies for size n (float64): Q Q^T = I."""
    split = split_size(n)
    if split is None:
        return _random_orthogonal(n).clone()
    k, p = split
    walsh = _sylvester(p).clone()
    if k == 1:
        return walsh
    return torch.kron(paley_hadamard(k) / math.sqrt(k), walsh)


def rotate(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """x Q^T over the last dimension: Q x for each row vector x, by the fastest construction for its size.

    `matrix` (the dense Q) is needed only for the random fallback; Walsh and Paley sizes are computed."""
    n = x.shape[-1]
    split = split_size(n)
    if split is None:
        q = _random_orthogonal(n) if matrix is None else matrix
        return x @ q.to(x).T
    k, p = split
    if k == 1:
        return fwht(x)
    # (H_k (x) H_p) x: reshape x to [k, p], transform the p part, then mix the k blocks by the small H_k
    y = fwht(x.reshape(*x.shape[:-1], k, p))
    hk = (paley_hadamard(k) / math.sqrt(k)).to(x)
    return torch.einsum("ij,...jp->...ip", hk, y).reshape(x.shape)


def block_diagonal(n: int, block: int) -> torch.Tensor:
    """diag(Q_block, ..., Q_block) of size n (n / block copies): one rotation per attention head."""
    if n % block:
        raise ValueError(f"{n} channels do not split into blocks of {block}")
    return torch.block_diag(*[rotation_matrix(block)] * (n // block))
