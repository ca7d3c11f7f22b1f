"""Butterfly rotations: log2(P) stages of P/2 Givens rotations in FFT pairing.

The math (stage order, pairing, sign, padding) is docs/ops.md's `ButterflyRotate`;
this module is its differentiable PyTorch form. Angles live in a table
[E, S, P/2] (one butterfly per expert); every row of a batch may use its own expert.

`butterfly_apply` is the readable reference and the CPU path. On CUDA, `ButterflyRotation`
runs the fused Triton kernels of `butterfly_triton` instead (same math, float32 arithmetic);
`use_fused(False)` switches back to the reference, e.g. to compare the two.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from bmoe_runtime.format.butterfly_layout import active_mask, angle_shape, n_stages, padded_size  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from bmoe_runtime.nn.butterfly_triton import RowGroups

_fused_enabled = True


def use_fused(enabled: bool) -> None:
    """Choose the fused Triton kernels (default) or the PyTorch reference for CUDA tensors."""
    global _fused_enabled
    _fused_enabled = enabled


def fused_applies(x: torch.Tensor, angles: torch.Tensor) -> bool:
    """The fused path runs CUDA tensors up to float32 (float64 keeps the exact reference)."""
    return (_fused_enabled and x.is_cuda and x.dtype != torch.float64 and angles.dtype != torch.float64)


def row_groups(expert_index: torch.Tensor | None, x: torch.Tensor, n_experts: int) -> RowGroups | None:
    """Rows grouped by expert for the fused kernels (None where the reference runs);
    compute once and pass to every rotation of the same rows."""
    if not (_fused_enabled and x.is_cuda):
        return None
    from bmoe_runtime.nn.butterfly_triton import RowGroups  # Triton only where CUDA is
    return RowGroups(expert_index, x.shape[0], n_experts, x.device)


def active_pairs(d: int) -> torch.Tensor:
    """[S, P/2] bool mask of the real rotations (see butterfly_layout.active_mask)."""
    return torch.from_numpy(active_mask(d))


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

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor | None = None, transpose: bool = False,
                groups: RowGroups | None = None) -> torch.Tensor:
        """x [M, d]; expert_index [M] (int64) or None when E == 1; groups: `row_groups` of the same rows."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected last dim {self.d}, got {tuple(x.shape)}")
        if expert_index is None and self.n_experts != 1:
            raise ValueError("expert_index is required when the bank holds more than one expert")
        if fused_applies(x, self.angles):
            from bmoe_runtime.nn.butterfly_triton import butterfly_rotate
            if groups is None:
                groups = row_groups(expert_index, x, self.n_experts)
            return butterfly_rotate(x, self.angles, groups, transpose)
        c, s = self.tables()
        if expert_index is not None:
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
