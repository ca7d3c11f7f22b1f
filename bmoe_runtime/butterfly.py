"""Butterfly rotations: log2(P) stages of P/2 Givens rotations in FFT pairing.

The math (stage order, pairing, sign, padding) is docs/ops.md's `ButterflyRotate`;
this module is its differentiable PyTorch form. Angles live in a table
[E, S, P/2] (one butterfly per expert); every row of a batch may use its own expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def padded_size(d: int) -> int:
    """Next power of two ≥ d (the butterfly works on P = 2^S coordinates)."""
    if d < 2:
        raise ValueError(f"butterfly size must be ≥ 2, got {d}")
    return 1 << (d - 1).bit_length()


def n_stages(d: int) -> int:
    return padded_size(d).bit_length() - 1


def angle_shape(d: int) -> tuple[int, int]:
    """(stages, pairs per stage) of one butterfly over d coordinates."""
    return n_stages(d), padded_size(d) // 2


def active_pairs(d: int) -> torch.Tensor:
    """[S, P/2] bool: pair k of stage s is a real rotation (both ends < d).

    Pairs that would mix a real coordinate with zero padding stay identity, so the
    d×d operator is exactly orthogonal for any d (not only powers of two).
    """
    s_count, half = angle_shape(d)
    k = torch.arange(half)
    rows = []
    for s in range(s_count):
        h = 1 << s
        j = ((k >> s) << (s + 1)) | (k & (h - 1))
        rows.append(j + h < d)
    return torch.stack(rows)


def butterfly_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotate rows of x [M, d] with per-row cos/sin tables [M or 1, S, P/2].

    Inactive pairs must already hold cos=1, sin=0 (see `ButterflyRotation.tables`).
    """
    m, d = x.shape
    p = padded_size(d)
    s_count = n_stages(d)
    z = x if p == d else torch.nn.functional.pad(x, (0, p - d))
    stages = range(s_count - 1, -1, -1) if transpose else range(s_count)
    for s in stages:
        h = 1 << s
        blocks = z.reshape(m, p // (2 * h), 2, h)
        a, b = blocks[:, :, 0, :], blocks[:, :, 1, :]
        c = cos[:, s].reshape(-1, p // (2 * h), h)
        sn = sin[:, s].reshape(-1, p // (2 * h), h)
        if transpose:
            sn = -sn
        z = torch.stack((c * a - sn * b, sn * a + c * b), dim=2).reshape(m, p)
    return z[:, :d]


class ButterflyRotation(nn.Module):
    """A bank of E butterfly rotations over d coordinates.

    trainable=False keeps the angles fixed (the `static` baseline's random rotations).
    """

    def __init__(self, d: int, n_experts: int = 1, init_std: float = 0.02, trainable: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.d = d
        self.n_experts = n_experts
        shape = (n_experts, *angle_shape(d))
        if trainable:
            self.angles = nn.Parameter(torch.randn(shape, generator=generator) * init_std)
        else:  # a uniformly random, never-trained butterfly per expert
            self.register_buffer("angles", (torch.rand(shape, generator=generator) * 2 - 1) * math.pi)
        self.register_buffer("active", active_pairs(d), persistent=False)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [E, S, P/2], computed once per forward for every expert."""
        c = torch.where(self.active, torch.cos(self.angles), torch.ones_like(self.angles))
        s = torch.where(self.active, torch.sin(self.angles), torch.zeros_like(self.angles))
        return c, s

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
        """x [M, d]; expert_index [M] (int64) or None when E == 1."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected last dim {self.d}, got {tuple(x.shape)}")
        c, s = self.tables()
        if expert_index is None:
            if self.n_experts != 1:
                raise ValueError("expert_index is required when the bank holds more than one expert")
        else:
            # F.embedding gathers the same rows as c[expert_index], but its backward is a segmented sum:
            # advanced indexing's backward is very slow on CUDA with many repeated indices (pytorch#41162)
            e = c.shape[0]
            c = torch.nn.functional.embedding(expert_index, c.reshape(e, -1)).reshape(-1, *c.shape[1:])
            s = torch.nn.functional.embedding(expert_index, s.reshape(e, -1)).reshape(-1, *s.shape[1:])
        return butterfly_apply(x, c, s, transpose)

    @torch.no_grad()
    def matrix(self, expert: int = 0) -> torch.Tensor:
        """Dense d×d matrix B(θ_expert) (for tests and reference reconstructions)."""
        eye = torch.eye(self.d, dtype=self.angles.dtype, device=self.angles.device)
        idx = torch.full((self.d,), expert, dtype=torch.long, device=eye.device)
        # rows of the result are B e_j, i.e. columns of B
        return self.forward(eye, idx).T
