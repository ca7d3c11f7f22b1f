"""Training: presets, AdamW with warmup + cosine, periodic evaluation, resumable checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from bmoe_runtime.choices import PRESET_NAMES
from bmoe_runtime.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from bmoe_runtime.train.data import Corpus, TokenStream, count_words, load_corpus
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.format.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_dict


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq", "eval_every"):  # 0 would divide by zero or train on nothing
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
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: MoELM, stream: TokenStream, seq: int, max_tokens: int | None, device: str) -> float:
    """Mean cross-entropy (nats/token) over contiguous windows."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    windows = list(stream.windows(seq, max_tokens or None))
    for i in range(0, len(windows), 32):
        x = torch.cat([w[0] for w in windows[i:i + 32]]).to(device)
        y = torch.cat([w[1] for w in windows[i:i + 32]]).to(device)
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                                   reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return total / max(n, 1)


def text_metrics(nll: float, text: str, n_tokens: int) -> dict:
    """Token loss → perplexity, bits per character and word-level perplexity of the split."""
    total = nll * n_tokens
    return {"loss": nll, "ppl": math.exp(nll), "bpc": total / (len(text) * math.log(2)),
            "word_ppl": math.exp(total / max(1, count_words(text)))}


def build_tokenizer(kind: str, corpus: Corpus, vocab: int) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(corpus.train, vocab)
    raise ValueError(f"unknown tokenizer {kind!r}; expected byte or bpe")


def train(data: str, out: str, preset: str = "tiny", overrides: dict | None = None, train_overrides: dict | None = None,
          tokenizer: str = "byte", bpe_vocab: int = 4096, device: str = "cpu", resume: bool = False,
          log=print) -> dict:
    """Train (or resume) a model and write `out`; returns the final metrics."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    m_over, t_over = PRESETS[preset]
    tc = replace(TrainConfig(), **{**t_over, **(train_overrides or {})})
    corpus = load_corpus(data)

    state = None
    if resume and Path(out).exists():
        ckpt = read_checkpoint(out)
        if "train_state" not in ckpt:
            raise CheckpointError(f"{out} holds no training state to resume from")
        state = ckpt["train_state"]
        cfg = ModelConfig.from_dict(ckpt["config"])
        tok = tokenizer_from_dict(ckpt["tokenizer"])
        saved = TrainConfig(**state["train_config"])
        ignored = {k: v for k, v in (train_overrides or {}).items() if getattr(saved, k, v) != v}
        if ignored:
            log(f"--resume continues {out} with its saved settings; ignoring {ignored}")
        tc = saved
        if state["step"] >= tc.steps and "test" in ckpt.get("metrics", {}):
            log(f"{out} already finished its {tc.steps} steps; nothing to resume")
            return ckpt["metrics"]  # unchanged: no re-evaluation, no duplicate history entry
    else:
        tok = build_tokenizer(tokenizer, corpus, bpe_vocab)
        cfg = ModelConfig(**{**m_over, **(overrides or {}), "vocab_size": tok.vocab_size})
    if tc.seq > cfg.max_seq:
        cfg = replace(cfg, max_seq=tc.seq)

    torch.manual_seed(tc.seed)
    model = MoELM(cfg).to(device)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step, history = 0, []
    if state is not None:
        model.load_state_dict({k: v.to(device) for k, v in ckpt["state_dict"].items()})
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], list(state["history"])
        log(f"resuming {out} at step {step}/{tc.steps}")

    streams = {s: TokenStream(tok.encode(getattr(corpus, s))) for s in ("train", "valid", "test")}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.variant}/{cfg.expert_form} N={cfg.n_experts} d={cfg.d_model} d_ff={cfg.d_ff} L={cfg.n_layers}: "
        f"{n_params / 1e6:.2f}M params; {corpus.name}: {len(streams['train']):,} train tokens ({tok.to_dict()['kind']})")

    def checkpoint(metrics: dict) -> None:
        save_checkpoint(out, model, tok, metrics, train_state={
            "step": step, "train_config": asdict(tc), "optimizer": opt.state_dict(), "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history})

    def run_eval(split: str, max_tokens: int | None) -> dict:
        nll = evaluate(model, streams[split], tc.seq, max_tokens, device)
        return text_metrics(nll, getattr(corpus, split), len(streams[split]) - 1) if not max_tokens else \
            {"loss": nll, "ppl": math.exp(nll)}

    if step == 0:
        history.append({"step": 0, "valid": run_eval("valid", tc.eval_tokens)})
        log(f"step 0: valid loss {history[-1]['valid']['loss']:.4f}")
    model.train()
    t0, tokens_seen = time.time(), 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    while step < tc.steps:
        x, y = streams["train"].batch(tc.batch, tc.seq, gen)
        x, y = x.to(device), y.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with autocast:
            loss, ce = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % 10 == 0 or step == tc.steps:
            ce_v = ce.item()
            bar.set_postfix(loss=f"{ce_v:.3f}", ppl=f"{math.exp(ce_v):.1f}",
                            tok_s=f"{tokens_seen / (time.time() - t0):,.0f}")
        bar.update(1)
        if step % tc.eval_every == 0 and step < tc.steps:
            history.append({"step": step, "train_loss": ce.item(), "valid": run_eval("valid", tc.eval_tokens)})
            bar.write(f"step {step}: valid loss {history[-1]['valid']['loss']:.4f}")
            checkpoint({"history": history})
    bar.close()
    elapsed = time.time() - t0
    final = {"valid": run_eval("valid", 0), "test": run_eval("test", 0)}
    history.append({"step": step, **final})
    metrics = {**final, "history": history, "train_tokens": step * tc.batch * tc.seq, "train_seconds": elapsed,
               "params": n_params, "corpus": corpus.name, "tokenizer": tok.to_dict()["kind"], "preset": preset,
               "train_config": asdict(tc)}
    checkpoint(metrics)
    log(f"done: valid loss {final['valid']['loss']:.4f} (ppl {final['valid']['ppl']:.2f}, bpc {final['valid']['bpc']:.3f}), "
        f"test loss {final['test']['loss']:.4f}; {elapsed:.0f}s; wrote {out}")
    return metrics
