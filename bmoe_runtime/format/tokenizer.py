"""Tokenizers that travel inside checkpoints and exports: byte-level and BPE."""

from __future__ import annotations

import json
from typing import Iterable, Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_dict(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; vocab 256, nothing to train."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte"}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` package, trained offline on the train split."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on `text`, or on its pieces (a corpus streamed from disk, cut between pre-tokens)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        pieces = [text] if isinstance(text, str) else text
        batches = (lines[i:i + 1000] for piece in pieces
                   for lines in [piece.splitlines(keepends=True)] for i in range(0, len(lines), 1000))
        tok.train_from_iterator(batches, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"kind": "bpe", "json": self._tok.to_str()}


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(d["json"]))
    raise ValueError(f"unknown tokenizer description: {json.dumps(d)[:80]}")
