"""bmoe-train: user errors without tracebacks, a real short run, resume, BPE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bmoe_runtime.train.trainer as train_mod
from bmoe_runtime.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from bmoe_runtime.cli import train_cli
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.format.tokenizer import BPETokenizer, ByteTokenizer
from bmoe_runtime.train.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--batch", "8", "--seq", "32", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--experts", "4"]
TINY_MODEL = dict(d_model=32, d_ff=64, n_layers=1, n_experts=4)


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch) -> Path:
    """Token shards go to a per-module temporary cache, never to ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "token-cache"
    monkeypatch.setenv("BMOE_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> Path:
    path = data_dir / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"TinyShakespeare not found at {path}")
    return path


@pytest.fixture(scope="module")
def shakespeare_slice(shakespeare, tmp_path_factory) -> Path:
    """The first 200k characters of TinyShakespeare (90/10 split as usual): real text, quicker evaluations."""
    path = tmp_path_factory.mktemp("slice") / "shakespeare.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A synthetic corpus big enough for load_corpus (≥ 1000 characters)."""
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    return path


def assert_one_line_error(result, expected: str, exit_code: int = 1):
    """Non-zero exit through click (SystemExit, not an escaped exception), one `Error:` line, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert expected in errors[0], errors[0]


# ---- user errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected, code", [
    (["--preset", "huge"], "Invalid value for '--preset'", 2),
    (["--variant", "sparse"], "Invalid value for '--variant'", 2),
    (["--expert-form", "glu"], "Invalid value for '--expert-form'", 2),
    (["--eval-every", "0"], "Invalid value for '--eval-every'", 2),
    (["--log-every", "0"], "Invalid value for '--log-every'", 2),
    (["--steps", "0"], "Invalid value for '--steps'", 2),
    (["--batch", "0"], "Invalid value for '--batch'", 2),
    (["--seq", "0"], "Invalid value for '--seq'", 2),
    (["--lr", "-1"], "Invalid value for '--lr'", 2),
    (["--d-model", "30"], "not divisible by n_heads", 1),
    (["--experts", "2", "--top-k", "3"], "top_k 3 exceeds n_experts 2", 1),
])
def test_bad_settings(tmp_path, small_corpus, args, expected, code):
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(train_cli, ["--data", str(small_corpus), "--out", str(out), "--steps", "2", *args])
    assert_one_line_error(result, expected, code)
    assert not out.exists()


def test_bad_corpora(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "m.pt")
    missing = tmp_path / "nope" / "input.txt"
    assert_one_line_error(runner.invoke(train_cli, ["--data", str(missing), "--out", out]), "corpus not found")
    small = tmp_path / "small.txt"
    small.write_text("too short")
    assert_one_line_error(runner.invoke(train_cli, ["--data", str(small), "--out", out]), "too small")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_one_line_error(runner.invoke(train_cli, ["--data", str(binary), "--out", out]), "not UTF-8")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert_one_line_error(runner.invoke(train_cli, ["--data", str(empty_dir), "--out", out]), "no train.txt")


def test_resume_from_bad_checkpoints(tmp_path, small_corpus):
    runner = CliRunner()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    result = runner.invoke(train_cli, ["--data", str(small_corpus), "--out", str(junk), "--resume"])
    assert_one_line_error(result, "not a readable checkpoint")
    no_state = tmp_path / "final.pt"
    torch.manual_seed(0)
    save_checkpoint(no_state, MoELM(ModelConfig(d_model=16, n_heads=2, d_ff=16, n_experts=2, n_layers=1)),
                    ByteTokenizer(), {})
    result = runner.invoke(train_cli, ["--data", str(small_corpus), "--out", str(no_state), "--resume"])
    assert_one_line_error(result, "no training state to resume from")


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bmoe_runtime.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_subprocess_errors_have_no_traceback(tmp_path, small_corpus):
    """In a real process (not CliRunner, which swallows exceptions): exit 1, one `Error:` line on stderr."""
    r = run_module("train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines() == [f"Error: corpus not found: {tmp_path / 'missing.txt'}"]
    # an error raised deep inside the trainer (after the corpus is tokenized) still ends in one line
    r = run_module("train", "--data", str(small_corpus), "--out", str(tmp_path / "m.pt"), "--seq", "20000",
                   "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("Error: split of "), r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("tokens is shorter than one sequence of 20000")


def test_train_config_validation():
    TrainConfig(steps=1, warmup=0, eval_tokens=0)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-1)


# ---- real training on TinyShakespeare ----------------------------------------------------------------

def test_short_training_run_learns(tmp_path, shakespeare):
    out = tmp_path / "run" / "model.pt"
    result = CliRunner().invoke(train_cli, ["--data", str(shakespeare), "--out", str(out), "--steps", "30",
                                            "--eval-every", "15", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert "done: valid loss" in result.output
    ckpt = read_checkpoint(out)
    hist = ckpt["metrics"]["history"]
    assert [h["step"] for h in hist] == [0, 15, 30]
    first, last = hist[0]["valid"]["loss"], hist[-1]["valid"]["loss"]
    assert first == pytest.approx(5.55, abs=0.1)  # ≈ ln 256: an untrained byte model
    assert last < first - 0.5, (first, last)
    assert hist[1]["valid"]["loss"] < first
    assert ckpt["metrics"]["valid"]["loss"] == last and "bpc" in ckpt["metrics"]["valid"]
    assert ckpt["metrics"]["train_tokens"] == 30 * 8 * 32
    assert ckpt["metrics"]["steady_tokens_per_s"] > 0 and ckpt["metrics"]["world_size"] == 1
    assert ckpt["train_state"]["step"] == 30
    assert ckpt["config"]["d_model"] == 32 and ckpt["config"]["n_experts"] == 4
    model, tok, _ = load_model(out)
    text = tok.decode(model.generate(torch.tensor([tok.encode("ROMEO:")]), 8)[0].tolist())
    assert text.startswith("ROMEO:")


class Interrupted(Exception):
    pass


def test_resume_interrupted_run_matches_uninterrupted(tmp_path, shakespeare_slice, monkeypatch):
    quiet = dict(overrides=TINY_MODEL, train_overrides=dict(steps=20, eval_every=10, batch=8, seq=32),
                 log=lambda *a: None)
    full = tmp_path / "full.pt"
    train(str(shakespeare_slice), str(full), **quiet)

    # the same run, killed right after its step-10 checkpoint was written
    part = tmp_path / "part.pt"
    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(str(shakespeare_slice), str(part), **quiet)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    mid = read_checkpoint(part)
    assert mid["train_state"]["step"] == 10
    assert "test" not in mid["metrics"]

    logs = []
    metrics = train(str(shakespeare_slice), str(part), resume=True, **{**quiet, "log": logs.append})
    assert any("resuming" in line and "step 10/20" in line for line in logs), logs
    a, b = read_checkpoint(full), read_checkpoint(part)
    assert b["train_state"]["step"] == 20
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k  # bit-identical continuation
    assert a["metrics"]["history"] == b["metrics"]["history"] == metrics["history"]
    assert [h["step"] for h in metrics["history"]] == [0, 10, 20]


def test_resume_finished_run_is_a_no_op(tmp_path, shakespeare_slice):
    out = tmp_path / "m.pt"
    quiet = dict(overrides=TINY_MODEL, train_overrides=dict(steps=10, eval_every=5, batch=8, seq=32),
                 log=lambda *a: None)
    first = train(str(shakespeare_slice), str(out), **quiet)
    before = out.read_bytes()
    logs = []
    again = train(str(shakespeare_slice), str(out), resume=True, overrides=TINY_MODEL,
                  train_overrides=dict(steps=50), log=logs.append)
    assert again == read_checkpoint(out)["metrics"]
    assert again["history"] == first["history"] and len(again["history"]) == 3
    assert again["train_seconds"] == first["train_seconds"]
    assert out.read_bytes() == before  # not rewritten
    assert any("ignoring {'steps': 50}" in line for line in logs), logs  # a changed setting is not silently dropped
    assert any("already finished" in line for line in logs), logs


def test_bpe_tokenizer_run(tmp_path, shakespeare_slice):
    out = tmp_path / "bpe.pt"
    result = CliRunner().invoke(train_cli, ["--data", str(shakespeare_slice), "--out", str(out), "--steps", "20",
                                            "--eval-every", "10", "--tokenizer", "bpe", "--bpe-vocab", "300",
                                            *TINY_ARGS])
    assert result.exit_code == 0, result.output
    model, tok, ckpt = load_model(out)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 300 == ckpt["config"]["vocab_size"] == model.tok_emb.weight.shape[0]
    assert ckpt["tokenizer"]["kind"] == "bpe" and ckpt["metrics"]["tokenizer"] == "bpe"
    # the restored tokenizer is the trained one: same encoding as a fresh training on the same split
    sample = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    corpus_train = shakespeare_slice.read_text(encoding="utf-8")
    fresh = BPETokenizer.train(corpus_train[: int(len(corpus_train) * 0.9)], 300)
    ids = tok.encode(sample)
    assert ids == fresh.encode(sample)
    assert len(ids) < len(sample.encode())  # merges were learned
    assert max(ids) < 300
    assert tok.decode(ids) == sample
    hist = ckpt["metrics"]["history"]
    assert hist[-1]["valid"]["loss"] < hist[0]["valid"]["loss"]


def test_keep_best_writes_the_weights_of_the_lowest_valid_loss(tmp_path, shakespeare_slice):
    out = tmp_path / "m.pt"
    # a learning rate that diverges by step 30 (valid loss 11.0, 9.6, 22.9): the best weights are step 20's
    args = ["--data", str(shakespeare_slice), "--steps", "30", "--eval-every", "10", "--lr", "3", *TINY_ARGS]
    result = CliRunner().invoke(train_cli, [*args, "--out", str(out), "--keep-best", "--eval-tokens", "0"])
    assert result.exit_code == 0, result.output
    hist = read_checkpoint(out)["metrics"]["history"]
    losses = {h["step"]: h["valid"]["loss"] for h in hist[1:]}  # 10, 20, 30: each on the whole split
    best = read_checkpoint(train_mod.best_path(out))
    assert out.with_name("m.best.pt") == train_mod.best_path(out)
    assert best["metrics"]["best"]["step"] == min(losses, key=losses.get) < 30
    assert best["metrics"]["best"]["valid"]["loss"] == min(losses.values())
    assert "train_state" not in best
    # an independent account of those weights: the same (deterministic) run stopped at that step
    step = best["metrics"]["best"]["step"]
    again = tmp_path / "again.pt"
    if step < 30:
        stop = CliRunner().invoke(train_cli, [*args, "--out", str(again), "--stop-at", str(step)])
        assert stop.exit_code == 0, stop.output
    reference = read_checkpoint(again if step < 30 else out)["state_dict"]
    assert best["state_dict"].keys() == reference.keys()
    for k in reference:
        assert torch.equal(best["state_dict"][k], reference[k]), k
    assert "best valid loss" in result.output
