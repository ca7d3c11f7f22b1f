"""The trainer's speed options: --cuda-graphs (the step as one CUDA graph) and --compile (torch.compile).

On CPU: the options are refused off CUDA in one line; the pieces of the graphed step that do not need a GPU —
undoing the warm-up (`unchanged_by`) and the optimizer state written to checkpoints — against the eager step.
On CUDA (skipped elsewhere, saying so): the graphed step against the eager step (losses, weight updates, the
router-noise RNG state), and checkpoints of either mode resumed in the other.
"""

from __future__ import annotations

import io

import pytest
import torch
from click.testing import CliRunner

import bmoe_runtime.train.trainer as trainer
from bmoe_runtime.cli import train_cli
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.nn.moe import waits_on_host
from bmoe_runtime.train.checkpoint import read_checkpoint
from bmoe_runtime.train.step import GraphedStep, eager_step, portable_optimizer_state, unchanged_by
from bmoe_runtime.train.trainer import TrainConfig, make_optimizer, step_options, train

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, n_experts=8, top_k=2, max_seq=32)
ROWS, SEQ = 8, 32
LRS = [1e-4, 1e-3, 3e-3, 2e-3, 5e-3, 1e-2]  # a step that ignored its lr would not follow the eager step
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: CUDA-graph and torch.compile training steps run only on CUDA")


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BMOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch s draws its tokens from [32s, 32s + 32): each step's loss depends on its own batch (a step that
    saw a stale batch would report a loss on tokens it had just trained on)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(32 * s, 32 * s + 32, (ROWS, SEQ + 1), generator=g) % CFG.vocab_size for s in range(n)]
    return [(i[:, :-1], i[:, 1:]) for i in ids]


def model_and_opt(device: str, cfg: ModelConfig = CFG) -> tuple[MoELM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MoELM(cfg).to(device).train()
    return model, make_optimizer(model, TrainConfig())


def snapshot(model: MoELM, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [v for s in opt.state.values() for v in s.values()]
    return [t.detach().clone() for t in [*model.parameters(), *state]]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- CPU ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--cuda-graphs", "--compile"])
def test_speed_options_need_cuda(flag, corpus, tmp_path):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(train_cli, ["--data", str(corpus), "--out", str(out), "--device", "cpu", flag])
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: {flag} needs --device cuda (it is measured and tested on CUDA only)"
    assert not out.exists()


def test_no_flags_run_the_eager_step_on_cpu(corpus, tmp_path):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(train_cli, ["--data", str(corpus), "--out", str(out), "--device", "cpu", "--steps", "2",
                                       "--batch", "2", "--seq", "16", "--d-model", "16", "--d-ff", "32", "--layers", "1",
                                       "--no-cuda-graphs", "--no-compile"])
    assert r.exit_code == 0, r.output
    m = read_checkpoint(out)["metrics"]
    assert (m["cuda_graphs"], m["compiled"]) == (False, False)


def test_step_options(monkeypatch):
    notes = []
    assert step_options(None, None, "cpu", 1, notes.append) == (False, False)
    assert step_options(False, False, "cpu", 1, notes.append) == (False, False)
    assert step_options(True, None, "cuda", 1, notes.append) == (True, False)
    assert step_options(None, True, "cuda", 1, notes.append) == (trainer.CUDA_GRAPHS_BY_DEFAULT, True)
    assert step_options(False, True, "cuda", 1, notes.append) == (False, True)
    assert step_options(True, True, "cuda", 2, notes.append) == (False, True)  # DDP: eager, said once
    assert notes == ["--cuda-graphs: a CUDA graph step runs on one rank only; on 2 ranks the step runs eagerly"]
    monkeypatch.setattr(trainer, "CUDA_GRAPHS_BY_DEFAULT", True)
    monkeypatch.setattr(trainer, "COMPILE_BY_DEFAULT", True)
    assert step_options(None, None, "cuda", 1, notes.append) == (True, True)
    assert step_options(None, None, "cpu", 1, notes.append) == (False, False)  # a default is never an error
    assert step_options(None, None, "cuda", 2, notes.append) == (False, True)
    assert step_options(False, False, "cuda", 1, notes.append) == (False, False)
    assert len(notes) == 1  # nothing said where the graph was not asked for


def test_unchanged_by_undoes_warmup_steps():
    """Steps run inside `unchanged_by` (the graphed step's warm-up) leave no trace: the steps after it are the
    ones a fresh model and optimizer take, bit for bit, router noise included; with optimizer state present,
    that state is put back rather than reset."""
    a, opt_a = model_and_opt("cpu")
    b, opt_b = model_and_opt("cpu")
    step_a, step_b = eager_step(a.loss, a, opt_a, 1.0), eager_step(b.loss, b, opt_b, 1.0)
    data = batches(5)
    torch.manual_seed(7)
    want = [step_a(x, y, lr)[1].item() for (x, y), lr in zip(data[:2], LRS)]
    torch.manual_seed(7)
    before = snapshot(b, opt_b)
    with unchanged_by(b, opt_b):
        for (x, y), lr in zip(data[2:], LRS):
            step_b(x, y, lr)
    assert_same([t for t in snapshot(b, opt_b)[:len(before)]], before)
    assert all(torch.count_nonzero(v) == 0 for s in opt_b.state.values() for v in s.values())  # fresh: zeros
    assert [step_b(x, y, lr)[1].item() for (x, y), lr in zip(data[:2], LRS)] == want
    assert_same(snapshot(b, opt_b), snapshot(a, opt_a))
    before, rng = snapshot(b, opt_b), torch.get_rng_state()
    with unchanged_by(b, opt_b):  # now with state: put back, not zeroed
        step_b(*data[4], 1e-2)
    assert_same(snapshot(b, opt_b), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_checkpointed_optimizer_state_is_the_eager_form():
    """A graphed run's optimizer (lr a tensor, capturable on) is written as the eager step's: lr a float, no
    tensor outside the state, capturable off; an eager optimizer loading it takes the same next step."""
    model, opt = model_and_opt("cpu")
    lr = torch.tensor(3e-3)
    for g in opt.param_groups:
        g["lr"] = lr
    step = eager_step(model.loss, model, opt, 1.0)
    data = batches(3)
    torch.manual_seed(3)
    step(*data[0], 3e-3)
    for g in opt.param_groups:  # as GraphedStep leaves them (a CPU optimizer cannot step with capturable on)
        g["lr"], g["capturable"] = lr, True
    state = portable_optimizer_state(opt)
    assert all(g["lr"] == lr.item() and type(g["lr"]) is float and g["capturable"] is False
               for g in state["param_groups"])
    assert all(g["lr"] is lr and g["capturable"] for g in opt.param_groups)  # the optimizer itself untouched
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    clone, opt2 = model_and_opt("cpu")
    clone.load_state_dict(model.state_dict())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for g in opt.param_groups:
        g["capturable"] = False
    rng = torch.get_rng_state()
    step(*data[1], lr.item())
    torch.set_rng_state(rng)
    eager_step(clone.loss, clone, opt2, 1.0)(*data[1], lr.item())
    assert_same(snapshot(clone, opt2), snapshot(model, opt))


# ---- CUDA -----------------------------------------------------------------------------------------------


def run_eager(cfg: ModelConfig, data, compiled: bool = False):
    model, opt = model_and_opt("cuda", cfg)
    start = [p.detach().clone() for p in model.parameters()]
    step = eager_step(torch.compile(model.loss) if compiled else model.loss, model, opt, 1.0)
    torch.cuda.manual_seed(11)
    ce = [step(x, y, lr)[1].item() for (x, y), lr in zip(data, LRS)]
    return model, start, ce, torch.cuda.get_rng_state()


def run_graphed(cfg: ModelConfig, data, compiled: bool = False):
    model, opt = model_and_opt("cuda", cfg)
    torch.cuda.manual_seed(11)
    before, rng = snapshot(model, opt), torch.cuda.get_rng_state()
    step = GraphedStep(torch.compile(model.loss) if compiled else model.loss, model, opt, 1.0, ROWS, SEQ)
    assert_same(snapshot(model, opt)[:len(before)], before)  # warm-up undone
    assert all(torch.count_nonzero(v) == 0 for s in opt.state.values() for v in s.values())
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    ce = [step(x, y, lr)[1].item() for (x, y), lr in zip(data, LRS)]
    return model, ce, torch.cuda.get_rng_state()


def relative_update_gap(a: MoELM, b: MoELM, start: list[torch.Tensor]) -> float:
    """‖Δa − Δb‖ / ‖Δa‖ over all weights: Δ = what the steps changed."""
    da = torch.cat([(p.detach() - s).flatten().double() for p, s in zip(a.parameters(), start)])
    db = torch.cat([(p.detach() - s).flatten().double() for p, s in zip(b.parameters(), start)])
    return ((da - db).norm() / da.norm()).item()


@needs_cuda
def test_graphed_step_follows_the_eager_step():
    """Same model, batches, lr schedule and RNG state: the graph's losses and weight updates are the eager step's
    up to float summation order (atomics in the butterfly backward), and it draws exactly the router noise the
    eager step draws (the CUDA generator ends in the same state: resume saves and restores it unchanged)."""
    data = [(x.cuda(), y.cuda()) for x, y in batches(len(LRS))]
    eager, start, ce_e, rng_e = run_eager(CFG, data)
    graphed, ce_g, rng_g = run_graphed(CFG, data)
    assert torch.equal(rng_e, rng_g)
    assert max(abs(a - b) for a, b in zip(ce_e, ce_g)) < 2e-3, (ce_e, ce_g)
    assert relative_update_gap(eager, graphed, start) < 3e-2
    # the comparison can fail: one step less (or an lr ignored) moves the weights far apart
    short, start2, _, _ = run_eager(CFG, data[:-1])
    assert relative_update_gap(eager, short, start) > 0.15


@needs_cuda
def test_checkpoints_resume_across_step_modes(corpus, tmp_path):
    """A graphed run stopped at step 8 resumes eagerly, an eager one resumes graphed: each follows the
    uninterrupted graphed run at every logged step within GPU nondeterminism (bf16, atomics)."""
    run = dict(overrides=dict(d_model=64, d_ff=128, n_layers=1, n_experts=8),
               train_overrides=dict(steps=16, eval_every=8, log_every=1, batch=8, seq=32, eval_tokens=2048),
               device="cuda", log=lambda *a: None)
    full = train(str(corpus), str(tmp_path / "full.pt"), cuda_graphs=True, **run)
    assert full["cuda_graphs"] is True
    for first, then in ((True, False), (False, True)):
        out = str(tmp_path / f"part-{first}.pt")
        assert train(str(corpus), out, cuda_graphs=first, stop_at=8, **run)["stopped_at"] == 8
        resumed = train(str(corpus), out, cuda_graphs=then, resume=True, **run)
        assert resumed["cuda_graphs"] is then
        a, b = dict(map(tuple, full["train_curve"])), dict(map(tuple, resumed["train_curve"]))
        assert sorted(b) == list(range(1, 17))
        assert max(abs(a[s] - b[s]) for s in b) < 5e-3
        assert read_checkpoint(out)["train_state"]["optimizer"]["param_groups"][0]["capturable"] is False


@needs_cuda
def test_compiled_graphed_step_follows_the_eager_step():
    """torch.compile inside the graph. No router noise: compiled code draws its random numbers differently."""
    cfg = ModelConfig(**{**CFG.to_dict(), "router_noise": 0.0})
    data = [(x.cuda(), y.cuda()) for x, y in batches(len(LRS))]
    _, _, ce_e, _ = run_eager(cfg, data)
    _, ce_c, _ = run_graphed(cfg, data, compiled=True)
    assert max(abs(a - b) for a, b in zip(ce_e, ce_c)) < 3e-2, (ce_e, ce_c)


@pytest.mark.parametrize("variant, d_ff, waits", [("dense", 106, True), ("ternary", 211, True), ("dense", 64, False),
                                                  ("butterfly", 106, False), ("static", 106, False)])
def test_waits_on_host(variant, d_ff, waits):
    """The default CUDA graph steps aside exactly where the step syncs with the host: independent experts (dense,
    ternary) whose d_ff (or d_model) grouped_mm cannot take; butterfly experts never loop per expert."""
    model = MoELM(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=d_ff, n_experts=4, top_k=2,
                              max_seq=16, variant=variant))
    assert waits_on_host(model) is waits
