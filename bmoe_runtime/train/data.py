"""Corpora: which text is train/valid/test, read in bounded pieces (a corpus may be larger than RAM).

A corpus is a directory with train.txt/valid.txt[/test.txt] (WikiText-2) — each split may instead be a
subdirectory of .txt files, read in name order — or one text file split 90/10 by character position
(TinyShakespeare). Files are streamed: scanned once for their hash, UTF-8 validity and length, then read piece
by piece for tokenization (bmoe_runtime.train.shards).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from bmoe_runtime.errors import CorpusError

SPLITS = ("train", "valid", "test")
READ_BYTES = 1 << 20  # bytes read (and text tokenized) at a time
MAX_PIECE_CHARS = 64 << 20  # a piece with no cut point in it this long is refused, not read whole
MIN_FILE_CHARS = 1000
# A piece ends just before a space or newline that follows a non-space character: no word, no line-internal
# whitespace run and no pre-token of the byte-level BPE regex (GPT-2's) spans such a cut, so tokenizing the
# pieces one by one gives exactly the tokens of the whole text. Searched in the reversed text for the last cut.
_LAST_CUT = re.compile(r"[ \n](?=[^\s\x1c-\x1f])")


@dataclass(frozen=True)
class SplitSpan:
    """Characters [start, end) of one UTF-8 file (end None: to the end) of n_bytes bytes with this sha256."""
    path: Path
    n_bytes: int
    sha256: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class CorpusSource:
    name: str
    splits: dict[str, list[SplitSpan]]  # train, valid, test (TinyShakespeare has no test split: valid stands in)
    sha256: str  # of every file's bytes and the split rule: the corpus's identity in the token cache

    def pieces(self, split: str) -> Iterator[str]:
        """The split's text in bounded pieces; each file of a split is tokenized on its own (a document)."""
        for span in self.splits[split]:
            yield from split_pieces(span)


def scan_corpus(path: str | Path) -> CorpusSource:
    """Check the corpus (exists, UTF-8, not empty) and hash it, streaming; raises CorpusError."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p}")
    if p.is_dir():
        files = {s: _split_files(p, s) for s in SPLITS}
        if files["train"] is None:
            inner = sorted(f for f in p.glob("*.txt") if f.is_file())
            if len(inner) == 1:
                return scan_corpus(inner[0])
            raise CorpusError(f"{p} holds no train.txt (expected train/valid/test.txt, train/ valid/ test/ "
                              "directories of .txt files, or a single .txt file)")
        spans = {s: [_scan_file(f)[0] for f in fs] for s, fs in files.items() if fs is not None}
        size = {s: sum(span.n_bytes for span in spans.get(s, [])) for s in SPLITS}
        if size["train"] == 0:
            raise CorpusError(f"the train split of {p} is empty")
        if size["valid"] == 0:
            raise CorpusError(f"{p} has a train split but no valid.txt or valid/ (or an empty one)")
        if size["test"] == 0:
            spans["test"] = spans["valid"]
        rule = {s: [span.sha256 for span in spans[s]] for s in SPLITS}
        return CorpusSource(p.name, spans, _digest(rule))
    if not p.is_file():  # a device or a pipe could be read forever
        raise CorpusError(f"{p} is not a regular file or a directory")
    whole, n_chars = _scan_file(p)
    if n_chars < MIN_FILE_CHARS:
        raise CorpusError(f"{p} is too small to train on ({n_chars} characters)")
    cut = int(n_chars * 0.9)
    spans = {"train": [replace(whole, end=cut)], "valid": [replace(whole, start=cut)],
             "test": [replace(whole, start=cut)]}
    rule = {s: [whole.sha256, span.start, span.end] for s, [span] in spans.items()}
    return CorpusSource(p.stem if p.stem != "input" else p.parent.name, spans, _digest(rule))


def _split_files(corpus: Path, split: str) -> list[Path] | None:
    """<split>/*.txt in name order, else [<split>.txt], else None."""
    if (corpus / split).is_dir():
        files = sorted(f for f in (corpus / split).glob("*.txt") if f.is_file())
        if not files:
            raise CorpusError(f"{corpus / split} holds no .txt files")
        return files
    return [corpus / f"{split}.txt"] if (corpus / f"{split}.txt").is_file() else None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _scan_file(path: Path) -> tuple[SplitSpan, int]:
    """(the whole file as a span, with its size and sha256; its number of characters), checked to be UTF-8,
    reading READ_BYTES at a time."""
    n_bytes, sha, n_chars = path.stat().st_size, hashlib.sha256(), 0
    for raw, text in _decoded_blocks(path, n_bytes):
        sha.update(raw)
        n_chars += len(text)
    return SplitSpan(path, n_bytes, sha.hexdigest()), n_chars


def _decoded_blocks(path: Path, n_bytes: int) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, their text) blocks of the first n_bytes (no more, should the file grow); a character split
    across blocks comes out whole in the later one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(min(READ_BYTES, n_bytes - offset))
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    raise CorpusError(f"{path} is not UTF-8 text (invalid byte at offset {at}: {exc.reason})") from None
                offset += len(raw)
                yield raw, text
                if not raw:
                    return
    except IsADirectoryError:
        raise CorpusError(f"{path} is a directory, not a text file") from None


def split_pieces(span: SplitSpan) -> Iterator[str]:
    """The span's text in pieces of about READ_BYTES, each ending at a cut (see _LAST_CUT). A span read to the end
    of its file is checked against the file's sha256 from the scan: a file changed since is an error."""
    pos, carry, sha = 0, "", hashlib.sha256()
    for raw, text in _decoded_blocks(span.path, span.n_bytes):
        sha.update(raw)
        lo, hi = max(span.start - pos, 0), len(text) if span.end is None else min(span.end - pos, len(text))
        pos += len(text)
        if lo < hi:
            carry += text[lo:hi]
        m = _LAST_CUT.search(carry[::-1])
        if m:
            cut = len(carry) - 1 - m.start()
            yield carry[:cut]
            carry = carry[cut:]
        elif len(carry) > MAX_PIECE_CHARS:
            raise CorpusError(f"{span.path} has {MAX_PIECE_CHARS >> 20}M characters without a space or line break "
                              "after a word: not text bmoe can tokenize in pieces")
        if span.end is not None and pos >= span.end:
            break
    if span.end is None and sha.hexdigest() != span.sha256:
        raise CorpusError(f"{span.path} changed while bmoe was reading it; run again once it is complete")
    if carry:
        yield carry


def split_text(source: CorpusSource, split: str) -> str:
    """A whole split in memory (small corpora and evaluation scripts only)."""
    return "".join(source.pieces(split))


def count_words(text: str) -> int:
    """Word count for word-level perplexity: whitespace tokens plus one end-of-line per line."""
    return len(text.split()) + text.count("\n")


@dataclass
class Corpus:
    name: str
    train: str
    valid: str
    test: str


def load_corpus(path: str | Path) -> Corpus:
    """The corpus's three splits as strings (for small corpora; training streams them instead)."""
    src = scan_corpus(path)
    return Corpus(src.name, *(split_text(src, s) for s in SPLITS))


def step_starts(seed: int, step: int, n_tokens: int, batch: int, seq: int) -> np.ndarray:
    """Start positions of the global batch of `step`: a pure function of (seed, step), so the data stream's
    position is the step number, and every rank (whatever their number) draws its rows from the same batch."""
    require_windows(n_tokens, seq)
    return np.random.default_rng([seed, step]).integers(0, n_tokens - seq - 1, size=batch)


def require_windows(n_tokens: int, seq: int) -> None:
    if n_tokens <= seq + 1:
        raise CorpusError(f"split of {n_tokens} tokens is shorter than one sequence of {seq}")
