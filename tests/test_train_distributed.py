"""Data-parallel training on CPU (gloo, 2 processes): 2 ranks × batch B/2 against 1 rank × batch B.

What makes them equal: the global batch of step s is drawn from (seed, s) alone and rank r trains rows
[r·B/2, (r+1)·B/2) of it, DDP averages the two ranks' gradients (= the gradient of the mean loss over the
whole batch, since both halves have the same number of tokens), and every rank starts from the same weights.
What differs: (1) the router noise — each rank draws its own N(0, 0.1²) for its rows, so the noise a row gets
is not the one it gets in the 1-rank run; (2) the load-balance loss — each rank's is computed from its own
half of the batch and the gradients are averaged, and the mean of two squared deviations is not the squared
deviation of the mean; (3) float summation order. With router noise and balance loss off only (3) is left:
the curves agree to 1e-5 nats at every step (measured 1e-6). With both on (a 1-rank run resumed on 2 ranks
through torchrun for its last 6 steps), to 2e-3 nats (measured 2.2e-4; from scratch, 1.9e-4 over 12 steps, in
docs/training.md; the tiny model's loss moves by 0.2 nats in those steps).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import bmoe_runtime.train.trainer as train_mod
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.train.checkpoint import read_checkpoint
from bmoe_runtime.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, d_ff=64, n_layers=1, n_experts=4)
EXACT = dict(TINY, router_noise=0.0, balance_weight=0.0)  # only float summation order differs across ranks
RUN = dict(steps=12, eval_every=6, log_every=1, batch=8, seq=32, eval_tokens=2048)
TIGHT, LOOSE = 1e-5, 2e-3  # nats, at every logged step (measured: 1e-6 and 2e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, kwargs: dict, cache: str) -> None:
    """One torchrun-like rank: the environment torchrun would set, then the real trainer. Every checkpoint
    rank 0 writes is also copied to <out>.step<N>, to resume from a mid-run state later."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), BMOE_CACHE_DIR=cache)
    torch.set_num_threads(1)
    real_save = train_mod.save_checkpoint

    def save_and_keep(path, *args, train_state, **kw):
        real_save(path, *args, train_state=train_state, **kw)
        shutil.copy(path, f"{path}.step{train_state['step']}")

    train_mod.save_checkpoint = save_and_keep
    train(**kwargs, log=lambda *a: None)


def curve(path: Path) -> dict[int, float]:
    return dict((s, v) for s, v in read_checkpoint(path)["metrics"]["train_curve"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("token-cache"))
    os.environ["BMOE_CACHE_DIR"] = path  # this process's runs; the ranks get it explicitly
    yield path
    os.environ.pop("BMOE_CACHE_DIR", None)


@pytest.fixture(scope="module")
def exact_runs(corpus, cache, tmp_path_factory) -> dict[str, Path]:
    """The no-noise, no-balance-loss model trained on 1 rank (here) and on 2 ranks (spawned)."""
    tmp = tmp_path_factory.mktemp("exact")
    one, two = tmp / "one.pt", tmp / "two.pt"
    kwargs = dict(data=str(corpus), overrides=EXACT, train_overrides=RUN)
    train(out=str(one), log=lambda *a: None, **kwargs)
    mp.spawn(rank_main, args=(2, free_port(), dict(out=str(two), **kwargs), cache), nprocs=2)
    return {"one": one, "two": two}


def test_two_ranks_follow_one_rank_exactly_without_noise(exact_runs):
    one, two = curve(exact_runs["one"]), curve(exact_runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, 13))
    diffs = [abs(one[s] - two[s]) for s in one]
    assert max(diffs) < TIGHT, diffs
    assert one[12] < one[1] - 0.05  # it trained: the comparison is not between two flat lines
    a, b = read_checkpoint(exact_runs["one"]), read_checkpoint(exact_runs["two"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-4, rtol=1e-3, msg=k)
    assert b["metrics"]["world_size"] == 2 and b["train_state"]["rng"]["world"] == 2
    assert len(b["train_state"]["rng"]["cpu"]) == 2  # each rank's own generator state
    assert not torch.equal(*b["train_state"]["rng"]["cpu"])
    assert b["metrics"]["train_tokens"] == a["metrics"]["train_tokens"] == 12 * 8 * 32


def test_resume_on_another_rank_count(exact_runs, corpus, tmp_path):
    """A 2-rank run's step-6 checkpoint, resumed on 1 rank, continues the 1-rank run (same data position)."""
    part = tmp_path / "part.pt"
    shutil.copy(f"{exact_runs['two']}.step6", part)
    logs = []
    train(str(corpus), str(part), resume=True, overrides=EXACT, train_overrides=RUN, log=logs.append)
    assert any("saved on 2 ranks, resumed on 1" in line for line in logs), logs
    one, resumed = curve(exact_runs["one"]), curve(part)
    assert sorted(resumed) == list(range(1, 13))
    assert max(abs(one[s] - resumed[s]) for s in one) < TIGHT


def test_torchrun_cli_resumes_a_one_rank_run_on_two(corpus, cache, tmp_path):
    """The real entry point (torchrun → bmoe_runtime.cli train), router noise and balance loss on: a 1-rank run
    stopped after step 6 and resumed on 2 ranks follows the uninterrupted 1-rank run."""
    args = ["--data", str(corpus), "--steps", "12", "--eval-every", "6", "--log-every", "1", "--batch", "8",
            "--seq", "32", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--experts", "4"]
    one, part = tmp_path / "one.pt", tmp_path / "part.pt"
    train(str(corpus), str(one), overrides=TINY, train_overrides=RUN, log=lambda *a: None)
    train(str(corpus), str(part), overrides=TINY, train_overrides=RUN, log=lambda *a: None, stop_at=6)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "BMOE_CACHE_DIR": cache}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "bmoe_runtime.cli", "train", "--out", str(part), *args, "--resume"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: valid loss") == 1, r.stdout  # rank 0 alone logs
    assert r.stdout.count(f"resuming {part} at step 6/12 on 2 ranks") == 1, r.stdout
    assert "saved on 1 ranks, resumed on 2: router noise re-seeded" in r.stdout
    assert "2 ranks × batch 4" in r.stdout and "token shards reused" in r.stdout
    a, b = curve(one), curve(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in range(1, 7))  # the 1-rank part, as saved
    diffs = [abs(a[s] - b[s]) for s in range(7, 13)]
    assert max(diffs) < LOOSE, diffs
    assert read_checkpoint(part)["train_state"]["rng"]["world"] == 2


def test_global_batch_must_split_across_ranks(corpus, tmp_path, monkeypatch):
    """Refused before any process group is joined or anything is written (the environment torchrun sets)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(BmoeError, match="the global batch 7 does not split evenly across 2 ranks"):
        train(str(corpus), str(tmp_path / "odd.pt"), overrides=TINY, train_overrides={**RUN, "batch": 7})
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(BmoeError, match="RANK 2 is outside WORLD_SIZE 2"):
        train(str(corpus), str(tmp_path / "odd.pt"), overrides=TINY, train_overrides=RUN)
    assert list(tmp_path.iterdir()) == []
