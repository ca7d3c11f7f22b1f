"""Generation through ONNX Runtime GenAI (pip install bmoe[genai]): its generate() loop, KV cache,
sampling and tokenizer, the same ones an Android, iOS or C app uses (docs/embedding.md).

GenAI reads the model directory itself, so everything it will read is checked first: every file
the manifest lists (size and sha256), genai_config.json against the manifest, no GenAI-readable file
the manifest does not list, and no copy of the op library inside the directory or the working
directory (GenAI would load that one: code from a model directory is never run). The op library
is bmoe's own, loaded before GenAI so that GenAI's lookup of the bare name finds it by its soname.

Same interface as runtime/generate.Generator (tokens, generate, tokenizer, GenerationStats); the
Numba backend stays the independent reference (tests/test_genai.py compares the two).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bmoe_runtime.backends import ort_ops
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.genai_config import OPS_LIBRARY, check_genai_files, end_of_text_id
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.format.tokenizer import load_tokenizer
from bmoe_runtime.runtime.generate import GenerationStats, Sampling, plan_length

PROBE = "ROMEO: héllo\n\tworld 日本 "  # text both tokenizers must encode alike
# Files GenAI's tokenizer would read if present: an export lists the ones it has, and no other may be there.
GENAI_READS = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "generation_config.json")
# Session options a genai_config.json may set for bmoe-run, besides the op library's own "bmoe.*" entries
# (others write files or change what is loaded).
SESSION_OPTIONS = {"log_id", "custom_ops_library", "provider_options", "intra_op_num_threads",
                   "inter_op_num_threads", "log_severity_level", "log_verbosity_level", "graph_optimization_level",
                   "enable_cpu_mem_arena", "enable_mem_pattern"}


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def preload_op_library() -> Path:
    """Load bmoe's op library into this process (it stays loaded): GenAI's dlopen of the bare name
    "libbmoe_ops.so" then resolves to it by its soname."""
    lib = ort_ops.library_path()
    if lib is None:
        raise BmoeError(f"{ort_ops.LIB_NAME} not found: the ONNX Runtime GenAI engine needs bmoe's op library "
                        "(build it with `pip install -e .`), or use --backend numba")
    try:
        ctypes.CDLL(str(lib))
    except OSError as exc:
        raise BmoeError(f"{lib} cannot be loaded as the ai.bmoe op library: {_first_line(exc)}") from None
    return lib


def overhead_in_this_process() -> tuple[int, str]:
    """What a GenAI run holds besides its model (the planner's runtime overhead), measured as this process's
    peak RSS after GenAI has loaded and run the bundled model once: ONNX Runtime's environment, thread pools
    and arenas, GenAI's tokenizer and state. It counts the bundled model's few MiB too, so it errs high."""
    from bmoe_runtime import default_model_dir
    from bmoe_runtime.planning.planner import overhead_override
    from bmoe_runtime.planning.ram import peak_rss

    given = overhead_override()  # $BMOE_OVERHEAD_MB, as for every other runtime
    if given:
        return given
    list(GenAIGenerator(default_model_dir(), threads=1).tokens([10], 2))
    peak = peak_rss()
    if peak is None:
        raise BmoeError("peak RSS is not readable on this platform: plan with --engine loop")
    return peak, "measured: peak RSS of this process after ONNX Runtime GenAI ran the bundled model"


class GenAITokenizer:
    """GenAI's own tokenizer (onnxruntime-extensions reading tokenizer.json), as bmoe's Tokenizer."""

    def __init__(self, og_tokenizer, vocab_size: int):
        self._tok, self.vocab_size = og_tokenizer, vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(np.asarray(ids, np.int32))


class GenAIGenerator:
    def __init__(self, model_dir: str | Path, threads: int | None = None):
        self.dir = Path(model_dir)
        manifest = read_manifest(self.dir, verify="sha256")  # GenAI reads the files after us: all verified
        if manifest.get("kind") != "lm":
            raise BmoeError(f"{self.dir} is not a language model export (kind {manifest.get('kind')!r})")
        self.cfg = manifest["config"]
        bmoe_tokenizer = load_tokenizer(self.dir, manifest)
        if bmoe_tokenizer.vocab_size != self.cfg["vocab_size"]:
            raise BmoeError(f"{self.dir}: the tokenizer has {bmoe_tokenizer.vocab_size} tokens, the model "
                            f"{self.cfg['vocab_size']}")
        self.eos_id = end_of_text_id(bmoe_tokenizer)
        config = check_genai_files(self.dir, manifest, self.eos_id)
        self._check_session_options(config)
        self._check_unlisted(manifest)
        self._preload_op_library()
        import onnxruntime_genai as og

        self._og = og
        # the op library confines streamed angle files to the model's directory (docs/ops.md)
        options = {"custom_ops_library": OPS_LIBRARY, "inter_op_num_threads": 1,
                   ort_ops.MODEL_DIR_KEY: str(self.dir.resolve())}
        if threads:
            options["intra_op_num_threads"] = threads
        try:
            og_config = og.Config(str(self.dir))
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(og_config)
            self.tokenizer = GenAITokenizer(og.Tokenizer(self.model), self.cfg["vocab_size"])
            agree = self.tokenizer.encode(PROBE) == bmoe_tokenizer.encode(PROBE)
        except Exception as exc:  # GenAI reports everything as RuntimeError
            raise BmoeError(f"ONNX Runtime GenAI cannot load {self.dir}: {_first_line(exc)}") from None
        if not agree:  # e.g. a tokenizer_config.json that adds tokens: GenAI would not generate what bmoe runs
            raise BmoeError(f"{self.dir}: GenAI's tokenizer and bmoe's read tokenizer.json differently")

    def _check_session_options(self, config: dict) -> None:
        opts = config["model"]["decoder"].get("session_options", {})
        if not isinstance(opts, dict):
            raise BmoeError(f"{self.dir}: genai_config.json: model.decoder.session_options is not an object")
        unknown = sorted(k for k in opts if k not in SESSION_OPTIONS and not k.startswith("bmoe."))
        if unknown or opts.get("provider_options", []) != []:
            what = f"session option {unknown[0][:60]!r}" if unknown else "provider_options (bmoe-run runs on the CPU)"
            raise BmoeError(f"{self.dir}: genai_config.json sets {what}, which bmoe-run does not accept")

    def _check_unlisted(self, manifest: dict) -> None:
        for name in GENAI_READS:
            if name not in manifest["files"] and os.path.lexists(self.dir / name):
                raise BmoeError(f"{self.dir}: {name} is not listed in manifest.json (unverified), and GenAI would "
                                "read it: remove it or re-export")

    def _preload_op_library(self) -> None:
        lib = preload_op_library()
        for where in (self.dir, Path.cwd()):  # GenAI looks there before the loaded library
            found = where / OPS_LIBRARY
            if os.path.lexists(found) and not (found.is_file() and os.path.samefile(found, lib)):
                raise BmoeError(f"{found} would be loaded by ONNX Runtime GenAI instead of bmoe's op library "
                                f"{lib}: remove it (a model directory must not carry code) or run from elsewhere")

    def tokens(self, prompt_ids: list[int], n_new: int, temperature: float = 0.0, seed: int = 0,
               stats: GenerationStats | None = None, *, max_context: int | None = None, eos: str = "stop",
               **options) -> Iterator[int]:
        """As Generator.tokens; GenAI always treats end of text specially, so eos is "stop" or "suppress"."""
        sampling = Sampling(temperature=temperature, seed=seed, eos=eos, **options)
        sampling.check(self.cfg["vocab_size"])
        if eos not in ("stop", "suppress"):
            raise BmoeError(f"the GenAI engine's eos is 'stop' or 'suppress', got {eos!r}")
        if not 0 <= seed < 2**31:
            raise BmoeError(f"the seed must be in [0, 2^31), got {seed}")
        n = plan_length(prompt_ids, n_new, self.cfg["vocab_size"], self.cfg["max_seq"], max_context)
        length = len(prompt_ids) + n
        search = {"max_length": length, "min_length": length if eos == "suppress" else 0,
                  "do_sample": not sampling.greedy, "temperature": float(temperature) if temperature else 1.0,
                  "top_k": sampling.top_k, "top_p": float(sampling.top_p),
                  "repetition_penalty": float(sampling.repetition_penalty), "random_seed": seed,
                  "num_beams": 1, "num_return_sequences": 1}  # whatever the config's defaults say
        try:
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(**search)
            generator = self._og.Generator(self.model, params)
        except Exception as exc:
            raise BmoeError(f"ONNX Runtime GenAI refuses the search options: {_first_line(exc)}") from None
        return self._tokens(generator, list(prompt_ids), n, n < n_new, eos, stats)

    def _tokens(self, generator, prompt_ids: list[int], n_new: int, cut: bool, eos: str,
                stats: GenerationStats | None) -> Iterator[int]:
        stats = stats if stats is not None else GenerationStats()
        stats.start(len(prompt_ids))
        try:
            generator.append_tokens(np.asarray(prompt_ids, np.int32))  # the prefill
            for i in range(n_new):
                generator.generate_next_token()
                nxt = int(generator.get_next_tokens()[0])
                if eos == "stop" and nxt == self.eos_id:
                    stats.stop_reason = "eos"
                    return
                stats.mark(i, nxt)
                yield nxt
        except Exception as exc:
            raise BmoeError(f"ONNX Runtime GenAI: {_first_line(exc)}") from None
        stats.stop_reason = "context" if cut else "length"

    def generate(self, prompt: str, n_new: int, temperature: float = 0.0, seed: int = 0,
                 **options) -> tuple[str, GenerationStats]:
        stats = GenerationStats()
        ids = list(self.tokens(self.tokenizer.encode(prompt), n_new, temperature, seed, stats, **options))
        return self.tokenizer.decode(ids), stats
