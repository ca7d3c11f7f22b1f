"""The LM: KV cache, generation, config validation, checkpoints, memory accounting."""

from __future__ import annotations


import pytest
import torch

from bmoe_runtime.train.checkpoint import (CheckpointError, content_sha256, load_model, read_checkpoint,
                                           save_checkpoint)
from bmoe_runtime.nn.memory import model_memory, paper_expert_ratio
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.nn.moe import VARIANTS
from bmoe_runtime.format.tokenizer import ByteTokenizer

TINY = dict(vocab_size=64, d_model=24, n_layers=2, n_heads=3, d_ff=40, n_experts=4, top_k=2, max_seq=32)


def tiny_model(seed: int = 0, **over) -> MoELM:
    torch.manual_seed(seed)
    model = MoELM(ModelConfig(**{**TINY, **over}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("angles"):
                p.normal_(0, 0.5)
    return model.eval()


def ids(b: int, t: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["paper", "ffn"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant, form):
    model = tiny_model(variant=variant, expert_form=form)
    x = ids(2, 12)
    with torch.no_grad():
        full, cache = model(x)
        assert full.shape == (2, 12, 64)
        assert len(cache) == 2 and cache[0][0].shape == (2, 3, 12, 8)
        # prefix of 5, then one token at a time
        logits, past = model(x[:, :5])
        parts = [logits]
        for t in range(5, 12):
            logits, past = model(x[:, t:t + 1], past)
            parts.append(logits)
        inc = torch.cat(parts, dim=1)
        assert (inc - full).abs().max().item() <= 1e-5
        # prefix of 3, then a chunk of 9
        a, past = model(x[:, :3])
        b, past = model(x[:, 3:], past)
        assert (torch.cat((a, b), 1) - full).abs().max().item() <= 1e-5
        assert past[1][1].shape[2] == 12


def test_causality():
    model = tiny_model()
    x = ids(1, 10)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 64
    with torch.no_grad():
        lx, _ = model(x)
        ly, _ = model(y)
    assert torch.equal(lx[:, :7], ly[:, :7])
    assert (lx[:, 7:] - ly[:, 7:]).abs().max() > 1e-4


def test_generate_greedy_deterministic_and_consistent():
    model = tiny_model()
    prompt = ids(2, 4, seed=3)
    out1 = model.generate(prompt, 10)
    out2 = model.generate(prompt, 10)
    assert out1.shape == (2, 14)
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :4], prompt)
    # greedy with the cache = argmax of a full forward over the growing sequence
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), 1)
    assert torch.equal(seq, out1)


def test_generate_sampled_is_seeded_and_checks_length():
    model = tiny_model()
    prompt = ids(1, 3)
    a = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_seq"):
        model.generate(prompt, 30)


@pytest.mark.parametrize("bad, match", [
    (dict(variant="sparse"), "unknown variant"),
    (dict(expert_form="glu"), "unknown expert form"),
    (dict(d_model=25), "divisible"),
    (dict(top_k=5), "top_k"),
    (dict(n_experts=0), "n_experts"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=0), "n_layers"),
    (dict(max_seq=0), "max_seq"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **bad})


def test_config_dict_round_trip():
    cfg = ModelConfig(**TINY, variant="static", expert_form="ffn", per_row_scale=False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_kv_heads": 2})


def test_dropout_acts_in_training_only():
    """Training-mode outputs differ between calls (seeded: repeatable); eval mode is exactly the model without
    dropout, so an export (eval mode) of a model trained with dropout computes what it was trained towards."""
    torch.manual_seed(0)
    with_drop = MoELM(ModelConfig(**TINY, dropout=0.2, router_noise=0.0))
    without = MoELM(ModelConfig(**TINY, router_noise=0.0))
    without.load_state_dict(with_drop.state_dict())
    ids = torch.randint(0, TINY.get("vocab_size", 256), (2, 12))
    with_drop.train()
    torch.manual_seed(1)
    a = with_drop(ids)[0]
    torch.manual_seed(1)
    assert torch.equal(a, with_drop(ids)[0])
    assert not torch.allclose(a, with_drop(ids)[0])
    with_drop.eval(), without.eval()
    torch.testing.assert_close(with_drop(ids)[0], without(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["butterfly", "static", "ternary"])
def test_checkpoint_round_trip(tmp_path, variant):
    model = tiny_model(variant=variant, expert_form="ffn")
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, ByteTokenizer(), {"valid": {"loss": 1.5}}, train_state={"step": 3})
    raw = torch.load(path, weights_only=True)  # plain data: no pickled code
    assert raw["format"] == "bmoe-checkpoint" and raw["version"] == 1
    assert raw["config"] == model.cfg.to_dict()
    assert raw["tokenizer"] == {"kind": "byte"}
    assert raw["metrics"]["valid"]["loss"] == 1.5 and raw["train_state"]["step"] == 3
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())  # atomic write left no temp file
    loaded, tok, ckpt = load_model(path)
    assert not loaded.training
    assert isinstance(tok, ByteTokenizer)
    assert loaded.cfg == model.cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = ids(2, 9)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert read_checkpoint(path)["metrics"] == {"valid": {"loss": 1.5}}


def _corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, tiny_model(), ByteTokenizer(), {})
    data = good.read_bytes()
    files = {}
    files["foreign"] = tmp_path / "foreign.pt"
    torch.save({"foo": 1}, files["foreign"])
    files["list"] = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], files["list"])
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["head"] = tmp_path / "head.pt"
    files["head"].write_bytes(data[:100])
    files["random"] = tmp_path / "random.pt"
    files["random"].write_bytes(bytes((i * 97 + 13) % 256 for i in range(2048)))
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "text.pt"
    files["text"].write_text("not a checkpoint\n")
    return files


def test_bad_checkpoints_raise_checkpoint_error(tmp_path):
    for kind, path in _corrupt_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg and len(msg) < 400, (kind, msg)
        if kind in ("foreign", "list"):
            assert "not a bmoe checkpoint" in msg
        else:
            assert "not a readable checkpoint" in msg, (kind, msg)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path)  # a directory


def test_checkpoint_version_and_mismatch(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, tiny_model(), ByteTokenizer(), {})
    ck = torch.load(good, weights_only=True)
    ck["version"] = 99
    torch.save(ck, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(tmp_path / "v99.pt")
    ck = torch.load(good, weights_only=True)
    ck["config"]["d_ff"] = 48
    torch.save(ck, tmp_path / "edited.pt")  # edited without a new checksum
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_model(tmp_path / "edited.pt")
    ck["checksum"] = {"sha256": content_sha256(ck)}  # a consistent file whose config does not fit its tensors
    torch.save(ck, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_model(tmp_path / "shape.pt")
    assert "size mismatch" in str(info.value) and "\n" not in str(info.value)
    ck = torch.load(good, weights_only=True)
    ck["tokenizer"] = {"kind": "sentencepiece"}
    ck["checksum"] = {"sha256": content_sha256(ck)}
    torch.save(ck, tmp_path / "tok.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "tok.pt")


@pytest.mark.parametrize("n, ratio", [(8, 79.10), (16, 104.65), (64, 138.10), (256, 150.09)])
def test_paper_expert_ratio(n, ratio):
    assert round(paper_expert_ratio(n), 2) == ratio
    # independent count: N dense fp32 2048×512 vs 1.58-bit prototype + fp16 angles (11·1024 + 9·256 per expert)
    dense = n * 2048 * 512 * 4
    compressed = 2048 * 512 * 1.58 / 8 + n * (11 * 1024 + 9 * 256) * 2
    assert paper_expert_ratio(n) == pytest.approx(dense / compressed, rel=1e-12)


@pytest.mark.parametrize("form", ["paper", "ffn"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_memory_components(variant, form):
    cfg = ModelConfig(**{**TINY, "variant": variant, "expert_form": form})
    mem = model_memory(cfg)
    parts = {k: v for k, v in mem.items() if k != "total"}
    assert all(v >= 0 for v in parts.values())
    assert mem["total"] == pytest.approx(sum(parts.values()), rel=1e-12)
    for k in ("router", "attention", "embeddings"):
        assert parts[k] > 0
    if variant in ("butterfly", "static"):
        assert parts["prototypes"] > 0 and parts["angles"] > 0 and parts["experts"] == 0
    else:
        assert parts["experts"] > 0 and parts["prototypes"] == 0 and parts["angles"] == 0
    assert (parts["shared_projection"] > 0) == (form == "paper")
    # fp32 dense parts agree with the actual parameter counts
    model = MoELM(cfg)
    n_emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel() + 2 * cfg.d_model
    assert parts["embeddings"] == 4 * n_emb
    assert parts["router"] == 4 * sum(b.moe.router.gate.weight.numel() for b in model.blocks)
    if variant == "dense":
        n_exp = sum(p.numel() for n, p in model.named_parameters() if ".moe.up." in n or ".moe.down." in n
                    or ".moe.experts." in n)
        assert parts["experts"] == 4 * n_exp


# Hand-computed bytes for TINY (vocab 64, d 24, 2 layers, d_ff 40, 4 experts, max_seq 32), 1.58-bit trits, fp16 angles.
# butterfly over 24: P 32, 5 stages × 16 pairs = 80 angles; over 40: P 64, 6 × 32 = 192 angles.
# One bank 24→40 (paper form): prototype 40·24·1.58/8 = 189.6 B of trits + 40 fp32 row scales (160 B) = 349.6 B;
# angles 4 experts · (192 + 80) · 2 B = 2176 B. ffn form adds the bank 40→24: 189.6 + 24·4 = 285.6 B, 2176 B.
DENSE_PARTS = {
    "router": 2 * 4 * 24 * 4,  # 768: L · N · d fp32
    "attention": 2 * (4 * 24 * 24 + 4 * 24) * 4,  # 19200: qkv + out (no bias) + two LayerNorms (w, b)
    "embeddings": (64 + 32) * 24 * 4 + 2 * 24 * 4,  # 9408: token + position (tied head) + final LayerNorm
}
MEMORY_BY_HAND = {
    ("butterfly", "paper"): {"prototypes": 2 * 349.6, "angles": 2 * 2176, "experts": 0, "shared_projection": 7680},
    ("butterfly", "ffn"): {"prototypes": 2 * (349.6 + 285.6), "angles": 2 * 2 * 2176, "experts": 0,
                           "shared_projection": 0},
    # dense: 4 fp32 experts of 24·40 per bank per layer = 15360 B
    ("dense", "paper"): {"prototypes": 0, "angles": 0, "experts": 2 * 15360, "shared_projection": 7680},
    ("dense", "ffn"): {"prototypes": 0, "angles": 0, "experts": 2 * 2 * 15360, "shared_projection": 0},
    # ternary: 4 independent 1.58-bit experts with their own row scales
    ("ternary", "ffn"): {"prototypes": 0, "angles": 0, "experts": 2 * 4 * (349.6 + 285.6), "shared_projection": 0},
}


@pytest.mark.parametrize("variant, form", list(MEMORY_BY_HAND))
def test_model_memory_hand_computed(variant, form):
    mem = model_memory(ModelConfig(**{**TINY, "variant": variant, "expert_form": form}))
    expected = {**DENSE_PARTS, **MEMORY_BY_HAND[variant, form]}
    expected["total"] = sum(expected.values())
    assert mem.keys() == expected.keys()
    for k, v in expected.items():
        assert mem[k] == pytest.approx(v, rel=1e-12, abs=1e-9), k


def test_model_memory_angle_and_trit_widths():
    cfg = ModelConfig(**{**TINY, "variant": "butterfly", "expert_form": "paper"})
    int8_2bit = model_memory(cfg, trit_bits=2.0, angle_bytes=1)
    assert int8_2bit["angles"] == 2 * 4 * (192 + 80) * 1
    assert int8_2bit["prototypes"] == pytest.approx(2 * (40 * 24 * 2 / 8 + 40 * 4), rel=1e-12)


def test_model_memory_butterfly_is_smaller():
    base = {**TINY, "d_model": 64, "d_ff": 256, "n_heads": 4, "n_experts": 16}
    dense = model_memory(ModelConfig(**base, variant="dense"))
    bfly = model_memory(ModelConfig(**base, variant="butterfly"))
    bfly_experts = bfly["prototypes"] + bfly["angles"]
    assert bfly_experts * 20 < dense["experts"]
