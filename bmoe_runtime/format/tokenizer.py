"""Tokenizers that travel inside checkpoints and exports: byte-level and BPE."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_verified
from bmoe_runtime.format.untrusted import parse_json


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


MAX_TOKENIZER_BYTES = 64 * 2**20  # a 250k-token BPE vocabulary is ~20 MiB of JSON


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(d.get("json"), str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(d["json"]))
        except Exception as exc:  # the tokenizers package raises a bare Exception for a bad description
            raise BmoeError(f"not a readable BPE tokenizer: {str(exc).splitlines()[0][:160] if str(exc) else exc!r}") \
                from None
    what = f"kind {str(kind)[:40]!r}" if isinstance(d, dict) else f"a {type(d).__name__}, not a table"
    raise BmoeError(f"unknown tokenizer description ({what}); expected kind 'byte' or 'bpe' with its json")


def load_tokenizer(model_dir: str | Path, manifest: dict) -> Tokenizer:
    """An exported model's tokenizer: read once, bounded, after its size and sha256 are checked."""
    name = manifest["tokenizer"]
    data = read_verified(model_dir, manifest, name, MAX_TOKENIZER_BYTES)
    where = f"{model_dir}: {name}"
    try:
        return tokenizer_from_dict(parse_json(data, where))
    except BmoeError as exc:
        raise BmoeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
