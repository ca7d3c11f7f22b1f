"""ONNX Runtime GenAI as bmoe-run's engine (issue 14): an export is a GenAI model directory whose greedy
tokens are the Numba reference runtime's, for the bundled byte-level model and a BPE model; the same
sampling options in both engines; bad GenAI files are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmoe_runtime import default_model_dir
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.format.tokenizer import ByteTokenizer
from bmoe_runtime.planning.devices import resolve_device
from bmoe_runtime.planning.planner import MIB, Settings, make_plan
from bmoe_runtime.runtime.generate import GenerationStats, Generator, Sampling
from bmoe_runtime.runtime.session import ModelSession
from untrusted_dirs import manifest, replace_file, resign, write_manifest

import onnxruntime_genai as og  # noqa: E402  (the [genai] extra, part of [test])
from bmoe_runtime.runtime.genai_engine import GenAIGenerator  # noqa: E402

PROMPT, N = "ROMEO: héllo, wörld", 24
BIN = Path(sys.executable).parent


def numba_generator(model_dir: Path) -> Generator:
    return Generator(ModelSession(model_dir, backend="numba"))


@pytest.mark.parametrize("which", ["bundled", "bpe"])
def test_genai_generates_the_numba_runtimes_greedy_tokens(which, bpe_export):
    model_dir = default_model_dir() if which == "bundled" else bpe_export
    genai, ref = GenAIGenerator(model_dir, threads=1), numba_generator(model_dir)
    ids = genai.tokenizer.encode(PROMPT)  # GenAI's tokenizer (onnxruntime-extensions) reads tokenizer.json
    assert ids == ref.tokenizer.encode(PROMPT)  # as bmoe's runtime (the `tokenizers` package) does
    assert genai.tokenizer.decode(ids) == PROMPT
    if which == "bpe":
        assert len(ids) < len(PROMPT.encode()) and ref.cfg["vocab_size"] == 300  # merges: not bytes in disguise
    n = min(N, ref.cfg["max_seq"] - len(ids))
    want = list(ref.tokens(ids, n))
    assert list(genai.tokens(ids, n)) == want
    assert genai.tokenizer.decode(want) == ref.tokenizer.decode(want)


def test_repetition_penalty_is_applied_alike(bpe_export):
    """Greedy with a penalty: GenAI's C++ (sampling_distribution.h) and generate.py's numpy agree, and
    the penalty changes the tokens (so agreeing is not agreeing on nothing)."""
    genai, ref = GenAIGenerator(default_model_dir(), threads=1), numba_generator(default_model_dir())
    ids = ref.tokenizer.encode("ROMEO:")
    plain = list(ref.tokens(ids, 20))
    for penalty in (0.7, 1.5):
        want = list(ref.tokens(ids, 20, repetition_penalty=penalty))
        assert want != plain
        assert list(genai.tokens(ids, 20, repetition_penalty=penalty)) == want


def test_max_context_and_end_of_text_stop_alike():
    genai, ref = GenAIGenerator(default_model_dir(), threads=1), numba_generator(default_model_dir())
    ids = ref.tokenizer.encode("ROMEO:")
    for gen in (genai, ref):
        stats = GenerationStats()
        assert len(list(gen.tokens(ids, 50, stats=stats, max_context=len(ids) + 5))) == 5
        assert stats.stop_reason == "context"
        with pytest.raises(BmoeError, match="max_seq"):  # without max_context, a run that cannot fit is refused
            gen.tokens(ids, 300)
    greedy = list(ref.tokens(ids, 8))
    for gen in (genai, ref):  # the end-of-text check is bmoe's in both loops: make the 4th token the end
        gen.eos_id = greedy[3]
        stats = GenerationStats()
        assert list(gen.tokens(ids, 8, stats=stats, eos="stop")) == greedy[:3] and stats.stop_reason == "eos"


def test_sampling_cuts_by_hand():
    """top-k / top-p / repetition penalty on a 4-token vocabulary, against probabilities worked out by hand."""
    logits = np.array([3.0, 2.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    p = np.exp(logits) / np.exp(logits).sum()  # .644 .237 .087 .032: top_p .7 keeps 2, .9 keeps 3
    for sampling, allowed in ((Sampling(1.0, top_p=0.7), {0, 1}), (Sampling(1.0, top_p=0.9), {0, 1, 2}),
                              (Sampling(1.0, top_k=2), {0, 1}), (Sampling(1.0), {0, 1, 2, 3})):
        seen = [sampling.next_token(logits, [], None, rng) for _ in range(4000)]
        assert set(seen) == allowed
        share = seen.count(0) / len(seen)
        assert abs(share - p[0] / p[sorted(allowed)].sum()) < 0.03
    # penalty 2 on tokens 0 and 1: 3 → 1.5, 2 → 1.0; token 2 (1.0) ties with 1 and loses (first index wins)
    assert Sampling(repetition_penalty=2.0).next_token(np.array([3.0, 2.0, 1.0]), [0, 1, 1], None, rng) == 0
    assert Sampling(repetition_penalty=4.0).next_token(np.array([3.0, 2.0, 1.0]), [0, 1], None, rng) == 2
    assert Sampling(repetition_penalty=2.0).next_token(np.array([-1.0, -1.5, -3.0]), [0], None, rng) == 1
    assert Sampling(eos="suppress").next_token(np.array([0.0, 5.0]), [], 1, rng) == 0


def bmoe_run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "bmoe-run", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_bmoe_run_uses_genai_and_keeps_its_report(tmp_path):
    reports = {}
    for engine in ("genai", "loop"):
        r = bmoe_run("--temperature", "0", "-n", "24", "--threads", "1", "--engine", engine, "--budget-mb", "400",
                     "--json", str(tmp_path / f"{engine}.json"))
        assert r.returncode == 0, r.stderr
        reports[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    genai = reports["genai"]
    assert "through ONNX Runtime GenAI" in bmoe_run("-n", "2").stderr  # auto picks GenAI
    assert genai["engine"] == "genai" and reports["loop"]["engine"] == "loop"
    assert genai["text"] == reports["loop"]["text"] and genai["new_tokens"] == 24
    assert genai["time_to_first_token_s"] > 0 and genai["decode_tokens_per_s"] > 0
    assert genai["memory"]["peak_rss_bytes"] <= genai["memory"]["predicted_peak_bytes"]  # planned for GenAI


def test_bmoe_run_streamed_falls_back_to_its_loop_and_says_so():
    """GenAI loads model.onnx as it is, so a plan that streams angles runs in bmoe's loop (and says so)."""
    overhead = 100  # MiB, given: both engines plan alike, so a budget just over the smallest plan streams in both
    resident = make_plan(read_manifest(default_model_dir()), resolve_device("host"), Settings("ort", 14, 6),
                         overhead=(overhead * MIB, "given"))
    assert resident.smallest_peak_bytes < resident.all_resident_peak_bytes
    budget = f"{resident.smallest_peak_bytes / MIB + 0.005:.4f}"  # an expert's cos/sin tables: ~0.02 MiB
    args, env = ("--temperature", "0", "-n", "8", "--budget-mb", budget), {"BMOE_OVERHEAD_MB": str(overhead)}
    r = bmoe_run(*args, env=env)
    assert r.returncode == 0 and "bmoe's own loop: ONNX Runtime GenAI cannot stream angles" in r.stderr, r.stderr
    assert "streamed from angles.bin" in r.stderr and "angle cache:" in r.stderr  # the loop's cache counters
    ref = numba_generator(default_model_dir())
    assert r.stdout == "ROMEO:" + ref.tokenizer.decode(list(ref.tokens(ref.tokenizer.encode("ROMEO:"), 8))) + "\n"
    r = bmoe_run(*args, "--engine", "genai", env=env)
    assert r.returncode == 1 and "cannot stream angles" in r.stderr and "Traceback" not in r.stderr


def test_bmoe_run_stops_cleanly_at_the_context_limit():
    r = bmoe_run("--temperature", "0", "-n", "1000", "--engine", "genai")
    assert r.returncode == 0 and "stopped at the context limit: 256 positions (6 prompt + 250 new)" in r.stderr


def one_line_error(d: Path, match: str, *args: str, cwd: Path | None = None) -> None:
    r = bmoe_run(str(d), "-n", "4", "--temperature", "0", *args, cwd=cwd)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr


def edit_genai_config(d: Path, fn) -> None:
    config = json.loads((d / "genai_config.json").read_text())
    fn(config)
    replace_file(d / "genai_config.json", json.dumps(config).encode())
    resign(d)  # consistent checksums: only the content is wrong


def test_missing_genai_config_is_refused(d):
    os.unlink(d / "genai_config.json")
    one_line_error(d, "genai_config.json is missing")


def test_genai_config_not_matching_the_manifest_is_refused(d):
    edit_genai_config(d, lambda c: c["model"]["decoder"].__setitem__("num_hidden_layers", 3))
    layers = manifest(d)["config"]["n_layers"]
    assert layers != 3
    one_line_error(d, f"does not match manifest.json: model.decoder.num_hidden_layers is 3, expected {layers}")


def test_genai_config_changed_after_export_fails_its_checksum(d):
    replace_file(d / "genai_config.json", (d / "genai_config.json").read_bytes().replace(b'"llama"', b'"gpt2" '))
    one_line_error(d, "sha256")


@pytest.mark.parametrize("key, value", [("enable_profiling", "/tmp/profile"), ("provider_options", [{"cuda": {}}])])
def test_genai_config_session_options_that_bmoe_run_refuses(d, key, value):
    edit_genai_config(d, lambda c: c["model"]["decoder"]["session_options"].__setitem__(key, value))
    one_line_error(d, "which bmoe-run does not accept")


def test_tokenizer_config_that_changes_tokenization_is_refused(d):
    tc = json.loads((d / "tokenizer_config.json").read_text())
    replace_file(d / "tokenizer_config.json", json.dumps({**tc, "add_bos_token": True}).encode())
    resign(d)
    one_line_error(d, "tokenizer_config.json is not the one bmoe wrote: tokenizer_config.add_bos_token is true")


def test_tokenizer_of_another_vocabulary_size_is_refused(d, bpe_export):
    replace_file(d / "tokenizer.json", (bpe_export / "tokenizer.json").read_bytes())  # 300 tokens, model 256
    resign(d)
    for engine in ("genai", "loop"):
        one_line_error(d, "the tokenizer has 300 tokens, the model 256", "--engine", engine)


def test_op_library_in_the_model_or_working_directory_is_refused(d, tmp_path):
    (d / "libbmoe_ops.so").write_bytes(b"\x7fELF not really")
    one_line_error(d, "must not carry code")
    os.unlink(d / "libbmoe_ops.so")
    (tmp_path / "libbmoe_ops.so").write_bytes(b"\x7fELF not really")
    one_line_error(d, "libbmoe_ops.so would be loaded by ONNX Runtime GenAI", cwd=tmp_path)


def test_export_without_genai_files_runs_in_bmoes_loop(d):
    """An export written before the GenAI files (old tokenizer description, no genai_config.json) still runs."""
    for name in ("genai_config.json", "tokenizer_config.json"):
        os.unlink(d / name)
    m = manifest(d)
    m["files"] = {k: v for k, v in m["files"].items() if k not in ("genai_config.json", "tokenizer_config.json")}
    write_manifest(d, m)
    replace_file(d / "tokenizer.json", json.dumps(ByteTokenizer().to_dict()).encode())
    resign(d)
    r = bmoe_run(str(d), "-n", "24", "--temperature", "0")
    assert r.returncode == 0 and "needs the export's genai_config.json" in r.stderr, r.stderr
    new = bmoe_run(str(default_model_dir()), "-n", "24", "--temperature", "0")
    assert r.stdout == new.stdout
    one_line_error(d, "needs the export's genai_config.json", "--engine", "genai")


def test_genai_padded_batch_gives_each_row_its_own_tokens(bpe_export):
    """Two prompts of different lengths in one GenAI batch, padded by GenAI's tokenizer (encode_batch: pad
    tokens after the shorter prompt, GenAI's convention): GenAI feeds attention_mask and position_ids, and each
    row generates what it generates alone in the Numba runtime. Unmasked (the pads read as tokens), the padded
    row would continue differently."""
    assert {"attention_mask", "position_ids"} <= set(read_manifest(bpe_export)["inputs"])
    genai, ref = GenAIGenerator(bpe_export, threads=1), numba_generator(bpe_export)
    prompts, n, pad = ["ROMEO: soft", "It is the east, and Juliet"], 8, genai.eos_id  # genai_config's pad_token_id
    ids = [ref.tokenizer.encode(p) for p in prompts]
    alone = [list(ref.tokens(i, n, eos="suppress")) for i in ids]
    batch = og.Tokenizer(genai.model).encode_batch(prompts).as_numpy()
    width = batch.shape[1]
    assert [list(r) for r in batch] == [ids[0] + [pad] * (width - len(ids[0])), ids[1]]  # padded, not equal lengths
    params = og.GeneratorParams(genai.model)
    params.set_search_options(max_length=width + n, min_length=width + n, batch_size=2, do_sample=False)
    generator = og.Generator(genai.model, params)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    assert [[int(t) for t in generator.get_sequence(r)][width:] for r in range(2)] == alone
    assert list(ref.tokens([int(t) for t in batch[0]], n, eos="suppress")) != alone[0]


@pytest.mark.parametrize("backend", ["numba", "ort"])
def test_left_padded_batch_in_bmoes_session_gives_each_row_its_own_tokens(bpe_export, backend):
    """The graph's padding inputs in bmoe's own session: a batch of 2, the shorter prompt left-padded (mask 0,
    positions counting only real tokens), generates per row the tokens of that prompt alone."""
    ref = numba_generator(bpe_export)
    sess = ModelSession(bpe_export, backend)
    ids = [ref.tokenizer.encode(p) for p in ("ROMEO: soft", "It is the east, and Juliet")]
    n, width = 6, max(map(len, ids))
    alone = [list(ref.tokens(i, n, eos="suppress")) for i in ids]
    pads = [width - len(i) for i in ids]
    tokens = np.array([[ref.eos_id] * k + i for k, i in zip(pads, ids)], np.int64)
    mask = np.array([[0] * k + [1] * len(i) for k, i in zip(pads, ids)], np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past, out = ref.empty_cache(2), []
    names = [f"past_{kind}_{i}" for i in range(ref.n_layers) for kind in ("key", "value")]
    for _ in range(n):
        result = sess.run({"input_ids": tokens, "attention_mask": mask, "position_ids": positions, **dict(zip(names, past))})
        past = [result[name.replace("past", "present", 1)] for name in names]
        tokens = result["logits"][:, -1].argmax(axis=1)[:, None].astype(np.int64)
        out.append(tokens[:, 0].tolist())
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    assert [list(col) for col in zip(*out)] == alone
