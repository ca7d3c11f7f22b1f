"""Incremental text generation on an exported LM, through any ModelSession backend."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.runtime.session import ModelSession
from bmoe_runtime.format.tokenizer import Tokenizer, load_tokenizer

MAX_TEMPERATURE = 100.0  # beyond, sampling is uniform noise


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class Generator:
    def __init__(self, session: ModelSession):
        m = session.manifest
        if m.get("kind") != "lm":
            raise BmoeError(f"{session.dir} is not a language model export (kind {m.get('kind')!r})")
        self.session = session
        self.cfg = m["config"]
        self.tokenizer: Tokenizer = load_tokenizer(session.dir, m)
        if self.tokenizer.vocab_size != self.cfg["vocab_size"]:
            raise BmoeError(f"{session.dir}: the tokenizer has {self.tokenizer.vocab_size} tokens, the model "
                            f"{self.cfg['vocab_size']}")
        self.n_layers, self.n_heads = self.cfg["n_layers"], self.cfg["n_heads"]
        self.d_head = self.cfg["d_model"] // self.n_heads

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_heads, 0, self.d_head), np.float32) for _ in range(2 * self.n_layers)]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [B, T] int64 → logits [B, T, V], present KV."""
        if past[0].shape[2] + ids.shape[1] > self.cfg["max_seq"]:
            raise BmoeError(f"context of {past[0].shape[2] + ids.shape[1]} tokens exceeds the model's "
                            f"max_seq {self.cfg['max_seq']}")
        feeds = {"input_ids": ids}
        names = [f"past_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
        feeds.update(zip(names, past))
        out = self.session.run(feeds)
        present = [out[n.replace("past", "present", 1)] for n in names]
        return out["logits"], present

    def check(self, prompt_ids: list[int], n_new: int, temperature: float = 0.0) -> None:
        """Everything `tokens` would refuse, refused now (before a caller prints anything)."""
        if not prompt_ids:
            raise BmoeError("the prompt is empty")
        if max(prompt_ids) >= self.cfg["vocab_size"] or min(prompt_ids) < 0:
            raise BmoeError("prompt token ids are outside the model's vocabulary")
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
            raise BmoeError(f"the number of new tokens must be a whole number ≥ 1, got {n_new!r}")
        if len(prompt_ids) + n_new > self.cfg["max_seq"]:
            raise BmoeError(f"prompt ({len(prompt_ids)} tokens) + {n_new} new tokens exceed the model's "
                            f"max_seq {self.cfg['max_seq']}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and
                0 <= temperature <= MAX_TEMPERATURE):
            raise BmoeError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}")

    def tokens(self, prompt_ids: list[int], n_new: int, temperature: float = 0.0, seed: int = 0,
               stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield n_new tokens, greedy (temperature 0) or sampled; bad arguments raise here, not at the first next()."""
        self.check(prompt_ids, n_new, temperature)
        return self._tokens(prompt_ids, n_new, temperature, seed, stats)

    def _tokens(self, prompt_ids: list[int], n_new: int, temperature: float, seed: int,
                stats: GenerationStats | None) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        t0 = time.perf_counter()
        logits, past = self.step(np.asarray([prompt_ids], np.int64), self.empty_cache())
        for i in range(n_new):
            last = logits[0, -1].astype(np.float64)
            if temperature > 0:
                with np.errstate(over="ignore", under="ignore"):  # a tiny temperature is greedy, not a warning
                    p = np.exp((last - last.max()) / temperature)
                nxt = int(rng.choice(len(p), p=p / p.sum()))
            else:
                nxt = int(np.argmax(last))
            now = time.perf_counter()
            if i == 0:
                stats.first_token_s = now - t0
                t_decode = now
            stats.new_tokens, stats.decode_s = i + 1, now - t_decode
            stats.tokens.append(nxt)
            yield nxt
            if i + 1 < n_new:
                logits, past = self.step(np.asarray([[nxt]], np.int64), past)

    def generate(self, prompt: str, n_new: int, temperature: float = 0.0, seed: int = 0) -> tuple[str, GenerationStats]:
        stats = GenerationStats()
        ids = list(self.tokens(self.tokenizer.encode(prompt), n_new, temperature, seed, stats))
        return self.tokenizer.decode(ids), stats
