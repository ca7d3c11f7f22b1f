"""Shared test setup: single-threaded torch and the location of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: intra-op threads only add synchronisation, and on a busy shared
# machine two spinning OpenMP threads make a 4 ms forward take ~300 ms. BMOE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("BMOE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data next to the repository (BMOE_DATA overrides); skips when absent."""
    path = Path(os.environ.get("BMOE_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"corpus directory {path} not found (set BMOE_DATA to the directory holding tinyshakespeare/)")
    return path
