"""Tokenizers that travel inside checkpoints and exports: byte-level and BPE.

A checkpoint stores a tokenizer as bmoe's own small description ({"kind": "byte"} or
{"kind": "bpe", "json": ...}, to_dict). An export stores it as a Hugging Face `tokenizers`
file (hf_json): the format ONNX Runtime GenAI's tokenizer, HF's loaders and bmoe's runtime
all read, so an app and bmoe-run tokenize identically. Exports written before that change hold
bmoe's description in tokenizer.json; load_tokenizer still reads them (a dozen lines, and it
keeps every existing export runnable).
"""

from __future__ import annotations

import json
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

    def hf_json(self) -> str:
        """The same tokenizer as a Hugging Face file: byte-level BPE without merges, so byte b is token b."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE(vocab={char: b for b, char in enumerate(byte_level_alphabet())}, merges=[]))
        # use_regex=False: no GPT-2 word split, so no pre-token boundary can change how bytes group
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map in byte order: the character HF's ByteLevel uses for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer: byte-level BPE trained offline on the train split, or any
    tokenizer.json an export carries (the byte-level one included)."""

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

    def hf_json(self) -> str:
        return self._tok.to_str()

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)


MAX_TOKENIZER_BYTES = 64 * 2**20  # a 250k-token BPE vocabulary is ~20 MiB of JSON


def tokenizer_from_dict(d: dict) -> Tokenizer:
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(d.get("json"), str):
        return hf_tokenizer(d["json"])
    what = f"kind {str(kind)[:40]!r}" if isinstance(d, dict) else f"a {type(d).__name__}, not a table"
    raise BmoeError(f"unknown tokenizer description ({what}); expected kind 'byte' or 'bpe' with its json")


def hf_tokenizer(text: str) -> BPETokenizer:
    """A Hugging Face tokenizer.json's text as a tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as exc:  # the tokenizers package raises a bare Exception for a bad description
        raise BmoeError(f"not a readable Hugging Face tokenizer: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc).strip() else repr(exc)


def load_tokenizer(model_dir: str | Path, manifest: dict) -> Tokenizer:
    """An exported model's tokenizer: read once, bounded, after its size and sha256 are checked.
    A Hugging Face tokenizer.json, or bmoe's own description (exports before the GenAI files)."""
    name = manifest["tokenizer"]
    data = read_verified(model_dir, manifest, name, MAX_TOKENIZER_BYTES)
    where = f"{model_dir}: {name}"
    try:
        d = parse_json(data, where)  # bounded depth before the tokenizers package sees it
        if isinstance(d, dict) and "kind" not in d:
            return hf_tokenizer(json.dumps(d))
        return tokenizer_from_dict(d)
    except BmoeError as exc:
        raise BmoeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
