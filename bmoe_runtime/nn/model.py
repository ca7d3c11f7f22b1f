"""A small decoder-only LM with a ButterflyMoE FFN in every block (nanoGPT-shaped).

Pre-norm blocks, causal multi-head attention, learned positions, tied embeddings.
`forward(ids, past)` takes and returns a per-layer KV cache, so the same code serves
training (no cache), generation, and the exported decode graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from bmoe_runtime.nn.moe import EXPERT_FORMS, VARIANTS, ButterflyMoE, balance_loss
from bmoe_runtime.nn.ternary import TernaryLinear

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value) [B, H, T, d_head]


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    n_experts: int = 8
    top_k: int = 2
    max_seq: int = 256
    variant: str = "butterfly"
    expert_form: str = "paper"
    router_noise: float = 0.1
    balance_weight: float = 0.01
    per_row_scale: bool = True
    # quantization-aware training (ternary, as the experts) of the attention projections and
    # of the `paper` form's shared projection; exported through TernaryMatMul (bmoe-export --attn/--proj ternary)
    ternary_attn: bool = False
    ternary_proj: bool = False
    dropout: float = 0.0  # training only (embeddings, attention weights, residual branches); inference ignores it

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.expert_form not in EXPERT_FORMS:
            raise ValueError(f"unknown expert form {self.expert_form!r}; expected one of {', '.join(EXPERT_FORMS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "max_seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ternary_proj and self.expert_form != "paper":
            raise ValueError("ternary_proj needs expert_form 'paper' (the 'ffn' form has no shared projection)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        if cfg.ternary_attn:
            self.qkv = TernaryLinear(cfg.d_model, 3 * cfg.d_model, cfg.per_row_scale)
            self.out = TernaryLinear(cfg.d_model, cfg.d_model, cfg.per_row_scale)
        else:
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
            self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """key_mask [B, P+T] bool: False at padding, which no other position attends to."""
        b, t, d = x.shape
        # 2-D projections export as Gemm on the named weights (no folded transposed copies)
        q, k, v = self.qkv(x.reshape(b * t, d)).reshape(b, t, 3 * d).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.n_heads, self.d_head).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if past is None and key_mask is None:  # training and prefill: the fused (flash) causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            p = k.shape[2] - t  # cached positions before this chunk
            # query i sits at absolute position p + i and may see keys 0 .. p + i
            keys, queries = torch.arange(p + t, device=x.device)[None, :], p + torch.arange(t, device=x.device)[:, None]
            mask = keys <= queries
            if key_mask is not None:  # padding hidden; a query always sees itself, so a padding row has no NaN
                mask = (mask[None] & (key_mask[:, None, :] | (keys == queries)[None]))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out(y.reshape(b * t, d)).reshape(b, t, d), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_moe = nn.LayerNorm(cfg.d_model)
        self.moe = ButterflyMoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.variant, cfg.expert_form,
                                cfg.router_noise, cfg.per_row_scale)
        if cfg.ternary_proj:  # same parameter shape and name as the fp32 projection it replaces
            self.moe.proj = TernaryLinear(cfg.d_ff, cfg.d_model, cfg.per_row_scale)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                key_mask: torch.Tensor | None = None):
        a, present = self.attn(self.ln_attn(x), past, key_mask)
        x = x + self.drop(a)
        x = x + self.drop(self.moe(self.ln_moe(x)))
        return x, present


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, past: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """ids [B, T] → logits [B, T, V] and the KV cache including these T positions. For padded batches
        (ONNX Runtime GenAI's convention): attention_mask [B, P+T], 0 at padding; position_ids [B, T]."""
        t = ids.shape[1]
        if position_ids is None:
            start = 0 if past is None else past[0][0].shape[2]
            position_ids = torch.arange(start, start + t, device=ids.device)[None]
        x = self.drop(self.tok_emb(ids) + self.pos_emb(position_ids))
        key_mask = None if attention_mask is None else attention_mask != 0
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i], key_mask)
            present.append(kv)
        logits = self.ln_f(x) @ self.tok_emb.weight.T  # tied embeddings
        return logits, present

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss with load balance, cross-entropy alone)."""
        logits, _ = self(ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce + self.cfg.balance_weight * balance_loss(self).to(ce.device), ce

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n_new: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation with the KV cache; ids [B, T]."""
        if ids.shape[1] + n_new > self.cfg.max_seq:
            raise ValueError(f"prompt + new tokens ({ids.shape[1]} + {n_new}) exceed max_seq {self.cfg.max_seq}")
        logits, past = self(ids)
        out = [ids]
        for step in range(n_new):
            last = logits[:, -1]
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)
            else:
                nxt = last.argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if step + 1 < n_new:
                logits, past = self(nxt, past)
        return torch.cat(out, dim=1)
