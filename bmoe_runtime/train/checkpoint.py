"""model.pt: a plain dict that loads with torch.load(weights_only=True) — no pickled code.

    {"format": "bmoe-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
     "tokenizer": {...}, "metrics": {...}, "train_state": {...} (optional, for --resume)}
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from bmoe_runtime.errors import CheckpointError
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.format.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT, VERSION = "bmoe-checkpoint", 1


def save_checkpoint(path: str | Path, model: MoELM, tokenizer: Tokenizer, metrics: dict,
                    train_state: dict | None = None) -> None:
    """Write atomically: a crash mid-save never leaves a truncated model.pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": tokenizer.to_dict(), "metrics": metrics}
    if train_state is not None:
        ckpt["train_state"] = train_state
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message here is advice to load unsafely: not ours to give
        raise CheckpointError(f"{path} is not a readable checkpoint (not a torch.save file of plain tensors "
                              "and containers: corrupt, or it holds pickled objects bmoe never loads)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways (OSError, EOFError, zip errors, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint ({_describe(exc, 160)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bmoe checkpoint (no format tag {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, this bmoe reads version {VERSION}")
    return ckpt


def load_model(path: str | Path) -> tuple[MoELM, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["config"])
        model = MoELM(cfg)
        model.load_state_dict(ckpt["state_dict"])
        tok = tokenizer_from_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match this bmoe's model: {_describe(exc, 200)}") from None
    return model.eval(), tok, ckpt


def _describe(exc: BaseException, limit: int) -> str:
    """One line: the exception's type and the start of its message (which may be empty or multi-line)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
