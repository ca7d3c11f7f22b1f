"""Incremental text generation on an exported LM, through any ModelSession backend."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.genai_config import end_of_text_id
from bmoe_runtime.format.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # the GenAI engine uses this module's sampling and stats without the session's imports (numba)
    from bmoe_runtime.runtime.session import ModelSession

MAX_TEMPERATURE = 100.0  # beyond, sampling is uniform noise
MAX_REPETITION_PENALTY = 100.0
EOS_MODES = (None, "stop", "suppress")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, with ONNX Runtime GenAI's semantics (sampling_distribution.h), so both
    engines take the same options: the repetition penalty divides (positive) or multiplies (negative) the
    logit of every token already in the sequence, prompt included; temperature 0 or top_k 1 is greedy;
    else the top_k logits (0: all) are softmaxed at the temperature, cut to the smallest set reaching top_p
    (1: no cut), and sampled. eos: None, the end-of-text token is an ordinary token; "stop" ends generation
    on it; "suppress" never picks it (GenAI's min_length), so a run gives all its tokens."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    eos: str | None = None

    def check(self, vocab_size: int) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise BmoeError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab_size:
            raise BmoeError(f"top-k must be a whole number in [0, {vocab_size}] (0: off), got {self.top_k!r}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise BmoeError(f"top-p must be a number in (0, 1] (1: off), got {self.top_p!r}")
        if not (number(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise BmoeError(f"repetition penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}] (1: off), "
                            f"got {self.repetition_penalty!r}")
        if self.eos not in EOS_MODES:
            raise BmoeError(f"eos must be one of {EOS_MODES}, got {self.eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def next_token(self, logits: np.ndarray, sequence: list[int], eos_id: int | None,
                   rng: np.random.Generator) -> int:
        """logits [V] of the last position; sequence: the prompt and the tokens generated so far."""
        scores = logits.astype(np.float64)  # a copy
        if self.repetition_penalty != 1:
            seen = np.unique(np.asarray(sequence, np.int64))
            s = scores[seen]
            scores[seen] = np.where(s < 0, s * self.repetition_penalty, s / self.repetition_penalty)
        if self.eos == "suppress" and eos_id is not None:
            scores[eos_id] = -np.inf
        if self.greedy:
            return int(np.argmax(scores))
        cut = self.top_k > 1 or self.top_p < 1  # sorted only when cutting: same seed, same tokens as before
        order = np.argsort(-scores, kind="stable")[:self.top_k or None] if cut else np.arange(len(scores))
        with np.errstate(over="ignore", under="ignore"):  # a tiny temperature is greedy, not a warning
            p = np.exp((scores[order] - scores.max()) / self.temperature)
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1  # smallest prefix whose mass reaches top_p
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[rng.choice(len(p), p=p)])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0  # this process's CPU time over the same span (all threads): the work, not the wait
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "length" (n_new tokens), "eos", or "context" (max_context reached)
    _t0: float = field(default=0.0, repr=False)  # clocks at the start and at the first token
    _t_decode: float = field(default=0.0, repr=False)
    _cpu_decode: float = field(default=0.0, repr=False)

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def decode_tok_per_cpu_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_cpu_s if self.new_tokens > 1 and self.decode_cpu_s > 0 else 0.0

    def mark(self, i: int, token: int) -> None:
        """Token i (0-based) was chosen now: the first ends time-to-first-token, later ones extend decode."""
        now, cpu = time.perf_counter(), time.process_time()
        if i == 0:
            self.first_token_s = now - self._t0
            self._t_decode, self._cpu_decode = now, cpu
        self.new_tokens, self.decode_s, self.decode_cpu_s = i + 1, now - self._t_decode, cpu - self._cpu_decode
        self.tokens.append(token)

    def start(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self._t0 = prompt_tokens, time.perf_counter()


def plan_length(prompt_ids: list[int], n_new: int, vocab_size: int, max_seq: int,
                max_context: int | None) -> int:
    """The number of tokens a run may generate, checking what it refuses. max_context None: prompt +
    n_new must fit max_seq; else generation stops cleanly at max_context (at most max_seq) positions."""
    if not prompt_ids:
        raise BmoeError("the prompt is empty")
    if max(prompt_ids) >= vocab_size or min(prompt_ids) < 0:
        raise BmoeError("prompt token ids are outside the model's vocabulary")
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise BmoeError(f"the number of new tokens must be a whole number ≥ 1, got {n_new!r}")
    if max_context is None:
        if len(prompt_ids) + n_new > max_seq:
            raise BmoeError(f"prompt ({len(prompt_ids)} tokens) + {n_new} new tokens exceed the model's "
                            f"max_seq {max_seq}")
        return n_new
    if isinstance(max_context, bool) or not isinstance(max_context, int) or not 1 <= max_context <= max_seq:
        raise BmoeError(f"max context must be a whole number in [1, the model's max_seq {max_seq}], "
                        f"got {max_context!r}")
    if len(prompt_ids) >= max_context:
        raise BmoeError(f"the prompt ({len(prompt_ids)} tokens) leaves no room in a context of {max_context}")
    return min(n_new, max_context - len(prompt_ids))


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
        self.eos_id = end_of_text_id(self.tokenizer)
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

    def sampling(self, temperature: float = 0.0, seed: int = 0, **options) -> Sampling:
        sampling = Sampling(temperature=temperature, seed=seed, **options)
        sampling.check(self.cfg["vocab_size"])
        return sampling

    def tokens(self, prompt_ids: list[int], n_new: int, temperature: float = 0.0, seed: int = 0,
               stats: GenerationStats | None = None, *, max_context: int | None = None, **options) -> Iterator[int]:
        """Yield up to n_new tokens, greedy (temperature 0) or sampled (options: Sampling's top_k, top_p,
        repetition_penalty, eos); bad arguments raise here, not at the first next(). max_context: stop
        cleanly after that many positions instead of refusing a run that would not fit max_seq."""
        sampling = self.sampling(temperature, seed, **options)
        n = plan_length(prompt_ids, n_new, self.cfg["vocab_size"], self.cfg["max_seq"], max_context)
        return self._tokens(list(prompt_ids), n, n < n_new, sampling, stats)

    def _tokens(self, prompt_ids: list[int], n_new: int, cut: bool, sampling: Sampling,
                stats: GenerationStats | None) -> Iterator[int]:
        rng = np.random.default_rng(sampling.seed)
        stats = stats if stats is not None else GenerationStats()
        stats.start(len(prompt_ids))
        sequence = list(prompt_ids)
        logits, past = self.step(np.asarray([prompt_ids], np.int64), self.empty_cache())
        for i in range(n_new):
            nxt = sampling.next_token(logits[0, -1], sequence, self.eos_id, rng)
            if sampling.eos == "stop" and nxt == self.eos_id:
                stats.stop_reason = "eos"
                return
            sequence.append(nxt)
            stats.mark(i, nxt)
            yield nxt
            if i + 1 < n_new:
                logits, past = self.step(np.asarray([[nxt]], np.int64), past)
        stats.stop_reason = "context" if cut else "length"

    def generate(self, prompt: str, n_new: int, temperature: float = 0.0, seed: int = 0,
                 **options) -> tuple[str, GenerationStats]:
        stats = GenerationStats()
        ids = list(self.tokens(self.tokenizer.encode(prompt), n_new, temperature, seed, stats, **options))
        return self.tokenizer.decode(ids), stats
