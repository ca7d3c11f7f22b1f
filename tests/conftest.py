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


@pytest.fixture(scope="session")
def corpus(data_dir, tmp_path_factory) -> Path:
    """The first 100,000 characters of TinyShakespeare, as one file (small enough for CPU training tests)."""
    src = data_dir / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip(f"TinyShakespeare not found at {src}")
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(src.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A private copy of the bundled model (tests/untrusted_dirs.py), shared by a module's tests."""
    from untrusted_dirs import pristine_copy

    return pristine_copy(tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture
def d(pristine, tmp_path) -> Path:
    """A fresh copy of `pristine` for one test to damage."""
    from untrusted_dirs import fresh_copy

    return fresh_copy(pristine, tmp_path / "model")


def export_random_model(dest: Path, tokenizer) -> Path:
    """A small model exported to dest/x: random weights with angles far from identity (so a wrong rotation
    changes the tokens); greedy decoding only needs a deterministic model."""
    from bmoe_runtime.nn.model import ModelConfig, MoELM
    from bmoe_runtime.train.checkpoint import save_checkpoint
    from exporters import export_checkpoint

    torch.manual_seed(0)
    model = MoELM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=48, n_layers=2, n_heads=4, d_ff=96,
                              n_experts=4, top_k=2, max_seq=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("angles"):
                p.normal_(0, 0.5)
    save_checkpoint(dest / "m.pt", model, tokenizer, {})
    return export_checkpoint(dest / "m.pt", dest / "x")


@pytest.fixture(scope="session")
def bpe_export(tmp_path_factory) -> Path:
    """A small model with a BPE tokenizer (vocabulary 300, trained on a fixed text), exported."""
    from bmoe_runtime.format.tokenizer import BPETokenizer

    text = ("ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
            "JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name.\n") * 20
    return export_random_model(tmp_path_factory.mktemp("bpe"), BPETokenizer.train(text, 300))


@pytest.fixture(scope="session")
def byte_export(tmp_path_factory) -> Path:
    """A small byte-vocabulary model exported by today's exporter (its graph takes attention_mask and
    position_ids too, unlike the bundled model's)."""
    from bmoe_runtime.format.tokenizer import ByteTokenizer

    return export_random_model(tmp_path_factory.mktemp("bytes"), ByteTokenizer())
