"""The corpora in ../shared/data: WikiText-2 (given splits) and TinyShakespeare (90/10 by position)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bmoe_runtime.errors import CorpusError


@dataclass
class Corpus:
    name: str
    train: str
    valid: str
    test: str  # TinyShakespeare has no test split: its valid split stands in


def load_corpus(path: str | Path) -> Corpus:
    """A directory with train.txt/valid.txt/test.txt, or one text file split 90/10."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p}")
    if p.is_dir():
        files = {s: p / f"{s}.txt" for s in ("train", "valid", "test")}
        if not files["train"].exists():
            inner = sorted(p.glob("*.txt"))
            if len(inner) == 1:
                return load_corpus(inner[0])
            raise CorpusError(f"{p} holds no train.txt (expected train/valid/test.txt or a single .txt file)")
        text = {s: f.read_text(encoding="utf-8") if f.exists() else "" for s, f in files.items()}
        if not text["valid"]:
            raise CorpusError(f"{p} has train.txt but no valid.txt")
        return Corpus(p.name, text["train"], text["valid"], text["test"] or text["valid"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{p} is not UTF-8 text: {exc}") from None
    if len(text) < 1000:
        raise CorpusError(f"{p} is too small to train on ({len(text)} characters)")
    cut = int(len(text) * 0.9)
    return Corpus(p.stem if p.stem != "input" else p.parent.name, text[:cut], text[cut:], text[cut:])


def count_words(text: str) -> int:
    """Word count for word-level perplexity: whitespace tokens plus one end-of-line per line."""
    return len(text.split()) + text.count("\n")


class TokenStream:
    """A split encoded once; random windows for training, contiguous ones for evaluation."""

    def __init__(self, ids: list[int] | np.ndarray):
        self.ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, batch: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.ids) <= seq + 1:
            raise CorpusError(f"split of {len(self.ids)} tokens is shorter than one sequence of {seq}")
        start = torch.randint(0, len(self.ids) - seq - 1, (batch,), generator=gen)
        rows = start[:, None] + torch.arange(seq + 1)
        chunk = self.ids[rows]
        return chunk[:, :-1], chunk[:, 1:]

    def windows(self, seq: int, max_tokens: int | None = None):
        """Non-overlapping (input, target) windows covering the split (or its first max_tokens)."""
        n = len(self.ids) - 1 if max_tokens is None else min(len(self.ids) - 1, max_tokens)
        for s in range(0, n - seq + 1, seq):
            yield self.ids[s:s + seq][None], self.ids[s + 1:s + seq + 1][None]
