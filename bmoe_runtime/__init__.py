"""bmoe: ButterflyMoE — train, export and run compressed Mixture-of-Experts models on edge devices.

Public API for putting ButterflyMoE layers into your own modules:

    from bmoe_runtime import ButterflyMoE, balance_loss
    layer = ButterflyMoE(d_model=256, d_ff=1024, n_experts=64, top_k=2)
    loss = task_loss + 0.01 * balance_loss(model)

The training API needs torch; it is imported on first use, so the runtime
(`bmoe_runtime.session`, `bmoe-run`) never loads torch (~200 MiB of RSS on a device).
"""

from __future__ import annotations

import importlib
from pathlib import Path

_LAZY = {
    "ButterflyRotation": "butterfly", "ButterflyMoE": "moe", "ButterflyExperts": "moe",
    "IndependentExperts": "moe", "balance_loss": "moe", "ModelConfig": "model", "MoELM": "model",
    "quantize": "ternary", "fake_quantize": "ternary", "model_memory": "memory", "paper_expert_ratio": "memory",
}
__all__ = [*_LAZY, "default_model_dir"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model_dir() -> Path:
    """The exported model bundled with the package (bmoe-run's default)."""
    return Path(__file__).parent / "models" / "default"
