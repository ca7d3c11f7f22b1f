"""bmoe-export in bounded memory (issue 16, part 4) and benchmarks/decode_bytes.py's byte count.

The exporter maps the checkpoint instead of copying it (exporters/mapped.py) and writes each weight
straight from its tensor (exporters/external.py); these tests check that the mapped model is the
checkpoint's model, that the export still computes the PyTorch model's logits, that the peak RSS of
a real `bmoe-export` process stays within 1.5× the checkpoint plus the exporter's fixed cost, and the
per-token byte count against a hand computation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import decode_bytes, export_memory
from benchmarks.decode_bytes import bytes_per_token
from benchmarks.export_memory import export_peak_rss
from benchmarks.results import markers
from bmoe_runtime.format.tokenizer import ByteTokenizer
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.runtime.session import ModelSession
from bmoe_runtime.train.checkpoint import load_model, save_checkpoint
from exporters import ExportOptions, export_checkpoint
from exporters.mapped import load_mapped

REPO = Path(__file__).resolve().parents[1]
PROMPT = list(b"To be, or not")


def checkpoint(path: Path, **cfg) -> MoELM:
    torch.manual_seed(0)
    model = MoELM(ModelConfig(**{**dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, n_experts=4, top_k=2,
                                        max_seq=32), **cfg})).eval()
    with torch.no_grad():  # angles far from identity: a wrong rotation changes the logits
        for name, p in model.named_parameters():
            if name.endswith("angles"):
                p.normal_(0, 0.5)
            elif "ln_" in name:  # distinct norms (identical ones are stored once)
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(path, model, ByteTokenizer(), {})
    return model


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_mapped_model_is_the_checkpoints_and_its_weights_are_file_pages(tmp_path):
    checkpoint(tmp_path / "m.pt", variant="static")  # static: angles are a persistent buffer
    copied, _, _ = load_model(tmp_path / "m.pt")
    mapped, _, _ = load_mapped(tmp_path / "m.pt")
    ref = dict(copied.named_buffers()) | dict(copied.named_parameters())
    got = dict(mapped.named_buffers()) | dict(mapped.named_parameters())
    assert got.keys() == ref.keys() and any(n.endswith(".active") for n in got)  # derived buffers too
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    ranges = file_ranges(tmp_path / "m.pt")
    assert ranges, "the checkpoint is not mapped"
    for name, p in mapped.named_parameters():  # views of the file, not copies
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), name
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(mapped(ids)[0], copied(ids)[0])


@pytest.mark.parametrize("variant,cfg,options", [
    ("butterfly", {}, {}),
    ("dense", {}, {}),
    ("butterfly", {"ternary_attn": True, "ternary_proj": True}, {"attn": "ternary", "proj": "ternary"}),
])
def test_streamed_export_computes_the_torch_models_logits(tmp_path, variant, cfg, options):
    model = checkpoint(tmp_path / "m.pt", variant=variant, **cfg)
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x", ExportOptions(angle_dtype="fp32", **options))
    gen = Generator(ModelSession(out, backend="numba"))
    logits, _ = gen.step(np.array([PROMPT], np.int64), gen.empty_cache())
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT]))[0][0].numpy()
    assert np.abs(logits[0] - ref).max() <= 1e-4


def test_export_peak_rss_is_within_one_and_a_half_checkpoints_plus_its_fixed_cost(tmp_path):
    """Fixed cost: the same export of a tiny checkpoint (interpreter, torch, torch.onnx: ~0.4 GiB). Before
    streaming, a 64 MiB dense checkpoint cost 3.7× its size above that; now ~1×."""
    checkpoint(tmp_path / "tiny.pt", d_model=16, n_layers=1, n_experts=2, d_ff=32)
    baseline = export_peak_rss(tmp_path / "tiny.pt", tmp_path / "x0", [])[0]
    checkpoint(tmp_path / "big.pt", d_model=256, n_layers=2, n_heads=4, d_ff=512, n_experts=64, variant="dense")
    size = (tmp_path / "big.pt").stat().st_size
    assert size > 60 * 2**20
    peak = export_peak_rss(tmp_path / "big.pt", tmp_path / "x1", [])[0]
    assert peak <= 1.5 * size + baseline, (peak / 2**20, size / 2**20, baseline / 2**20)


def test_decode_bytes_per_component_by_hand(tmp_path):
    # d 64: below 64 × 256 weights torch.onnx folds the head's transpose into a second table
    d, layers, d_ff, n, k, vocab, max_seq = 64, 2, 64, 4, 2, 256, 32
    checkpoint(tmp_path / "m.pt", d_model=d)
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x")  # 2bit trits, fp16 angles
    manifest = json.loads((out / "manifest.json").read_text())
    context = 10
    s_ff, s_d = int(math.log2(d_ff)), int(math.log2(d))
    expected = {
        "attention": layers * (3 * d * d + d * d) * 4,  # q/k/v and output projections, fp32, read whole
        "shared_projection": layers * d * d_ff * 4,
        "prototypes": layers * (d_ff * d // 4 + d_ff * 4),  # 4 trits a byte + one fp32 scale a row
        "angles (top-k)": layers * k * (s_ff * d_ff // 2 + s_d * d // 2) * 2,  # θ over d_ff, φ over d; fp16
        "experts (top-k)": 0,
        "router": layers * n * d * 4,
        "embeddings + LM head": vocab * d * 4 + d * 4 + d * 4,  # tied head: the whole table; one token, one position
        "norms, other": (2 * layers + 1) * 2 * d * 4,  # LayerNorm weight + bias
        "KV cache": layers * 2 * context * d * 4,
    }
    assert max_seq == manifest["config"]["max_seq"]
    assert bytes_per_token(manifest, context) == expected


@pytest.mark.parametrize("module,tag", [(export_memory, "export-memory-table"), (decode_bytes, "decode-bytes-table")])
def test_memory_doc_tables_are_generated_from_their_json(module, tag):
    begin, end = markers(tag)
    doc = (REPO / "docs" / "memory.md").read_text(encoding="utf-8")
    res = json.loads((REPO / "docs" / f"{module.__name__.split('.')[-1]}.json").read_text())
    assert f"{begin}\n{module.table(res)}\n{end}" in doc
