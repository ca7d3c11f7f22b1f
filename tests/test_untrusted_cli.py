"""Every user error of bmoe, bmoe-run, bmoe-export and bmoe-train: one line on stderr, non-zero exit, no
traceback (issue 12), and nothing printed or written before the run is known to be valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bmoe_runtime.cli import main_cli, run_cli, train_cli
from bmoe_runtime.format.tokenizer import ByteTokenizer
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.train.checkpoint import save_checkpoint
from exporters.cli import export_cli
from untrusted_dirs import fresh_copy, replace_file

REPO = Path(__file__).resolve().parents[1]


def invoke(cmd, args: list[str], env: dict | None = None):
    return CliRunner().invoke(cmd, args, env=env)


def one_line_error(r, code: int = 1, match: str = "") -> None:
    """Exit code, no traceback, and the error as the last line of stderr, a single 'Error: ...' line (after
    progress lines, or click's usage hint for a bad option)."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), f"uncaught {type(r.exception).__name__}: {r.exception}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0] and "Traceback" not in r.output, r.stderr
    assert match.lower() in errors[0].lower(), errors[0]


@pytest.mark.parametrize("value", ["inf", "1e308", "1e-9", "nan", "-1", "0"])
def test_budget_mb_out_of_range(value):
    for args in (["plan", "--budget-mb", value], ["run", "--budget-mb", value]):
        one_line_error(invoke(main_cli, args), 2, "--budget-mb")


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5", "1e9"])
def test_temperature_must_be_finite_and_in_range(value):
    """Was: --temperature nan silently ran greedy."""
    one_line_error(invoke(run_cli, ["--temperature", value]), 2, "--temperature")


@pytest.mark.parametrize("engine", ["loop", "auto"])
@pytest.mark.parametrize("args, match", [(["-p", "PROMPT-ECHO" + "x" * 300], "no room"),
                                         (["--max-context", "1000"], "max context")])
def test_a_run_beyond_the_context_is_refused_before_the_prompt_is_printed(pristine, engine, args, match):
    """Was: the prompt was printed, then the run failed. (-n beyond the context now stops cleanly at it.)"""
    r = invoke(run_cli, [str(pristine), "-p", "PROMPT-ECHO", "--backend", "ort", "--engine", engine, *args])
    one_line_error(r, 1, match)
    assert "PROMPT-ECHO" not in r.stdout


def test_threads_capped_to_the_cores_with_a_note(pristine):
    r = invoke(run_cli, [str(pristine), "-n", "2", "--threads", "100000", "--backend", "ort", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert f"capped to the {len(os.sched_getaffinity(0))} cores" in r.stderr


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate", "fifo"])
def test_plan_verifies_the_files(pristine, tmp_path, damage):
    """Was: bmoe plan exited 0 on deleted or broken files."""
    d = fresh_copy(pristine, tmp_path / "m")
    f = d / "weights.bin"
    data = f.read_bytes()
    if damage == "delete":
        f.unlink()
    elif damage == "flip":
        replace_file(f, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        replace_file(f, data[:-64])
    else:
        f.unlink()
        os.mkfifo(f)
    match = {"delete": "missing", "flip": "sha256", "truncate": "truncated", "fifo": "not a regular file"}[damage]
    one_line_error(invoke(main_cli, ["plan", str(d), "--backend", "numba"]), 1, match)
    # bmoe-run measures its overhead in its own process, and this test process holds torch: give it instead
    one_line_error(invoke(main_cli, ["run", str(d), "--backend", "numba", "--budget-mb", "1000"],
                          env={"BMOE_OVERHEAD_MB": "300"}), 1, match)


def test_missing_op_library_is_an_error_not_a_silent_fallback(pristine, tmp_path):
    r = invoke(run_cli, [str(pristine), "-n", "1"], env={"BMOE_OPS_LIB": str(tmp_path / "nope.so")})
    one_line_error(r, 1, "BMOE_OPS_LIB")
    junk = tmp_path / "junk.so"
    junk.write_text("not a shared library")
    r = invoke(run_cli, [str(pristine), "-n", "1", "--backend", "ort"], env={"BMOE_OPS_LIB": str(junk)})
    one_line_error(r, 1, "op library")


def test_deep_and_degenerate_device_profiles(tmp_path):
    base = ('arch = "x86_64"\nram_mb = {ram}\nreserved_fraction = 0.1\nmem_bandwidth_gbs = 10\n'
            'storage_read_mbs = 100\nstorage_latency_ms = 1\ncores = 4\nisa = []\n')
    deep = tmp_path / "deep.toml"
    deep.write_text(base.format(ram=1000) + "description = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(invoke(main_cli, ["plan", "--device", str(deep)]), 1, "not valid TOML")
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(base.format(ram="1e-300"))
    one_line_error(invoke(main_cli, ["plan", "--device", str(tiny)]), 1, "ram_mb")


def _checkpoint(path: Path, train_state: dict | None = None) -> None:
    torch.manual_seed(0)
    model = MoELM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, n_experts=2, top_k=1, max_seq=32))
    save_checkpoint(path, model, ByteTokenizer(), {}, train_state=train_state)


def test_resume_from_a_partial_training_state(tmp_path):
    """Was: KeyError traceback."""
    (tmp_path / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    _checkpoint(tmp_path / "m.pt", train_state={"step": 1})
    r = invoke(train_cli, ["--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "m.pt"), "--resume"])
    one_line_error(r, 1, "incomplete training state")


@pytest.mark.parametrize("args, option", [(["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
                                          (["--d-model", "0"], "--d-model"), (["--steps", "-1"], "--steps")])
def test_train_options_bounded(tmp_path, args, option):
    r = invoke(train_cli, ["--data", "x", "--out", str(tmp_path / "m.pt"), *args])
    one_line_error(r, 2, option)


def test_export_of_a_checkpoint_with_a_flipped_weight_byte(tmp_path):
    """Was: exported silently. The flipped byte is inside a weight's stored bytes (found by content)."""
    _checkpoint(tmp_path / "m.pt")
    torch.manual_seed(0)  # the same weights as _checkpoint's
    weight = MoELM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, n_experts=2, top_k=1, max_seq=32))
    raw = weight.state_dict()["tok_emb.weight"].contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray((tmp_path / "m.pt").read_bytes())
    at = bytes(data).find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0x04
    (tmp_path / "m.pt").write_bytes(bytes(data))
    one_line_error(invoke(export_cli, [str(tmp_path / "m.pt"), "-o", str(tmp_path / "out")]), 1, "checksum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_real_process_prints_one_line_and_no_prompt(pristine):
    """The console script as a user runs it: stderr and stdout of a real process."""
    r = subprocess.run([sys.executable, "-m", "bmoe_runtime.cli", "run", str(pristine), "-p", "ECHO" * 100,
                        "--backend", "ort"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and "ECHO" not in r.stdout and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("[bmoe]")] == \
        [line for line in r.stderr.splitlines() if line.startswith("Error:")] and "no room" in r.stderr
