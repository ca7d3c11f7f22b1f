"""model.pt: a plain dict that loads with torch.load(weights_only=True) — no pickled code.

    {"format": "bmoe-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
     "tokenizer": {...}, "metrics": {...}, "train_state": {...} (optional, for --resume),
     "checksum": {"sha256": ...}}

The checksum covers everything else in the file (tensors as dtype, shape and bytes; config,
tokenizer, metrics, training state) and is verified on every load, so a flipped byte in a
weight is an error rather than a silently different model. Checkpoints written before it
existed load with a warning on stderr (integrity unverified); re-saving adds it.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import pickle
from pathlib import Path

import torch

from bmoe_runtime.errors import CheckpointError
from bmoe_runtime.format.staging import staged_file
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.format.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT, VERSION = "bmoe-checkpoint", 1


def save_checkpoint(path: str | Path, model: MoELM, tokenizer: Tokenizer, metrics: dict,
                    train_state: dict | None = None) -> None:
    """Write atomically: a crash mid-save never leaves a truncated model.pt."""
    ckpt = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": tokenizer.to_dict(), "metrics": metrics}
    if train_state is not None:
        ckpt["train_state"] = train_state
    write_checkpoint(path, ckpt)


def write_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Write a checkpoint's content atomically under a fresh checksum (also after editing a read one: dropping
    its training state, adding metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"}
    ckpt["checksum"] = {"sha256": content_sha256(ckpt)}
    with staged_file(path, legacy=(f"{glob.escape(path.name)}.*.tmp",)) as tmp:  # .tmp: before staging.py
        torch.save(ckpt, tmp)
        os.replace(tmp, path)


def content_sha256(ckpt: dict) -> str:
    """sha256 of a checkpoint's content except its checksum: dict keys in sorted order, tensors as dtype,
    shape and raw bytes, plain values by type and repr (exact for floats). Iterative: no recursion limit."""
    h = hashlib.sha256()
    todo: list = [{k: v for k, v in ckpt.items() if k != "checksum"}]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(v, dict):
            items = sorted(v.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
            h.update(f"D{len(items)}:".encode())
            for k, x in reversed(items):
                todo += [x, k]
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__[0]}{len(v)}:".encode())
            todo.extend(reversed(v))
        elif v is None or isinstance(v, (bool, int, float, str, bytes)):
            h.update(f"{type(v).__name__}:{v!r};".encode())
        else:
            raise CheckpointError(f"a checkpoint cannot hold a {type(v).__name__}")
    return h.hexdigest()


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """mmap: tensors are views of the file (read on demand; the exporter's bounded memory) instead of copies."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's message here is advice to load unsafely: not ours to give
        raise CheckpointError(f"{path} is not a readable checkpoint (not a torch.save file of plain tensors "
                              "and containers: corrupt, or it holds pickled objects bmoe never loads)") from None
    except Exception as exc:  # truncated or foreign files fail in many ways (OSError, EOFError, zip errors, ...)
        raise CheckpointError(f"{path} is not a readable checkpoint ({_describe(exc, 160)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bmoe checkpoint (no format tag {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {str(ckpt.get('version'))[:20]}, "
                              f"this bmoe reads version {VERSION}")
    _verify_checksum(path, ckpt)
    return ckpt


def _verify_checksum(path: Path, ckpt: dict) -> None:
    if "checksum" not in ckpt:
        logging.getLogger("bmoe").warning(f"warning: {path} has no checksum (written by an older bmoe): "
                                          "its integrity is not verified")
        return
    want = ckpt["checksum"].get("sha256") if isinstance(ckpt["checksum"], dict) else None
    try:
        actual = content_sha256(ckpt)
    except (RuntimeError, TypeError) as exc:  # a tensor torch cannot lay out as bytes
        raise CheckpointError(f"{path} holds an unreadable value ({_describe(exc, 120)})") from None
    if actual != want:
        raise CheckpointError(f"{path} fails its checksum: corrupted or modified since it was saved")


# what building the model from a checkpoint's config and tensors raises when they are not this bmoe's
MISMATCH_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError)


def mismatch(path: str | Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} does not match this bmoe's model: {_describe(exc, 200)}")


def load_model(path: str | Path) -> tuple[MoELM, Tokenizer, dict]:
    """(model in eval mode, tokenizer, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["config"])
        model = MoELM(cfg)
        model.load_state_dict(ckpt["state_dict"])
        tok = tokenizer_from_dict(ckpt["tokenizer"])
    except MISMATCH_ERRORS as exc:
        raise mismatch(path, exc) from None
    return model.eval(), tok, ckpt


def _describe(exc: BaseException, limit: int) -> str:
    """One line: the exception's type and the start of its message (which may be empty or multi-line)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
