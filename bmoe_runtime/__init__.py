"""bmoe: ButterflyMoE — train, export and run compressed Mixture-of-Experts models on edge devices.

Public API for putting ButterflyMoE layers into your own modules:

    from bmoe_runtime import ButterflyMoE, balance_loss
    layer = ButterflyMoE(d_model=256, d_ff=1024, n_experts=64, top_k=2)
    loss = task_loss + 0.01 * balance_loss(model)

Two halves, imports flowing one way (tests/test_import_contract.py):
  torch-free, ships to a device: format/ (file layout), runtime/ (session, generation, streaming),
                                 backends/ (C++ ops via ORT, Numba reference), planning/ (devices, planner)
  torch side, training only:     nn/ (model), train/ (trainer, corpus, checkpoints); exporters/ (top level)
The torch names below are imported on first use, so `bmoe-run` never loads torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_LAZY = {  # name -> module; the torch side (nn) is imported only when one of its names is used
    "ButterflyRotation": "nn.butterfly", "ButterflyMoE": "nn.moe", "ButterflyExperts": "nn.moe",
    "IndependentExperts": "nn.moe", "balance_loss": "nn.moe", "ModelConfig": "nn.model", "MoELM": "nn.model",
    "quantize": "nn.ternary", "fake_quantize": "nn.ternary", "model_memory": "nn.memory",
    "paper_expert_ratio": "nn.memory",
    "ModelSession": "runtime.session", "Generator": "runtime.generate",
}
__all__ = [*_LAZY, "default_model_dir"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_model_dir() -> Path:
    """The exported model bundled with the package (bmoe-run's default)."""
    return Path(__file__).parent / "models" / "default"
