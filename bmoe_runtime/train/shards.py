"""Token shards: a corpus tokenized once into memory-mapped files, reused by later runs.

A cache entry is a directory <cache>/<key>/ holding meta.json and <split>-<n>.bin shards (raw little-endian
uint16 when the vocabulary fits, else uint32), key = hash of (corpus bytes and split rule, tokenizer). It is
written in a temporary directory and renamed into place, so a reader finds a whole entry or none. Opening an
entry checks every shard's length, and (by default) its sha256, against meta.json.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bmoe_runtime.errors import CorpusError
from bmoe_runtime.format.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_dict
from bmoe_runtime.train.data import SPLITS, CorpusSource, count_words

FORMAT, VERSION = "bmoe-tokens", 1
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB as uint16)


def default_cache_dir() -> Path:
    """$BMOE_CACHE_DIR, else $XDG_CACHE_HOME/bmoe/tokens, else ~/.cache/bmoe/tokens."""
    if os.environ.get("BMOE_CACHE_DIR"):
        return Path(os.environ["BMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bmoe" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def cache_key(source: CorpusSource, tok: Tokenizer) -> str:
    tok_desc = json.dumps(tok.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{FORMAT}/{VERSION}\n{source.sha256}\n{tok_desc}".encode()).hexdigest()[:32]


def trained_bpe(source: CorpusSource, vocab_size: int, cache_dir: str | Path | None = None) -> BPETokenizer:
    """A BPE tokenizer trained on the streamed train split, kept in the cache: training it on a large corpus is
    slow, and the shards' cache key depends on it. A cached file that does not parse is retrained."""
    import tokenizers

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"{source.sha256}\n{vocab_size}\n{tokenizers.__version__}".encode()).hexdigest()[:32]
    path = cache / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        try:
            return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, OSError):
            pass
    tok = BPETokenizer.train(source.pieces("train"), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(tok.to_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tok


class TokenSplit:
    """One split's tokens, read from memory-mapped shards (a window may span two shards)."""

    def __init__(self, shards: list[np.ndarray], chars: int, words: int):
        self.shards, self.chars, self.words = shards, chars, words
        self.offsets = np.cumsum([0] + [len(s) for s in shards]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        i = bisect.bisect_right(self.offsets, start) - 1
        lo = start - self.offsets[i]
        if lo + length <= len(self.shards[i]):
            return self.shards[i][lo:lo + length]
        parts, need = [], length
        while need > 0:
            part = self.shards[i][lo:lo + need]
            parts.append(part)
            need, i, lo = need - len(part), i + 1, 0
        return np.concatenate(parts)

    def windows(self, starts: np.ndarray, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [len(starts), seq] of the windows beginning at `starts`."""
        rows = torch.from_numpy(np.stack([self.read(int(s), seq + 1) for s in starts]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, seq: int, max_tokens: int | None,
                     rows: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the split (or its first max_tokens), `rows` at a time."""
        n = len(self) - 1 if not max_tokens else min(len(self) - 1, max_tokens)
        starts = np.arange(0, n - seq + 1, seq)
        for i in range(0, len(starts), rows):
            yield self.windows(starts[i:i + rows], seq)


@dataclass
class TokenShards:
    path: Path
    meta: dict
    splits: dict[str, TokenSplit]
    built: bool  # True when this call tokenized the corpus, False when it reused the cache


def prepare_tokens(source: CorpusSource, tok: Tokenizer, cache_dir: str | Path | None = None,
                   verify: bool = True, shard_tokens: int = SHARD_TOKENS) -> TokenShards:
    """The corpus's token shards for `tok`: from the cache when present, else tokenized into it."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / cache_key(source, tok)
    built = False
    if not entry.exists():
        _build(entry, source, tok, shard_tokens)
        built = True
    shards = open_shards(entry, verify=verify and not built)  # just built: the hashes were taken while writing
    return TokenShards(entry, shards.meta, shards.splits, built)


def open_shards(entry: Path, verify: bool = True) -> TokenShards:
    """Memory-map an entry's shards, checking their lengths (and sha256 when `verify`) against meta.json."""
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if meta["format"] != FORMAT or meta["version"] != VERSION or dtype not in (np.dtype("<u2"), np.dtype("<u4")):
            raise ValueError("unknown format")
        specs = {s: (int(meta["splits"][s]["chars"]), int(meta["splits"][s]["words"]),
                     [(entry / Path(str(sh["file"])).name, int(sh["tokens"]), str(sh["sha256"]))  # inside the entry
                      for sh in meta["splits"][s]["shards"]]) for s in SPLITS}
        if any(n < 1 for _, _, shards in specs.values() for _, n, _ in shards):
            raise ValueError("a shard of no tokens")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorpusError(f"{meta_path} is not a readable token-cache index ({type(exc).__name__}); "
                          f"delete {entry} to rebuild it") from None
    splits = {}
    for s, (chars, words, shards) in specs.items():
        arrays = []
        for path, tokens, sha256 in shards:
            if not path.is_file():
                raise CorpusError(f"token shard {path} is missing: the token cache is corrupt; delete {entry} to "
                                  "rebuild it")
            size = path.stat().st_size
            if size != tokens * dtype.itemsize:
                raise CorpusError(f"token shard {path} has {size} bytes, its index says {tokens} tokens of "
                                  f"{dtype.itemsize} bytes: the token cache is corrupt; delete {entry} to rebuild it")
            if verify and _file_sha256(path) != sha256:
                raise CorpusError(f"token shard {path} does not match its checksum: the token cache is corrupt; "
                                  f"delete {entry} to rebuild it")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        splits[s] = TokenSplit(arrays, chars, words)
    return TokenShards(entry, meta, splits, built=False)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


def _build(entry: Path, source: CorpusSource, tok: Tokenizer, shard_tokens: int) -> None:
    """Tokenize every split into a temporary directory, then rename it to `entry` (all or nothing)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    try:
        dtype = token_dtype(tok.vocab_size)
        splits = {s: _write_split(tmp, s, source, tok, dtype, shard_tokens) for s in SPLITS}
        meta = {"format": FORMAT, "version": VERSION, "corpus": {"name": source.name, "sha256": source.sha256},
                "tokenizer": tok.to_dict()["kind"], "vocab_size": tok.vocab_size, "dtype": dtype.str,
                "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "meta.json").exists():  # not another process's finished entry: a real failure
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_split(tmp: Path, split: str, source: CorpusSource, tok: Tokenizer, dtype: np.dtype,
                 shard_tokens: int) -> dict:
    shards: list[dict] = []
    f, sha, n = None, None, 0
    chars = words = 0

    def close() -> None:
        f.close()
        shards[-1].update(tokens=n, sha256=sha.hexdigest())

    try:
        for piece in source.pieces(split):
            chars += len(piece)
            words += count_words(piece)  # additive: pieces end at a space or newline after a word
            ids = _encode(tok, piece)
            if len(ids) and int(ids.max()) >= tok.vocab_size:
                raise CorpusError(f"the tokenizer produced id {int(ids.max())} ≥ its vocabulary size "
                                  f"{tok.vocab_size}")
            ids = ids.astype(dtype)
            while len(ids):
                if f is None or n == shard_tokens:
                    if f is not None:
                        close()
                    name = f"{split}-{len(shards):05d}.bin"
                    shards.append({"file": name})
                    f, sha, n = open(tmp / name, "wb"), hashlib.sha256(), 0
                take, ids = ids[:shard_tokens - n], ids[shard_tokens - n:]
                data = take.tobytes()
                f.write(data)
                sha.update(data)
                n += len(take)
        if f is None:
            raise CorpusError(f"the {split} split of {source.name} holds no tokens")
        close()
    finally:
        if f is not None and not f.closed:
            f.close()  # after an error: the caller removes the directory
    return {"tokens": sum(s["tokens"] for s in shards), "chars": chars, "words": words, "shards": shards}


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    if isinstance(tok, ByteTokenizer):  # the same ids as tok.encode, without a Python int per byte
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tok.encode(text), dtype=np.int64)
