"""Ternary (1.58-bit) quantization, BitNet b1.58 absmean style.

W ≈ scale · T with T ∈ {-1, 0, +1}; scale = mean|W| per output row (or per tensor).
Training uses fake quantization with a straight-through estimator, so the latent
full-precision W keeps receiving gradients while the forward pass sees the grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def absmean_scale(w: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """Scale of shape [..., rows, 1] (per row) or [..., 1, 1] (per tensor)."""
    dims = (-1,) if per_row else (-2, -1)
    return w.abs().mean(dim=dims, keepdim=True).clamp_min(EPS)


def quantize(w: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., N, K] → (trits int8 [..., N, K], scales float32 [..., N])."""
    scale = absmean_scale(w.detach().float(), per_row)
    trits = torch.round(w.detach().float() / scale).clamp_(-1, 1).to(torch.int8)
    scale = scale.expand(*w.shape[:-1], 1).squeeze(-1).contiguous()
    return trits, scale


def fake_quantize(w: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """Forward: scale·T. Backward: identity (straight-through estimator)."""
    scale = absmean_scale(w, per_row).detach()
    wq = torch.round(w / scale).clamp(-1, 1) * scale
    if not (torch.is_grad_enabled() and w.requires_grad):
        return wq  # exactly trits·scale, as exported
    return w + (wq - w).detach()


class TernaryLinear(nn.Linear):
    """nn.Linear (no bias) trained ternary: the forward sees fake_quantize(weight), as the experts'
    prototypes do, so the weight exports exactly as trits·scale (TernaryMatMul)."""

    def __init__(self, in_features: int, out_features: int, per_row_scale: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.per_row_scale = per_row_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.per_row_scale))
