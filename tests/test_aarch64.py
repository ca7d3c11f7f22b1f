"""aarch64 cross-build + qemu-user run of the C++ ops (custom_ops/aarch64/run_qemu_tests.sh).

Runs with BMOE_AARCH64=1 (set by .ci/run, which installs the tools): then a missing
cross compiler or qemu-aarch64, a failed build or any failing case FAILS the test — the
NEON/dotprod kernels are what the target devices run. Without BMOE_AARCH64=1 it is skipped
(the summary names the reason). The script also cross-compiles the C example
(examples/c/bmoe_generate.c, ORT C API + libbmoe_ops.so) and runs it under qemu on the bundled
model: its greedy tokens must be the Numba runtime's. About 75 s on a warm build directory; the
first run also downloads the onnxruntime aarch64 wheel (sha256-checked). docs/aarch64.md holds the
last results.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_native_example import python_greedy

from bmoe_runtime import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "custom_ops" / "aarch64" / "run_qemu_tests.sh"
TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc", "cmake", "unzip", "sha256sum")
EXAMPLE_PROMPT, EXAMPLE_N_NEW = "ROMEO:", 8

pytestmark = pytest.mark.skipif(os.environ.get("BMOE_AARCH64") != "1",
                                reason="BMOE_AARCH64 is not 1: the aarch64 (NEON/dotprod) kernels were not run")


@pytest.fixture(scope="module")
def qemu_run() -> subprocess.CompletedProcess:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"BMOE_AARCH64=1 but {', '.join(missing)} not found: install g++-aarch64-linux-gnu and "
                    f"qemu-user (apt-get), or unset BMOE_AARCH64", pytrace=False)
    env = {**os.environ, "PYTHON": sys.executable,
           "EXAMPLE_PROMPT": EXAMPLE_PROMPT, "EXAMPLE_N_NEW": str(EXAMPLE_N_NEW)}
    return subprocess.run(["sh", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_qemu_aarch64_all_variants(qemu_run):
    r = qemu_run
    out = r.stdout + r.stderr
    last = re.findall(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and last, f"run_qemu_tests.sh exited {r.returncode}:\n{out[-4000:]}"
    passed, failed = map(int, last[-1])
    assert failed == 0 and passed > 1000, out[-4000:]
    for label in ("BMOE_KERNEL=scalar", "BMOE_KERNEL=neon", "BMOE_KERNEL=dotprod", "sdot executed"):
        assert re.search(rf"{re.escape(label)}.* [1-9]\d* passed, 0 failed", r.stdout), (label, out[-4000:])


def test_c_example_on_aarch64_generates_the_python_runtimes_tokens(qemu_run):
    """The C example, cross-built and run under qemu, against the Numba runtime's greedy loop (no KV cache)."""
    out = qemu_run.stdout + qemu_run.stderr
    found = re.search(r"^tokens:((?: \d+)+)$", qemu_run.stdout, re.M)
    assert found, f"the aarch64 C example printed no tokens:\n{out[-4000:]}"
    tokens = [int(t) for t in found.group(1).split()]
    assert tokens == python_greedy(default_model_dir(), list(EXAMPLE_PROMPT.encode()), EXAMPLE_N_NEW), out[-4000:]
