"""Training: presets, AdamW with warmup + cosine, periodic evaluation, exactly resumable checkpoints,
data-parallel over the ranks torchrun starts, token shards memory-mapped from a cache."""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bmoe_runtime.choices import PRESET_NAMES
from bmoe_runtime.errors import BmoeError, one_line
from bmoe_runtime.format.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_dict
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.nn.moe import waits_on_host
from bmoe_runtime.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from bmoe_runtime.train.data import CorpusSource, require_windows, scan_corpus, step_starts
from bmoe_runtime.train.distributed import (Ranks, any_rank, barrier, gather, mean, ranks_from_env, share, start,
                                            stop)
from bmoe_runtime.train.shards import TokenSplit, open_shards, prepare_tokens, trained_bpe
from bmoe_runtime.train.step import GraphedStep, eager_step, portable_optimizer_state


@dataclass
class TrainConfig:
    steps: int = 600
    batch: int = 16
    seq: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_tokens: int = 32768  # per evaluation (None-like 0 = the whole split)
    seed: int = 0
    log_every: int = 10  # steps between entries of the train-loss curve (the mean over ranks)
    keep_best: bool = False  # also write best_path(out): the weights at the lowest valid loss evaluated so far

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq", "eval_every", "log_every"):  # 0 would divide by zero or train on nothing
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


PRESETS: dict[str, tuple[dict, dict]] = {
    # minutes on a 2-core CPU
    "tiny": (dict(d_model=128, n_layers=2, n_heads=4, d_ff=256, n_experts=8, top_k=2, max_seq=256),
             dict(steps=400, batch=16, seq=64, lr=3e-3, warmup=40, eval_every=100, eval_tokens=16384)),
    # the paper's setting
    "paper": (dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048, n_experts=8, top_k=2, max_seq=128),
              dict(steps=6000, batch=32, seq=128, lr=1e-3, warmup=300, eval_every=1000, eval_tokens=0)),
}


assert tuple(PRESETS) == PRESET_NAMES

# What a CUDA run does when neither --[no-]cuda-graphs nor --[no-]compile is given, as decided by the GPU check
# (benchmarks/gpu_check_training.sh; docs/training.md, "Speed options"): graphs won at every shape (1.09-3.2x),
# compile was not measured warm and stays off.
CUDA_GRAPHS_BY_DEFAULT = True
COMPILE_BY_DEFAULT = False


def step_options(cuda_graphs: bool | None, compiled: bool | None, device: str, world: int, log) -> tuple[bool, bool]:
    """(CUDA graph?, torch.compile?) for this run. None: the default (on CUDA only). Asked for on another device:
    an error. A CUDA graph runs on one rank: under DDP the step runs eagerly (said when it was asked for)."""
    on_cuda = device.startswith("cuda")
    for flag, asked in (("--cuda-graphs", cuda_graphs), ("--compile", compiled)):
        if asked and not on_cuda:
            raise BmoeError(f"{flag} needs --device cuda (it is measured and tested on CUDA only)")
    graphed = on_cuda and (CUDA_GRAPHS_BY_DEFAULT if cuda_graphs is None else cuda_graphs)
    compiled = on_cuda and (COMPILE_BY_DEFAULT if compiled is None else compiled)
    if graphed and world > 1:
        if cuda_graphs:
            log(f"--cuda-graphs: a CUDA graph step runs on one rank only; on {world} ranks the step runs eagerly")
        graphed = False
    return graphed, compiled


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: MoELM, tc: TrainConfig) -> torch.optim.AdamW:
    """Decay matrices only; rotation angles, norms and biases are not decayed
    (decay would pull every rotation towards the identity)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("angles") else keep).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in decay + keep)  # fused: one kernel for all parameters (CPU keeps the loop)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), fused=on_cuda or None)


@torch.no_grad()
def evaluate(model: MoELM, split: TokenSplit, seq: int, max_tokens: int | None, device: str) -> float:
    """Mean cross-entropy (nats/token) over contiguous windows, read from the memmap 32 rows at a time."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in split.eval_batches(seq, max_tokens or None):
        logits, _ = model(x.to(device))
        y = y.to(device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return total / max(n, 1)


def text_metrics(nll: float, split: TokenSplit) -> dict:
    """Token loss → perplexity, bits per character and word-level perplexity of the split."""
    total = nll * (len(split) - 1)
    return {"loss": nll, "ppl": math.exp(nll), "bpc": total / (split.chars * math.log(2)),
            "word_ppl": math.exp(total / max(1, split.words))}


def build_tokenizer(kind: str, source: CorpusSource, vocab: int, cache_dir: str | None = None) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":  # trained on the train split streamed piece by piece: same merges as on the whole text
        return trained_bpe(source, vocab, cache_dir)
    raise ValueError(f"unknown tokenizer {kind!r}; expected byte or bpe")


class LossOf(nn.Module):
    """model.loss as a module's forward, so that DistributedDataParallel wraps (and syncs) the whole step."""

    def __init__(self, model: MoELM):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.loss(x, y)


SAMPLER = "step-windows-v1"  # data_stream: the global batch of step s is step_starts(seed, s, ...)


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """The router-noise seed of one rank (and of a resumed run whose rank count changed)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def rng_state(device: str) -> dict:
    """This process's CPU and (on CUDA) CUDA generator states: the router noise."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


@contextmanager
def stop_requests():
    """SIGTERM or SIGINT (a job slot ending, `timeout`, Ctrl-C) asks the loop to stop at the next step boundary
    and write a resumable checkpoint instead of dying mid-step and losing the work since the last one."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield asked
        return
    before = {sig: signal.signal(sig, lambda *_: asked.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def best_path(out: str | Path) -> Path:
    """Where --keep-best writes the best weights seen: model.pt → model.best.pt."""
    out = Path(out)
    return out.with_name(f"{out.stem}.best{out.suffix}")


def train(data: str, out: str, preset: str = "tiny", overrides: dict | None = None, train_overrides: dict | None = None,
          tokenizer: str = "byte", bpe_vocab: int = 4096, device: str = "cpu", resume: bool = False,
          log=print, cache_dir: str | None = None, stop_at: int | None = None, cuda_graphs: bool | None = None,
          compiled: bool | None = None) -> dict:
    """Train (or resume) a model and write `out`; returns the final metrics (on rank 0; {} on other ranks).

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every rank trains its share of each global batch with
    DistributedDataParallel; rank 0 alone tokenizes, evaluates, logs and writes checkpoints. `stop_at`: stop
    after that step's checkpoint, as if interrupted there (a job slot ends; a resume test). `cuda_graphs`,
    `compiled`: run the step as a CUDA graph (one rank) / through torch.compile; None = the default (a graph on
    CUDA where the step can be captured, no compile). Neither is saved: a run may resume with either changed.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    ranks = ranks_from_env()
    say = log if ranks.main else (lambda *a: None)
    graphed, compiled = step_options(cuda_graphs, compiled, device, ranks.world, say)
    m_over, t_over = PRESETS[preset]
    tc = replace(TrainConfig(), **{**t_over, **(train_overrides or {})})

    ckpt = state = None
    if resume and Path(out).exists():
        ckpt = read_checkpoint(out)
        if "train_state" not in ckpt:
            raise CheckpointError(f"{out} holds no training state to resume from")
        state = ckpt["train_state"]
        saved = TrainConfig(**state["train_config"])
        ignored = {k: v for k, v in (train_overrides or {}).items() if getattr(saved, k, v) != v}
        if ignored:
            say(f"--resume continues {out} with its saved settings; ignoring {ignored}")
        tc = saved
        if state["step"] >= tc.steps and "test" in ckpt.get("metrics", {}):
            say(f"{out} already finished its {tc.steps} steps; nothing to resume")
            return ckpt["metrics"]  # unchanged: no re-evaluation, no duplicate history entry
    if tc.batch % ranks.world:
        raise BmoeError(f"the global batch {tc.batch} does not split evenly across {ranks.world} ranks")
    device = start(ranks, device)
    try:
        with stop_requests() as asked:
            return _train(data, out, preset, m_over, overrides, tc, ckpt, tokenizer, bpe_vocab, device, ranks, say,
                          cache_dir, stop_at, asked, graphed, compiled, graphed and cuda_graphs is None)
    finally:
        stop(ranks)


def _train(data, out, preset, m_over, overrides, tc: TrainConfig, ckpt: dict | None, tokenizer: str, bpe_vocab: int,
           device: str, ranks: Ranks, log, cache_dir, stop_at: int | None, asked: threading.Event, graphed: bool,
           compiled: bool, graphed_by_default: bool) -> dict:
    state = ckpt["train_state"] if ckpt else None
    if ranks.main:  # tokenize once (or find the cached shards); the other ranks map the same files
        source = scan_corpus(data)
        tok = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt else \
            build_tokenizer(tokenizer, source, bpe_vocab, cache_dir)
        shards = prepare_tokens(source, tok, cache_dir)
        log(f"{source.name}: {'tokenized into' if shards.built else 'token shards reused from'} {shards.path}")
        shared = {"entry": str(shards.path), "tokenizer": tok.to_dict()}
    shared = share(shared if ranks.main else None, ranks)
    if not ranks.main:
        tok, shards = tokenizer_from_dict(shared["tokenizer"]), open_shards(Path(shared["entry"]), verify=False)
    if ckpt:
        cfg = ModelConfig.from_dict(ckpt["config"])
    else:
        cfg = ModelConfig(**{**m_over, **(overrides or {}), "vocab_size": tok.vocab_size})
    if tc.seq > cfg.max_seq:
        cfg = replace(cfg, max_seq=tc.seq)
    splits = shards.splits
    require_windows(len(splits["train"]), tc.seq)  # before any progress bar is drawn

    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = MoELM(cfg).to(device)
    opt = make_optimizer(model, tc)
    torch.manual_seed(noise_seed(tc.seed, ranks.rank))  # router noise: each rank its own stream
    step, history, curve = 0, [], []
    if state is not None:
        model.load_state_dict({k: v.to(device) for k, v in ckpt["state_dict"].items()})
        opt.load_state_dict(state["optimizer"])
        step, history, curve = state["step"], list(state["history"]), list(state.get("train_curve", []))
        _restore_rng(state, tc, step, device, ranks, log)
        corpus_sha = state.get("data_stream", {}).get("corpus_sha256")
        if corpus_sha and corpus_sha != shards.meta["corpus"]["sha256"]:
            log(f"--data is not the corpus {out} was trained on (its files or split differ): the run continues on "
                "this one")
        if state.get("data_stream", {}).get("sampler") != SAMPLER:  # an older bmoe's checkpoint
            log(f"{out} was written with another data sampler: the rest of the run draws other windows than it would "
                "have")
        log(f"resuming {out} at step {step}/{tc.steps}" + (f" on {ranks.world} ranks" if ranks.world > 1 else ""))

    net = LossOf(model)
    if ranks.world > 1:
        net = DistributedDataParallel(net, device_ids=[ranks.local] if device.startswith("cuda") else None,
                                      gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets
    if graphed_by_default and waits_on_host(model):  # asked for explicitly, the capture fails with its reason
        log("the step synchronises with the host (independent experts with d_model or d_ff not a multiple of 8): it "
            "runs eagerly, not as the default CUDA graph")
        graphed = False
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.variant}/{cfg.expert_form} N={cfg.n_experts} d={cfg.d_model} d_ff={cfg.d_ff} L={cfg.n_layers}: "
        f"{n_params / 1e6:.2f}M params; {len(splits['train']):,} train tokens ({tok.to_dict()['kind']})"
        + (f"; {ranks.world} ranks × batch {tc.batch // ranks.world}" if ranks.world > 1 else ""))

    def checkpoint(metrics: dict, rngs: list[dict]) -> None:
        save_checkpoint(out, model, tok, metrics, train_state={
            "step": step, "train_config": asdict(tc), "optimizer": portable_optimizer_state(opt), "history": history,
            "train_curve": curve, "data_stream": {"sampler": SAMPLER, "seed": tc.seed, "next_step": step,
                                                  "corpus_sha256": shards.meta["corpus"]["sha256"]},
            "rng": {"world": ranks.world, "cpu": [r["cpu"] for r in rngs], "cuda": [r["cuda"] for r in rngs]}})

    def run_eval(split: str, max_tokens: int | None) -> dict:
        nll = evaluate(model, splits[split], tc.seq, max_tokens, device)
        return text_metrics(nll, splits[split]) if not max_tokens else {"loss": nll, "ppl": math.exp(nll)}

    # the lowest valid loss so far (a resumed run's history holds the evaluations behind its best file)
    best = min((h["valid"]["loss"] for h in history[1:]), default=math.inf)

    def keep_if_best(entry: dict) -> None:
        """--keep-best: the weights of a new lowest valid loss (never the untrained step 0) to best_path(out)."""
        nonlocal best
        if tc.keep_best and entry["step"] > 0 and entry["valid"]["loss"] < best:
            best = entry["valid"]["loss"]
            save_checkpoint(best_path(out), model, tok, {"best": entry, "eval_tokens": tc.eval_tokens})

    if step == 0 and ranks.main:
        history.append({"step": 0, "valid": run_eval("valid", tc.eval_tokens)})
        log(f"step 0: valid loss {history[-1]['valid']['loss']:.4f}")
    model.train()
    t0, tokens_seen = time.time(), 0
    # tokens/s at steady state: the first steps (allocator, kernels, compilation) and evaluations not timed
    timed_from, t_timed, eval_seconds = min(step + 5, tc.steps), None, 0.0
    rows = tc.batch // ranks.world
    run_step = _make_step(net, model, opt, tc, rows, graphed, compiled, log)
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not ranks.main)
    while step < tc.steps:
        starts = step_starts(tc.seed, step, len(splits["train"]), tc.batch, tc.seq)
        x, y = splits["train"].windows(starts[ranks.rank * rows:(ranks.rank + 1) * rows], tc.seq)
        _, ce = run_step(x, y, lr_at(step, tc))  # ce stays on the device: read at logged steps only
        step += 1
        tokens_seen += tc.batch * tc.seq
        bar.update(1)
        if step == timed_from:
            t_timed = _now(device)
        evaluating = step % tc.eval_every == 0 and step < tc.steps
        if step % tc.log_every == 0 or step == tc.steps or evaluating:
            ce_v = mean(ce, ranks)  # every rank's share of the global batch
            curve.append([step, ce_v])
            bar.set_postfix(loss=f"{ce_v:.3f}", ppl=f"{math.exp(ce_v):.1f}",
                            tok_s=f"{tokens_seen / (time.time() - t0):,.0f}")
        if evaluating:
            rngs = gather(rng_state(device), ranks)
            if ranks.main:
                t_eval = _now(device)
                history.append({"step": step, "train_loss": ce_v, "valid": run_eval("valid", tc.eval_tokens)})
                bar.write(f"step {step}: valid loss {history[-1]['valid']['loss']:.4f}")
                keep_if_best(history[-1])
                checkpoint({"history": history}, rngs)
                eval_seconds += _now(device) - t_eval
        # one rank alone may have been signalled: the ranks agree at logged steps (a collective there anyway)
        signalled = asked.is_set() if ranks.world == 1 else \
            step % tc.log_every == 0 and any_rank(asked.is_set(), ranks, device)
        if (step == stop_at or signalled) and step < tc.steps:
            if not evaluating:  # an evaluation step has just written its checkpoint
                rngs = gather(rng_state(device), ranks)
                if ranks.main:
                    checkpoint({"history": history}, rngs)
            bar.close()
            log(f"stopped after step {step} {'on a signal' if signalled else 'as asked'}; --resume continues {out}")
            barrier(ranks)
            return {"history": history, "stopped_at": step}
    bar.close()
    elapsed = time.time() - t0
    steady = (tc.steps - timed_from) * tc.batch * tc.seq / (_now(device) - t_timed - eval_seconds) \
        if t_timed is not None and tc.steps > timed_from else None
    rngs = gather(rng_state(device), ranks)
    metrics = {}
    if ranks.main:
        final = {"valid": run_eval("valid", 0), "test": run_eval("test", 0)}
        history.append({"step": step, **final})
        keep_if_best(history[-1])
        metrics = {**final, "history": history, "train_curve": curve, "train_tokens": step * tc.batch * tc.seq,
                   "train_seconds": elapsed, "params": n_params, "corpus": shards.meta["corpus"]["name"],
                   "tokenizer": tok.to_dict()["kind"], "preset": preset, "train_config": asdict(tc),
                   "world_size": ranks.world, "steady_tokens_per_s": steady, "cuda_graphs": graphed,
                   "compiled": compiled}
        if device.startswith("cuda"):
            metrics["peak_gpu_bytes_rank0"] = torch.cuda.max_memory_allocated(device)
            metrics["peak_gpu_reserved_bytes_rank0"] = torch.cuda.max_memory_reserved(device)  # a graph's pool too
        checkpoint(metrics, rngs)
        speed = f", {steady:,.0f} tokens/s steady on {ranks.world} rank(s)" if steady else ""
        log(f"done: valid loss {final['valid']['loss']:.4f} (ppl {final['valid']['ppl']:.2f}, "
            f"bpc {final['valid']['bpc']:.3f}), test loss {final['test']['loss']:.4f}; {elapsed:.0f}s{speed}; "
            f"wrote {out}")
        if tc.keep_best:
            log(f"best valid loss {best:.4f} kept in {best_path(out)}")
    barrier(ranks)  # the other ranks leave once rank 0 has written the checkpoint
    return metrics


def _make_step(net: nn.Module, model: MoELM, opt: torch.optim.Optimizer, tc: TrainConfig, rows: int, graphed: bool,
               compiled: bool, log):
    """The eager step over `net` (the model's loss, DDP-wrapped on several ranks) or the CUDA-graph step."""
    loss_fn = torch.compile(net) if compiled else net
    if not graphed:
        return eager_step(loss_fn, model, opt, tc.grad_clip)
    t0 = time.perf_counter()
    try:
        step = GraphedStep(loss_fn, model, opt, tc.grad_clip, rows, tc.seq)
    except RuntimeError as exc:  # e.g. an op that synchronises with the host, which capture refuses. No eager
        # fallback: a failed capture leaves torch's CUDA generator in capture mode for this process
        raise BmoeError(f"--cuda-graphs: the training step could not be captured as a CUDA graph "
                        f"({one_line(exc, 300)}); run it with --no-cuda-graphs") from None
    log(f"training step captured as a CUDA graph{' (compiled)' if compiled else ''} in "
        f"{time.perf_counter() - t0:.1f}s")
    return step


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _restore_rng(state: dict, tc: TrainConfig, step: int, device: str, ranks: Ranks, log) -> None:
    """Each rank's saved generator states; re-derived from (seed, rank, step) when the rank count changed."""
    rng = state.get("rng") or {"world": 1, "cpu": [state["torch_rng"]], "cuda": [None]}  # older checkpoints
    if rng["world"] != ranks.world:
        torch.manual_seed(noise_seed(tc.seed, ranks.rank, step))
        log(f"saved on {rng['world']} ranks, resumed on {ranks.world}: router noise re-seeded (the run continues "
            "exactly from the saved weights, optimizer and data position, not bit-exactly as before)")
        return
    try:
        torch.set_rng_state(rng["cpu"][ranks.rank])
        if device.startswith("cuda") and rng["cuda"][ranks.rank] is not None:
            torch.cuda.set_rng_state(rng["cuda"][ranks.rank], device)
    except (IndexError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"the saved training state has an unusable RNG state ({type(exc).__name__}); "
                              "it cannot be resumed exactly") from None
