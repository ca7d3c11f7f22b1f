"""README.md's ```python blocks run as written (each in a fresh interpreter, in an empty
directory), so an example cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.S | re.M)


def test_readme_has_python_examples():
    assert BLOCKS, "no ```python block found in README.md"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    script = tmp_path / f"readme_block_{i}.py"
    script.write_text(BLOCKS[i], encoding="utf-8")
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout first, the rest kept
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, f"README python block {i} failed:\n{BLOCKS[i]}\n--- stderr ---\n{r.stderr[-3000:]}"
