"""The ButterflyMoE layer and its baselines, behind one interface.

An expert bank maps (token, expert) pairs [R, d_in] with their expert ids [R] to
[R, d_out]. Banks:
  ButterflyExperts   W_i = B(θ_i)·Q(W)·B(φ_i)ᵀ: one shared ternary prototype, N rotation pairs
                     (`butterfly`; `static` freezes the rotations at random angles)
  IndependentExperts N full matrices, full precision (`dense`) or ternary (`ternary`)

The layer routes each token to its top-k experts. Two expert forms:
  paper  y = W_out · GELU(Σ_k g_k · E_k(x)),  E_k: d→d_ff, W_out shared full precision.
         The GELU is our choice, not the paper's: its public code applies the shared
         projection (nn.Linear(d_ff, d), with bias) to the gated sum directly, with no
         nonlinearity. We also drop that bias.
  ffn    y = Σ_k g_k · Down_k(GELU(Up_k(x))), both projections expert banks
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bmoe_runtime.nn.butterfly import ButterflyRotation, row_groups
from bmoe_runtime.choices import EXPERT_FORMS, VARIANTS
from bmoe_runtime.nn.ternary import fake_quantize

Variant = Literal["butterfly", "dense", "ternary", "static"]
ExpertForm = Literal["paper", "ffn"]


class ButterflyExperts(nn.Module):
    """N experts sharing one ternary prototype [d_out, d_in], each seen through two rotations."""

    def __init__(self, d_in: int, d_out: int, n_experts: int, train_rotations: bool = True,
                 per_row_scale: bool = True, angle_init_std: float = 0.02):
        super().__init__()
        self.d_in, self.d_out, self.n_experts = d_in, d_out, n_experts
        self.per_row_scale = per_row_scale
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))  # latent, fake-quantized
        self.theta = ButterflyRotation(d_out, n_experts, angle_init_std, trainable=train_rotations)  # output side
        self.phi = ButterflyRotation(d_in, n_experts, angle_init_std, trainable=train_rotations)  # input side

    def prototype(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.per_row_scale)

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        groups = row_groups(expert_index, x, self.n_experts)  # one grouping by expert for both rotations
        u = self.phi(x, expert_index, transpose=True, groups=groups)  # B(φ_i)ᵀ x
        # the prototype is fake-quantized once per forward; ONE shared matmul serves every (token, expert) pair
        v = u @ self.prototype().T
        return self.theta(v, expert_index, groups=groups)  # B(θ_i) v

    @torch.no_grad()
    def expert_matrix(self, i: int) -> torch.Tensor:
        """Dense W_i = B(θ_i)·Q(W)·B(φ_i)ᵀ, the reference reconstruction."""
        return self.theta.matrix(i) @ self.prototype() @ self.phi.matrix(i).T


class IndependentExperts(nn.Module):
    """N independent matrices [N, d_out, d_in]: the standard MoE (or MoQE-like when ternary)."""

    def __init__(self, d_in: int, d_out: int, n_experts: int, ternary: bool = False, per_row_scale: bool = True):
        super().__init__()
        self.d_in, self.d_out, self.n_experts = d_in, d_out, n_experts
        self.ternary, self.per_row_scale = ternary, per_row_scale
        self.weight = nn.Parameter(torch.randn(n_experts, d_out, d_in) / math.sqrt(d_in))

    def weights(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.per_row_scale) if self.ternary else self.weight

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        if _grouped_mm_applies(x, w):
            return _grouped_experts(x, w, expert_index)
        out = x.new_zeros(x.shape[0], self.d_out)
        # Independent weights share no matmul: one product per expert that has rows.
        order = torch.argsort(expert_index)
        counts = torch.bincount(expert_index, minlength=self.n_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = order[start:start + n]
                out[rows] = (x[rows] @ w[e].T).to(out.dtype)  # autocast gives bf16 products
                start += n
        return out

    @torch.no_grad()
    def expert_matrix(self, i: int) -> torch.Tensor:
        return self.weights()[i]


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # public from torch 2.10


def _aligned(d_in: int, d_out: int) -> bool:
    return d_in % 8 == 0 and d_out % 8 == 0  # grouped_mm's bf16 rows must be 16-byte aligned


def _grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm runs bf16 on CUDA with 16-byte aligned rows; elsewhere the per-expert loop (a host sync) runs."""
    return (x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
            and _aligned(w.shape[-1], w.shape[-2]))


def waits_on_host(model: nn.Module) -> bool:
    """Whether a CUDA training step of `model` synchronises with the host (independent experts whose shapes
    grouped_mm cannot take run the per-expert loop): such a step cannot be captured as a CUDA graph."""
    return any(isinstance(m, IndependentExperts) and not _aligned(m.d_in, m.d_out) for m in model.modules())


def _grouped_experts(x: torch.Tensor, w: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert, one grouped GEMM over all experts, rows put back: no host synchronisation."""
    order = torch.argsort(expert_index, stable=True)
    counts = torch.zeros(w.shape[0], dtype=torch.int64, device=x.device).scatter_add_(
        0, expert_index, torch.ones_like(expert_index))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    y = _grouped_mm(x[order].to(torch.bfloat16), w.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    return y.new_empty(y.shape).index_copy(0, order, y)


def make_experts(variant: str, d_in: int, d_out: int, n_experts: int, per_row_scale: bool = True) -> nn.Module:
    if variant == "butterfly":
        return ButterflyExperts(d_in, d_out, n_experts, True, per_row_scale)
    if variant == "static":
        return ButterflyExperts(d_in, d_out, n_experts, False, per_row_scale)
    if variant in ("dense", "ternary"):
        return IndependentExperts(d_in, d_out, n_experts, variant == "ternary", per_row_scale)
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


class TopKRouter(nn.Module):
    """Linear gate; softmax over the k chosen logits; N(0, noise²) on logits while training.

    Load-balance loss: mean_i (frac_i − 1/N)², with frac_i the mean full-softmax
    probability of expert i over the batch (differentiable; the paper does not say
    whether frac counts hard assignments, which would give the router no gradient).
    """

    def __init__(self, d: int, n_experts: int, top_k: int, noise_std: float = 0.1):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.noise_std = n_experts, top_k, noise_std
        self.gate = nn.Linear(d, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self.gate(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, index = logits.topk(self.top_k, dim=-1)
        gates = F.softmax(top_logits, dim=-1)
        balance = None
        if self.training:
            frac = F.softmax(logits, dim=-1).mean(dim=0)
            balance = ((frac - 1.0 / self.n_experts) ** 2).mean()
        return gates, index, balance


class ButterflyMoE(nn.Module):
    """A Mixture-of-Experts FFN layer: x [..., d_model] → [..., d_model].

    After a training-mode forward, `balance_loss` holds the router's load-balance loss
    (sum it over layers with `bmoe_runtime.balance_loss(model)`).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2,
                 variant: Variant = "butterfly", expert_form: ExpertForm = "paper",
                 router_noise: float = 0.1, per_row_scale: bool = True):
        super().__init__()
        if expert_form not in EXPERT_FORMS:
            raise ValueError(f"unknown expert form {expert_form!r}; expected one of {', '.join(EXPERT_FORMS)}")
        self.d_model, self.d_ff, self.variant, self.expert_form = d_model, d_ff, variant, expert_form
        self.router = TopKRouter(d_model, n_experts, top_k, router_noise)
        if expert_form == "paper":
            self.experts = make_experts(variant, d_model, d_ff, n_experts, per_row_scale)
            self.proj = nn.Linear(d_ff, d_model, bias=False)
        else:
            self.up = make_experts(variant, d_model, d_ff, n_experts, per_row_scale)
            self.down = make_experts(variant, d_ff, d_model, n_experts, per_row_scale)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        gates, index, self.balance_loss = self.router(x)
        k = index.shape[1]
        # Flatten (token, expert) pairs so every bank call covers the whole batch at once.
        pairs = x.unsqueeze(1).expand(-1, k, -1).reshape(-1, self.d_model)
        pair_expert = index.reshape(-1)
        if self.expert_form == "paper":
            h = self.experts(pairs, pair_expert)
            h = (h.reshape(-1, k, self.d_ff) * gates.unsqueeze(-1)).sum(dim=1)
            y = self.proj(F.gelu(h))
        else:
            h = F.gelu(self.up(pairs, pair_expert))
            y = self.down(h, pair_expert)
            y = (y.reshape(-1, k, self.d_model) * gates.unsqueeze(-1)).sum(dim=1)
        return y.reshape(shape)


def balance_loss(module: nn.Module) -> torch.Tensor:
    """Sum of the load-balance losses of every ButterflyMoE layer's last training forward."""
    losses = [m.balance_loss for m in module.modules() if isinstance(m, ButterflyMoE) and m.balance_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()
