"""aarch64 cross-build + qemu-user run of the C++ ops (custom_ops/aarch64/run_qemu_tests.sh).

Opt-in: runs only with BMOE_AARCH64=1 and with qemu-aarch64 and aarch64-linux-gnu-g++
on PATH (CI has neither; docs/aarch64.md holds the last results). About 70 s on a
warm build directory; the first run also downloads the onnxruntime aarch64 wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "custom_ops" / "aarch64" / "run_qemu_tests.sh"

pytestmark = [
    pytest.mark.skipif(os.environ.get("BMOE_AARCH64") != "1", reason="set BMOE_AARCH64=1 to run the qemu tests"),
    pytest.mark.skipif(not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-g++")),
                       reason="needs qemu-aarch64 (qemu-user) and aarch64-linux-gnu-g++"),
]


def test_qemu_aarch64_all_variants():
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["sh", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    last = re.findall(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and last, out[-4000:]
    passed, failed = map(int, last[-1])
    assert failed == 0 and passed > 1000, out[-4000:]
    for label in ("BMOE_KERNEL=scalar", "BMOE_KERNEL=neon", "BMOE_KERNEL=dotprod", "sdot executed"):
        assert re.search(rf"{re.escape(label)}.* [1-9]\d* passed, 0 failed", r.stdout), (label, out[-4000:])
