"""Token shards: a corpus streamed in pieces gives exactly the tokens of the whole text; the cache is reused,
atomic, and checked; bad corpora and damaged shards end in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bmoe_runtime.train.data as data_mod
from bmoe_runtime.cli import train_cli
from bmoe_runtime.errors import CorpusError
from bmoe_runtime.format.tokenizer import BPETokenizer, ByteTokenizer
from bmoe_runtime.train.data import count_words, scan_corpus, split_text, step_starts
from bmoe_runtime.train.shards import cache_key, open_shards, prepare_tokens, token_dtype, trained_bpe


@pytest.fixture(scope="module")
def text(data_dir) -> str:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"TinyShakespeare not found at {path}")
    # real text, plus multi-byte characters and whitespace runs around line ends (the hard cases for cuts)
    return path.read_text(encoding="utf-8")[:60_000] + "\n  naïve café — 😀 end \n\n\t tail  \n" * 50


@pytest.fixture
def corpus(tmp_path, text):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small_reads(monkeypatch):
    """Pieces of ~1 KiB: hundreds of cuts (and characters split across reads) in a small corpus."""
    monkeypatch.setattr(data_mod, "READ_BYTES", 1021)


def test_pieces_are_the_text(corpus, text, small_reads):
    src = scan_corpus(corpus)
    cut = int(len(text) * 0.9)
    assert src.splits["train"][0].end == cut and src.splits["valid"][0].start == cut  # 90/10 by character
    pieces = list(src.pieces("train"))
    assert len(pieces) > 50 and "".join(pieces) == text[:cut]
    assert split_text(src, "valid") == text[cut:]
    assert sum(count_words(p) for p in pieces) == count_words(text[:cut])


def test_byte_shards_equal_whole_text_encoding(corpus, text, small_reads, tmp_path):
    shards = prepare_tokens(scan_corpus(corpus), ByteTokenizer(), tmp_path / "cache", shard_tokens=5000)
    cut = int(len(text) * 0.9)
    for split, ref in (("train", text[:cut]), ("valid", text[cut:]), ("test", text[cut:])):
        s = shards.splits[split]
        ids = np.concatenate(s.shards)
        assert ids.dtype == np.uint16 and np.array_equal(ids, ByteTokenizer().encode(ref))
        assert (s.chars, s.words) == (len(ref), count_words(ref))
    train = shards.splits["train"]
    assert len(train.shards) > 10 and all(len(a) == 5000 for a in train.shards[:-1])
    ref = np.array(ByteTokenizer().encode(text[:cut]))
    starts = np.array([4990, 0, len(ref) - 33])  # the first window spans two shards
    x, y = train.windows(starts, 32)
    for row, s in enumerate(starts):
        assert x[row].tolist() == ref[s:s + 32].tolist() and y[row].tolist() == ref[s + 1:s + 33].tolist()


def test_bpe_streamed_training_and_encoding_equal_whole_text(corpus, text, small_reads, tmp_path):
    src = scan_corpus(corpus)
    cut = int(len(text) * 0.9)
    whole = BPETokenizer.train(text[:cut], 400)
    streamed = BPETokenizer.train(src.pieces("train"), 400)
    assert streamed.to_dict() == whole.to_dict()
    shards = prepare_tokens(src, whole, tmp_path / "cache")
    for split, ref in (("train", text[:cut]), ("valid", text[cut:])):
        assert np.concatenate(shards.splits[split].shards).tolist() == whole.encode(ref)


def test_cache_is_reused_and_keyed(corpus, text, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_tokens(scan_corpus(corpus), ByteTokenizer(), cache)
    again = prepare_tokens(scan_corpus(corpus), ByteTokenizer(), cache)
    assert first.built and not again.built and first.path == again.path
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # nothing else: no temporary left behind
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["dtype"] == "<u2" and meta["corpus"]["sha256"] == scan_corpus(corpus).sha256
    # another tokenizer, or one changed byte of the corpus: another entry
    bpe = BPETokenizer.train(text[:5000], 300)
    assert cache_key(scan_corpus(corpus), bpe) != cache_key(scan_corpus(corpus), ByteTokenizer())
    corpus.write_text(text.replace("Citizen", "Citizens", 1), encoding="utf-8")
    changed = prepare_tokens(scan_corpus(corpus), ByteTokenizer(), cache)
    assert changed.built and changed.path != first.path


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_damaged_shards_are_refused(corpus, tmp_path):
    shards = prepare_tokens(scan_corpus(corpus), ByteTokenizer(), tmp_path / "cache")
    shard = shards.path / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(raw)  # same length, one bit flipped
    with pytest.raises(CorpusError, match="does not match its checksum.*delete .* to rebuild it"):
        prepare_tokens(scan_corpus(corpus), ByteTokenizer(), tmp_path / "cache")
    shard.write_bytes(raw[:-2])  # one token short
    with pytest.raises(CorpusError, match=r"has \d+ bytes, its index says \d+ tokens of 2 bytes"):
        open_shards(shards.path, verify=False)
    result = CliRunner().invoke(train_cli, ["--data", str(corpus), "--out", str(tmp_path / "m.pt"),
                                            "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        f"Error: token shard {shard} has {len(raw) - 2} bytes, its index says {len(raw) // 2} tokens of 2 bytes: "
        f"the token cache is corrupt; delete {shards.path} to rebuild it"]
    assert not (tmp_path / "m.pt").exists()
    shard.unlink()
    with pytest.raises(CorpusError, match="train-00000.bin is missing"):
        open_shards(shards.path, verify=False)
    meta = json.loads((shards.path / "meta.json").read_text())
    for damage in ("{not json", json.dumps({**meta, "splits": {"train": {}}}),
                   json.dumps({**meta, "dtype": "<f8"}), json.dumps([1, 2])):
        (shards.path / "meta.json").write_text(damage)
        with pytest.raises(CorpusError, match="not a readable token-cache index"):
            open_shards(shards.path)


def test_failed_tokenization_leaves_nothing(tmp_path, small_reads):
    """A non-UTF-8 byte mid-file (after shards were begun), or a file changed since its scan: one error, no cache
    entry, no temporary."""
    good_bytes = ("good text line\n" * 4000).encode()
    bad_bytes = good_bytes[:30000] + b"\xff" + good_bytes[30001:]  # same length
    bad = tmp_path / "bad.txt"
    bad.write_bytes(bad_bytes)
    with pytest.raises(CorpusError, match=r"is not UTF-8 text \(invalid byte at offset 30000"):
        scan_corpus(bad)
    cache, good = tmp_path / "cache", tmp_path / "good.txt"
    good.write_bytes(good_bytes)
    src = scan_corpus(good)
    good.write_bytes(bad_bytes)  # changed between the scan and the tokenization
    with pytest.raises(CorpusError, match="not UTF-8"):
        prepare_tokens(src, ByteTokenizer(), cache)
    assert list(cache.iterdir()) == []
    good.write_bytes(good_bytes.replace(b"good", b"bad!", 1))  # valid text, but not the scanned one
    with pytest.raises(CorpusError, match="changed while bmoe was reading it"):
        prepare_tokens(src, ByteTokenizer(), cache)
    assert list(cache.iterdir()) == []
    with pytest.raises(CorpusError, match="not a regular file"):
        scan_corpus("/dev/zero")  # would be read forever


@pytest.mark.parametrize("content, expected", [
    (None, "corpus not found"),
    (b"", "too small to train on (0 characters)"),
    (b"\xff" * 2000, "is not UTF-8 text (invalid byte at offset 0"),
])
def test_bad_corpus_is_one_line(tmp_path, content, expected):
    path = tmp_path / "c.txt"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(train_cli, ["--data", str(path), "--out", str(tmp_path / "m.pt"),
                                            "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert not (tmp_path / "m.pt").exists()


def test_empty_split_files(tmp_path):
    (tmp_path / "train.txt").write_text("")
    (tmp_path / "valid.txt").write_text("some text\n")
    with pytest.raises(CorpusError, match="the train split of .* is empty"):
        scan_corpus(tmp_path)
    (tmp_path / "train.txt").write_text("some text\n")
    (tmp_path / "valid.txt").write_text("")
    with pytest.raises(CorpusError, match="no valid.txt"):
        scan_corpus(tmp_path)


def test_split_directories_of_files(tmp_path, text):
    """train/ and valid/ directories of .txt files: read in name order, each file tokenized on its own."""
    docs = {"b.txt": text[:20_000], "a.txt": text[20_000:45_000], "c.txt": "last document\n"}
    (tmp_path / "train").mkdir()
    for name, doc in docs.items():
        (tmp_path / "train" / name).write_text(doc, encoding="utf-8")
    (tmp_path / "train" / "notes.md").write_text("not part of the corpus")
    (tmp_path / "valid").mkdir()
    (tmp_path / "valid" / "v.txt").write_text(text[45_000:], encoding="utf-8")
    src = scan_corpus(tmp_path)
    assert [sp.path.name for sp in src.splits["train"]] == ["a.txt", "b.txt", "c.txt"]
    assert src.splits["test"] == src.splits["valid"]
    bpe = BPETokenizer.train(text[:45_000], 350)
    shards = prepare_tokens(src, bpe, tmp_path / "cache")
    ids = np.concatenate(shards.splits["train"].shards).tolist()
    assert ids == sum((bpe.encode(docs[n]) for n in ("a.txt", "b.txt", "c.txt")), [])
    assert shards.splits["train"].chars == sum(map(len, docs.values()))
    assert split_text(src, "train") == docs["a.txt"] + docs["b.txt"] + docs["c.txt"]
    (tmp_path / "valid" / "v.txt").unlink()
    with pytest.raises(CorpusError, match="valid holds no .txt files"):
        scan_corpus(tmp_path)


def test_step_starts_are_a_function_of_seed_and_step():
    a = step_starts(0, 5, 10_000, 8, 32)
    assert np.array_equal(a, step_starts(0, 5, 10_000, 8, 32))
    assert not np.array_equal(a, step_starts(0, 6, 10_000, 8, 32))
    assert not np.array_equal(a, step_starts(1, 5, 10_000, 8, 32))
    assert a.min() >= 0 and a.max() < 10_000 - 33
    with pytest.raises(CorpusError, match="shorter than one sequence"):
        step_starts(0, 0, 33, 8, 32)


def test_trained_bpe_is_cached(corpus, text, tmp_path):
    src = scan_corpus(corpus)
    first = trained_bpe(src, 300, tmp_path)
    assert first.to_dict() == BPETokenizer.train(text[:int(len(text) * 0.9)], 300).to_dict()
    [cached] = (tmp_path / "tokenizers").iterdir()
    other = BPETokenizer.train("an unrelated text " * 50, 270)
    cached.write_text(json.dumps(other.to_dict()))
    assert trained_bpe(src, 300, tmp_path).to_dict() == other.to_dict()  # read from the cache, not retrained
    cached.write_text("{damaged")
    assert trained_bpe(src, 300, tmp_path).to_dict() == first.to_dict()  # retrained and rewritten
    assert json.loads(cached.read_text()) == first.to_dict()
    assert trained_bpe(src, 280, tmp_path).vocab_size == 280  # another vocabulary: another file
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


MEMORY_PROBE = """
import re, sys
import bmoe_runtime.train.data as data_mod
from bmoe_runtime.format.tokenizer import ByteTokenizer
from bmoe_runtime.train.shards import prepare_tokens
data_mod.READ_BYTES = 1 << 16  # 64 KiB pieces: the working set is small next to the corpus
kib = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here; getrusage's would include the parent's at fork
rss = kib("VmRSS")
shards = prepare_tokens(data_mod.scan_corpus(sys.argv[1]), ByteTokenizer(), sys.argv[2])
print((kib("VmHWM") - rss) * 1024, len(shards.splits["train"]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak resident set from /proc")
def test_tokenizing_needs_memory_independent_of_corpus_size(tmp_path):
    """A 24 MB corpus is scanned and tokenized with a peak-memory rise of a few MiB (measured ~2.4 MiB), not the
    corpus's size: what lets a corpus larger than RAM be tokenized."""
    line = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, naïve café.\n" for i in range(1000))
    corpus = tmp_path / "big.txt"
    corpus.write_text(line * (24_000_000 // len(line.encode())), encoding="utf-8")
    n_chars = len(line) * (24_000_000 // len(line.encode()))
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(corpus), str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rise, n_train = map(int, r.stdout.split())
    assert n_train == len(corpus.read_text(encoding="utf-8")[:int(n_chars * 0.9)].encode())
    assert rise < 8 * 2**20, f"peak rose by {rise / 2**20:.1f} MiB tokenizing {corpus.stat().st_size / 1e6:.0f} MB"
