"""Compressed exports (exporters/compress.py): int4/int8 blockwise weights through MatMulNBits and
dequantizing Gathers, ternary-trained attention/projection through TernaryMatMul.

References are independent of the exporter: a plain numpy blockwise quantizer with per-element
bit unpacking, a PyTorch model carrying those dequantized weights, and the QAT model's own forward."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ops_reference import use_ort
from bmoe_runtime.backends.contrib_ops import gather_block_quantized, matmul_nbits
from bmoe_runtime.backends.numba_ops import OpError
from bmoe_runtime.nn.model import ModelConfig
from bmoe_runtime.nn.ternary import TernaryLinear, fake_quantize
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.runtime.session import ModelSession
from exporters import ExportOptions, export_checkpoint
from exporters.compress import quantize_blockwise

from test_export import PROMPT, make_checkpoint, torch_logits

needs_ort = pytest.mark.skipif(not use_ort(), reason="C++ op library not built")


def reference_dequantize(blob: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """MatMulNBits' layout decoded element by element: code i of a block is byte i·bits/8, low nibble first."""
    n, k_blocks, blob_size = blob.shape
    block = blob_size * 8 // bits
    w = np.zeros((n, k_blocks * block), np.float64)
    for r in range(n):
        for b in range(k_blocks):
            for i in range(block):
                byte = int(blob[r, b, i * bits // 8])
                code = byte if bits == 8 else (byte >> (4 * (i % 2))) & 0xF
                w[r, b * block + i] = (code - 2 ** (bits - 1)) * float(scales.reshape(n, k_blocks)[r, b])
    return w[:, :k]


def reference_quantized(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Symmetric round-to-nearest per block along K, s = max|w|/(2^(bits-1)−1), in float64."""
    qmax = 2 ** (bits - 1) - 1
    out = np.zeros_like(w, np.float64)
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], block):
            blk = w[r, s:s + block].astype(np.float64)
            step = np.abs(blk).max() / qmax
            out[r, s:s + block] = 0 if step == 0 else np.round(blk / step) * step
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: a padded last block
def test_blockwise_dequantizes_within_half_a_step(bits, k):
    rng = np.random.default_rng(bits * k)
    w = rng.standard_normal((7, k)).astype(np.float32)
    w[3, :32] = 0  # an all-zero block
    blob, scales = quantize_blockwise(w, bits, 32)
    assert blob.shape == (7, -(-k // 32), 32 * bits // 8) and blob.dtype == np.uint8
    deq = reference_dequantize(blob, scales, k, bits)
    step = np.repeat(scales, 32, axis=1)[:, :k]  # each weight's own block step
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    np.testing.assert_allclose(deq, reference_quantized(w, bits, 32), rtol=0, atol=1e-6)
    assert np.all(deq[3, :32] == 0)


def _nbits_model(k: int, n: int, bits: int, block: int, blob, scales, bias, accuracy_level: int) -> bytes:
    inputs = ["a", "b", "s"] + (["", "", "bias"] if bias is not None else [])  # bias is input 5
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(blob, "b"), numpy_helper.from_array(scales, "s")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


@pytest.mark.parametrize("accuracy_level", [0, 4])  # 4: int8 activations per block, as exported
@pytest.mark.parametrize("bits,k,block", [(4, 80, 32), (8, 48, 16), (4, 256, 128)])
def test_matmul_nbits_reference_matches_onnxruntime(bits, k, block, accuracy_level):
    import onnxruntime as ort

    rng = np.random.default_rng(k)
    n = 24
    blob, scales = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), bits, block)
    a = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ours = matmul_nbits(a, blob, scales, None, None, bias, K=k, N=n, bits=bits, block_size=block,
                        accuracy_level=accuracy_level)
    sess = ort.InferenceSession(_nbits_model(k, n, bits, block, blob, scales, bias, accuracy_level),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, sess.run(None, {"a": a})[0], rtol=1e-5, atol=1e-4)
    x = reference_int8_activations(a, block) if accuracy_level == 4 else a.astype(np.float64)
    np.testing.assert_allclose(ours, x @ reference_dequantize(blob, scales, k, bits).T + bias, rtol=1e-5, atol=1e-4)


def test_matmul_nbits_reference_rejects_bad_inputs():
    blob, scales = quantize_blockwise(np.ones((4, 32), np.float32), 4, 32)
    a = np.ones((2, 32), np.float32)
    with pytest.raises(OpError, match="B must be"):
        matmul_nbits(a, blob[:, :, :8], scales, K=32, N=4, bits=4, block_size=32)
    with pytest.raises(OpError, match="A must be"):
        matmul_nbits(a[:, :16], blob, scales, K=32, N=4, bits=4, block_size=32)
    with pytest.raises(OpError, match="scales"):
        matmul_nbits(a, blob, scales[:2], K=32, N=4, bits=4, block_size=32)
    with pytest.raises(OpError, match="bits"):
        matmul_nbits(a, blob, scales, K=32, N=4, bits=3, block_size=32)
    with pytest.raises(OpError, match="zero_points"):
        matmul_nbits(a, blob, scales, np.zeros(4, np.uint8), K=32, N=4, bits=4, block_size=32)


def reference_int8_activations(x: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits accuracy_level 4's view of its input: per block of K, step max|x|/127, nearest int8."""
    out = np.zeros_like(x, np.float64)
    for s in range(0, x.shape[-1], block):
        blk = x[..., s:s + block].astype(np.float64)
        step = np.abs(blk).max(axis=-1, keepdims=True) / 127
        out[..., s:s + block] = np.round(blk / np.where(step > 0, step, 1)) * step
    return out


def _int8_inputs(block: int):
    def hook(module, args):
        return (torch.from_numpy(reference_int8_activations(args[0].numpy(), block).astype(np.float32)),)
    return hook


@pytest.mark.parametrize("bits,k,block", [(4, 80, 32), (8, 48, 16)])
def test_gather_block_quantized_reference_matches_onnxruntime(bits, k, block):
    import onnxruntime as ort

    rng = np.random.default_rng(k)
    blob, scales = quantize_blockwise(rng.standard_normal((30, k)).astype(np.float32), bits, block)
    scales3 = scales[..., None]
    ids = np.array([[0, 29, -1], [7, 7, 3]], np.int64)
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s"], ["y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=2, block_size=block, bits=bits)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(blob, "d"), numpy_helper.from_array(scales3, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = gather_block_quantized(blob, ids, scales3, gather_axis=0, quantize_axis=2, block_size=block, bits=bits)
    np.testing.assert_array_equal(ours, sess.run(None, {"i": ids})[0])
    table = reference_dequantize(blob, scales, k, bits)
    np.testing.assert_allclose(ours.reshape(2, 3, -1)[..., :k], table[ids], rtol=0, atol=1e-6)
    with pytest.raises(OpError, match="indices must be in"):
        gather_block_quantized(blob, np.array([30]), scales3, gather_axis=0, quantize_axis=2, block_size=block,
                               bits=bits)
    with pytest.raises(OpError, match="scales must be"):
        gather_block_quantized(blob, ids, scales, gather_axis=0, quantize_axis=2, block_size=block, bits=bits)


def _with_weights(model, names: dict[str, int], block: int):
    """A copy of `model` whose named weights are replaced by the reference quantization (bits each) and
    whose MatMulNBits products (linears with such weights; the tied head, after ln_f) see int8 inputs."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, bits in names.items():
            w = params[name].numpy()
            params[name].copy_(torch.from_numpy(reference_quantized(w, bits, block).astype(np.float32)))
            owner = modules[name.rsplit(".", 1)[0]]
            if isinstance(owner, torch.nn.Linear):
                owner.register_forward_pre_hook(_int8_inputs(block))
    if "tok_emb.weight" in names:  # ln_f's output feeds only the head
        ref.ln_f.register_forward_hook(lambda m, args, out: _int8_inputs(block)(m, (out,))[0])
    return ref


def _tokens_and_logits(out: Path, backend: str) -> tuple[list[int], np.ndarray]:
    gen = Generator(ModelSession(out, backend=backend))
    logits, _ = gen.step(np.array([PROMPT], np.int64), gen.empty_cache())
    return list(gen.tokens(PROMPT, 24)), logits[0]


def _check_runtimes(out: Path, ref_model) -> None:
    """Numba runtime (and ORT with the C++ ops) against the PyTorch reference: logits and greedy tokens
    (exports with fp32 angles, so the weights under test are the only approximation)."""
    want_logits = torch_logits(ref_model, PROMPT)
    want = ref_model.generate(torch.tensor([PROMPT]), 24)[0, len(PROMPT):].tolist()
    backends = ["numba"] + (["ort"] if use_ort() else [])
    for backend in backends:
        tokens, logits = _tokens_and_logits(out, backend)
        assert np.abs(logits - want_logits).max() <= 1e-4, backend
        assert tokens == want, backend


def test_int4_attention_projection_int8_embeddings(tmp_path):
    # d_model 48: the embedding rows and attention inputs end in a padded block (48 = 32 + 16)
    model = make_checkpoint(tmp_path / "m.pt")
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x", ExportOptions(angle_dtype="fp32", attn="int4", proj="int4", embed="int8"))
    bits = {n: 4 for n, _ in model.named_parameters() if ".attn." in n or ".proj." in n}
    bits.update({"tok_emb.weight": 8, "pos_emb.weight": 8})
    _check_runtimes(out, _with_weights(model, bits, 32))
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not {t.name for t in proto.graph.initializer} & set(bits)  # no fp32 copy left behind
    ops = [n.op_type for n in proto.graph.node]
    # per layer qkv, out, proj; the tied head; token and position lookups
    assert ops.count("MatMulNBits") == 3 * model.cfg.n_layers + 1 and "Transpose" not in ops[-3:]
    assert ops.count("GatherBlockQuantized") == 2
    assert not [n for n in proto.graph.node if n.op_type == "Gather" and "_emb." in n.input[0]]
    # the token table is stored once, shared by the lookup and the head
    assert sum(t.name.startswith("lm.tok_emb.weight_q8") for t in proto.graph.initializer) == 2  # codes + scales


def test_int4_embeddings_block_16(tmp_path):
    model = make_checkpoint(tmp_path / "m.pt", expert_form="ffn")
    out = export_checkpoint(tmp_path / "m.pt", tmp_path / "x", ExportOptions(angle_dtype="fp32", embed="int4", block_size=16))
    _check_runtimes(out, _with_weights(model, {"tok_emb.weight": 4, "pos_emb.weight": 4}, 16))


def test_ternary_trained_attention_and_projection(tmp_path):
    model = make_checkpoint(tmp_path / "q.pt", ternary_attn=True, ternary_proj=True)
    assert isinstance(model.blocks[0].attn.qkv, TernaryLinear) and isinstance(model.blocks[0].moe.proj, TernaryLinear)
    # attention exported ternary (TernaryMatMul), the projection as its dense trits·scale (a plain Gemm)
    out = export_checkpoint(tmp_path / "q.pt", tmp_path / "x", ExportOptions(angle_dtype="fp32", attn="ternary"))
    _check_runtimes(out, model)  # the QAT forward is exactly trits·scale: nothing to approximate
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in proto.graph.node].count("TernaryMatMul") == 3 * model.cfg.n_layers  # 2 attn + experts
    w = model.blocks[0].moe.proj.weight.detach()
    stored = numpy_helper.to_array(next(t for t in onnx.load(str(out / "model.onnx")).graph.initializer
                                        if t.name.endswith("blocks.0.moe.proj.weight")))
    np.testing.assert_allclose(stored, fake_quantize(w).numpy(), rtol=0, atol=1e-7)


def test_ternary_projection_int4_attention_of_a_qat_model(tmp_path):
    """QAT model, projection exported ternary (base3 trits) and attention int4 of its trits·scale."""
    model = make_checkpoint(tmp_path / "q.pt", ternary_attn=True, ternary_proj=True)
    out = export_checkpoint(tmp_path / "q.pt", tmp_path / "x",
                            ExportOptions(packing="base3", angle_dtype="fp32", attn="int4", proj="ternary"))
    dense = copy.deepcopy(model)
    for block in dense.blocks:  # the attention the trained forward saw, as plain linears
        for name in ("qkv", "out"):
            lin = getattr(block.attn, name)
            plain = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
            with torch.no_grad():
                plain.weight.copy_(fake_quantize(lin.weight))
            setattr(block.attn, name, plain)
    _check_runtimes(out, _with_weights(dense, {n: 4 for n, _ in dense.named_parameters() if ".attn." in n}, 32))
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("TernaryMatMul") == 2 * model.cfg.n_layers and ops.count("MatMulNBits") == 2 * model.cfg.n_layers


def test_ternary_linear_trains_through_the_grid():
    torch.manual_seed(0)
    lin = TernaryLinear(16, 8)
    x = torch.randn(4, 16)
    w = lin.weight.detach()
    scale = w.abs().mean(dim=1, keepdim=True)  # absmean per row, as the experts' prototypes
    grid = torch.clamp(torch.round(w / scale), -1, 1) * scale
    y = lin(x)
    torch.testing.assert_close(y, x @ grid.T)
    y.sum().backward()  # straight-through: dL/dW as if W were used directly
    torch.testing.assert_close(lin.weight.grad, torch.ones(8, 4) @ x)


def test_bmoe_train_ternary_parts(data_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bmoe_runtime.cli import train_cli
    from bmoe_runtime.train.checkpoint import load_model

    monkeypatch.setenv("BMOE_CACHE_DIR", str(tmp_path / "tokens"))
    corpus = tmp_path / "c.txt"
    corpus.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000])
    out = tmp_path / "q.pt"
    result = CliRunner().invoke(train_cli, ["--data", str(corpus), "--out", str(out), "--d-model", "32", "--d-ff",
                                            "64", "--layers", "1", "--experts", "4", "--steps", "2", "--eval-every",
                                            "2", "--batch", "2", "--seq", "16", "--ternary", "proj"])
    assert result.exit_code == 0, result.output
    model, _, _ = load_model(out)
    assert model.cfg.ternary_proj and not model.cfg.ternary_attn
    assert isinstance(model.blocks[0].moe.proj, TernaryLinear) and not isinstance(model.blocks[0].attn.qkv,
                                                                                  TernaryLinear)


def test_qat_flag_needs_the_paper_form():
    with pytest.raises(ValueError, match="ternary_proj needs expert_form 'paper'"):
        ModelConfig(expert_form="ffn", ternary_proj=True)


@pytest.mark.parametrize("ckpt,args,message", [
    ("fp32", ["--attn", "ternary"], "--attn ternary needs a checkpoint trained with ternary attention"),
    ("fp32", ["--proj", "ternary", "--attn", "int4"], "--proj ternary needs a checkpoint trained with ternary"),
    ("ffn", ["--proj", "int4"], "--proj int4: this model has no shared projection weights"),
])
def test_cli_bad_combinations_one_line(tmp_path, ckpt, args, message):
    make_checkpoint(tmp_path / "m.pt", **({"expert_form": "ffn"} if ckpt == "ffn" else {}))
    r = subprocess.run([sys.executable, "-m", "exporters.cli", str(tmp_path / "m.pt"), "-o", str(tmp_path / "x"),
                        *args], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2  # "exporting ..." + the error
    assert not (tmp_path / "x").exists()


def test_export_options_reject_unknown_formats():
    with pytest.raises(ValueError, match="unknown attn format"):
        ExportOptions(attn="int2")
    with pytest.raises(ValueError, match="unknown embed format"):
        ExportOptions(embed="ternary")
    with pytest.raises(ValueError, match="block size"):
        ExportOptions(block_size=24)
