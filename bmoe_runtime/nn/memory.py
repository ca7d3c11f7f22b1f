"""Bytes by component, counted from a model's configuration.

`paper_expert_ratio` counts the paper's way (one d_ff×d fp32 matrix per dense expert
against a 1.58-bit prototype plus fp16 angles); `model_memory` counts everything.
"""

from __future__ import annotations

from bmoe_runtime.format.butterfly_layout import angle_shape
from bmoe_runtime.nn.model import ModelConfig

TRIT_BITS = {"1.58": 1.58, "1.6": 1.6, "2": 2.0}  # ideal log2(3) as the paper counts; base-3 packing; 2-bit packing
ANGLE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def n_angles(d: int) -> int:
    s, half = angle_shape(d)
    return s * half


def butterfly_bank_bytes(d_in: int, d_out: int, n_experts: int, trit_bits: float = 1.58,
                         angle_bytes: int = 2) -> dict[str, float]:
    """One shared prototype [d_out, d_in] + per-expert (θ over d_out, φ over d_in)."""
    return {"prototype": d_out * d_in * trit_bits / 8 + d_out * 4,  # trits + fp32 row scales
            "angles": n_experts * (n_angles(d_out) + n_angles(d_in)) * angle_bytes}


def paper_expert_ratio(n_experts: int, d: int = 512, d_ff: int = 2048) -> float:
    """Dense fp32 experts / (1.58-bit prototype + fp16 angles), scales not counted (the paper's table)."""
    dense = n_experts * d_ff * d * 4
    compressed = d_ff * d * 1.58 / 8 + n_experts * (n_angles(d_ff) + n_angles(d)) * 2
    return dense / compressed


def model_memory(cfg: ModelConfig, trit_bits: float = 1.58, angle_bytes: int = 2) -> dict[str, float]:
    """Bytes by component for the whole LM; dense weights (attention, embeddings, router, projection) in fp32."""
    d, f, n, L = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_layers
    banks = [(d, f)] if cfg.expert_form == "paper" else [(d, f), (f, d)]
    out = {"prototypes": 0.0, "angles": 0.0, "experts": 0.0}
    for d_in, d_out in banks:
        if cfg.variant in ("butterfly", "static"):
            b = butterfly_bank_bytes(d_in, d_out, n, trit_bits, angle_bytes)
            out["prototypes"] += L * b["prototype"]
            out["angles"] += L * b["angles"]
        elif cfg.variant == "ternary":
            out["experts"] += L * n * (d_in * d_out * trit_bits / 8 + d_out * 4)
        else:
            out["experts"] += L * n * d_in * d_out * 4
    out["router"] = L * n * d * 4
    out["shared_projection"] = L * f * d * 4 if cfg.expert_form == "paper" else 0.0
    out["attention"] = L * (4 * d * d + 4 * d) * 4  # qkv + out + two LayerNorms
    out["embeddings"] = (cfg.vocab_size + cfg.max_seq) * d * 4 + 2 * d * 4  # tied head, final LayerNorm
    out["total"] = sum(out.values())
    return out


def expert_bytes(mem: dict[str, float]) -> float:
    return mem["prototypes"] + mem["angles"] + mem["experts"]
