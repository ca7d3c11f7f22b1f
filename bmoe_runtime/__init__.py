"""bmoe: ButterflyMoE — train, export and run compressed Mixture-of-Experts models on edge devices.

Public API for putting ButterflyMoE layers into your own modules:

    from bmoe_runtime import ButterflyMoE, balance_loss
    layer = ButterflyMoE(d_model=256, d_ff=1024, n_experts=64, top_k=2)
    loss = task_loss + 0.01 * balance_loss(model)
"""

from pathlib import Path

from .butterfly import ButterflyRotation
from .memory import model_memory, paper_expert_ratio
from .model import ModelConfig, MoELM
from .moe import ButterflyExperts, ButterflyMoE, IndependentExperts, balance_loss
from .ternary import fake_quantize, quantize

__all__ = ["ButterflyMoE", "ButterflyRotation", "ButterflyExperts", "IndependentExperts", "balance_loss",
           "ModelConfig", "MoELM", "quantize", "fake_quantize", "model_memory", "paper_expert_ratio"]


def default_model_dir() -> Path:
    """The exported model bundled with the package (bmoe-run's default)."""
    return Path(__file__).parent / "models" / "default"
