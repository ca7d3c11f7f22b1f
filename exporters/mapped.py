"""A checkpoint's model whose weights are views of the checkpoint file (no copy in memory).

bmoe-export reads every weight once and writes a much smaller or equal amount, so it maps the
file (torch.load(mmap=True)) and builds the model on the meta device, then assigns the mapped
tensors as its parameters: the weights are in memory once, as file pages the kernel can drop,
instead of three times (the loaded dict, the constructed model, the export's copy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bmoe_runtime.format.tokenizer import Tokenizer, tokenizer_from_dict
from bmoe_runtime.nn.butterfly import ButterflyRotation, active_pairs
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.train.checkpoint import MISMATCH_ERRORS, mismatch, read_checkpoint


def load_mapped(path: str | Path) -> tuple[MoELM, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint dict), as train.checkpoint.load_model, with the
    parameters mapped from the file (its checksum verified by read_checkpoint, as there)."""
    ckpt = read_checkpoint(path, mmap=True)
    try:
        cfg = ModelConfig.from_dict(ckpt["config"])
        with torch.device("meta"):
            model = MoELM(cfg)
        _match_dtypes(model, ckpt["state_dict"])
        model.load_state_dict(ckpt["state_dict"], assign=True)  # strict: every parameter from the file
        tok = tokenizer_from_dict(ckpt["tokenizer"])
    except MISMATCH_ERRORS as exc:
        raise mismatch(path, exc) from None
    _derive_buffers(model)
    return model.eval(), tok, ckpt


def _match_dtypes(model: MoELM, state: dict) -> None:
    """assign=True keeps a tensor's dtype where load_model's copy converts it: convert those (a copy of
    that tensor only; bmoe-train writes the model's own dtypes)."""
    for name, want in model.state_dict().items():
        got = state.get(name) if isinstance(state, dict) else None
        if isinstance(got, torch.Tensor) and got.dtype != want.dtype:
            state[name] = got.to(want.dtype)


def _derive_buffers(model: MoELM) -> None:
    """Recompute the buffers a checkpoint does not hold (persistent=False: derived from the shape)."""
    for m in model.modules():
        if isinstance(m, ButterflyRotation):
            m.active = active_pairs(m.d)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a new derived buffer this function does not know: fail loudly, never export garbage
        raise RuntimeError(f"buffers not in the checkpoint and not derived: {', '.join(left[:3])}")
