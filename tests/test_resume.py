"""Exact resume on CPU: a run interrupted and resumed has the uninterrupted run's loss at every logged step,
bit for bit — the weights, optimizer, data-stream position (the step) and router-noise RNG state are restored."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import bmoe_runtime.train.trainer as train_mod
from bmoe_runtime.cli import train_cli
from bmoe_runtime.errors import CheckpointError
from bmoe_runtime.train.checkpoint import content_sha256, read_checkpoint, save_checkpoint
from bmoe_runtime.train.trainer import train

TINY = dict(d_model=32, d_ff=64, n_layers=1, n_experts=4)  # router noise 0.1: the RNG state matters
RUN = dict(steps=16, eval_every=4, log_every=1, batch=8, seq=32, eval_tokens=2048)


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BMOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))


def quiet(**kw) -> dict:
    return dict(overrides=TINY, train_overrides=RUN, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The uninterrupted run, and the same run killed right after its step-8 checkpoint was written."""
    tmp = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("BMOE_CACHE_DIR", str(tmp / "cache"))
    full, part = tmp / "full.pt", tmp / "part.pt"
    train(str(corpus), str(full), **quiet())
    saves = []

    def save_then_die(path, *args, train_state, **kw):
        save_checkpoint(path, *args, train_state=train_state, **kw)
        saves.append(train_state["step"])
        if train_state["step"] == 8:
            raise Interrupted

    mp.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(str(corpus), str(part), **quiet())
    mp.undo()
    assert saves == [4, 8]
    return {"full": full, "part": part, "mid": read_checkpoint(part)}


def test_resumed_run_reproduces_every_logged_loss_bit_exactly(runs, corpus):
    mid = runs["mid"]["train_state"]
    assert mid["step"] == 8 and mid["data_stream"]["next_step"] == 8
    assert [s for s, _ in mid["train_curve"]] == list(range(1, 9))
    logs = []
    train(str(corpus), str(runs["part"]), resume=True, **{**quiet(), "log": logs.append})
    assert any("resuming" in line and "step 8/16" in line for line in logs), logs
    a, b = read_checkpoint(runs["full"]), read_checkpoint(runs["part"])
    assert [s for s, _ in a["metrics"]["train_curve"]] == list(range(1, 17))
    assert a["metrics"]["train_curve"] == b["metrics"]["train_curve"]  # every step's loss, float for float
    assert a["metrics"]["history"] == b["metrics"]["history"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for ra, rb in zip(a["train_state"]["rng"]["cpu"], b["train_state"]["rng"]["cpu"]):
        assert torch.equal(ra, rb)


def test_router_noise_state_is_what_makes_it_exact(runs, corpus, tmp_path):
    """Resuming with another RNG state (all else equal) changes the losses after the resume point: the test
    above would catch a trainer that did not save or restore the router-noise state."""
    ckpt = runs["mid"]
    torch.manual_seed(12345)
    state = dict(ckpt["train_state"], rng={"world": 1, "cpu": [torch.get_rng_state()], "cuda": [None]})
    other = tmp_path / "other.pt"
    changed = {**ckpt, "train_state": state}
    torch.save({**changed, "checksum": {"sha256": content_sha256(changed)}}, other)
    train(str(corpus), str(other), resume=True, **quiet())
    full = dict(map(tuple, read_checkpoint(runs["full"])["metrics"]["train_curve"]))
    changed = dict(map(tuple, read_checkpoint(other)["metrics"]["train_curve"]))
    assert all(full[s] == changed[s] for s in range(1, 9))  # the restored part of the curve
    assert any(full[s] != changed[s] for s in range(9, 17))


def test_cli_stop_at_and_resume(runs, corpus, tmp_path):
    """The same run through bmoe-train: --stop-at 10 (not an evaluation step) then --resume, bit-exact again."""
    out = tmp_path / "cli.pt"
    args = ["--data", str(corpus), "--out", str(out), "--d-model", "32", "--d-ff", "64", "--layers", "1",
            "--experts", "4", "--steps", "16", "--eval-every", "4", "--log-every", "1", "--batch", "8", "--seq", "32"]
    result = CliRunner().invoke(train_cli, [*args, "--stop-at", "10"])
    assert result.exit_code == 0, result.output
    assert f"stopped after step 10 as asked; --resume continues {out}" in result.output
    mid = read_checkpoint(out)
    assert mid["train_state"]["step"] == 10 and "test" not in mid["metrics"]
    result = CliRunner().invoke(train_cli, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "step 10/16" in result.output
    a, b = read_checkpoint(runs["full"]), read_checkpoint(out)
    assert a["metrics"]["train_curve"] == b["metrics"]["train_curve"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_resume_on_another_corpus_says_so(runs, corpus, tmp_path):
    """The train state names its corpus: resuming on other data is allowed (fine-tuning) but never silent."""
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text(encoding="utf-8").replace("Citizen", "Burgher"), encoding="utf-8")
    part = tmp_path / "part.pt"
    torch.save(runs["mid"], part)
    logs = []
    train(str(other), str(part), resume=True, **{**quiet(), "log": logs.append})
    assert any("--data is not the corpus" in line for line in logs), logs
    logs.clear()
    torch.save(runs["mid"], part)
    train(str(corpus), str(part), resume=True, **{**quiet(), "log": logs.append})
    assert not any("--data is not the corpus" in line for line in logs), logs


def test_unusable_rng_state_is_one_error(runs, corpus, tmp_path):
    ckpt = runs["mid"]
    bad = {**ckpt, "train_state": dict(ckpt["train_state"], rng={"world": 1, "cpu": [torch.zeros(3, dtype=torch.uint8)],
                                                                  "cuda": [None]})}
    path = tmp_path / "bad.pt"
    torch.save({**bad, "checksum": {"sha256": content_sha256(bad)}}, path)
    with pytest.raises(CheckpointError, match="unusable RNG state"):
        train(str(corpus), str(path), resume=True, **quiet())


def test_sigterm_stops_at_a_step_boundary_with_a_resumable_checkpoint(runs, corpus, tmp_path, monkeypatch):
    """A real SIGTERM (a job slot ending, `timeout`) mid-run: the step in flight finishes, a checkpoint is written
    there (step 7: not an evaluation step), and --resume then reproduces the uninterrupted run bit for bit."""
    import os
    import signal

    out, lr_at, logs = tmp_path / "signalled.pt", train_mod.lr_at, []

    def lr_then_signal(step, tc):
        if step == 6:  # while step 7 is being computed
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, tc)

    monkeypatch.setattr(train_mod, "lr_at", lr_then_signal)
    result = train(str(corpus), str(out), **{**quiet(), "log": logs.append})
    monkeypatch.setattr(train_mod, "lr_at", lr_at)
    assert result["stopped_at"] == 7 and any("on a signal" in line for line in logs), logs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    assert read_checkpoint(out)["train_state"]["step"] == 7
    train(str(corpus), str(out), resume=True, **quiet())
    a, b = read_checkpoint(runs["full"]), read_checkpoint(out)
    assert a["metrics"]["train_curve"] == b["metrics"]["train_curve"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
