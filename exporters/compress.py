"""Compression of the dense weights around the experts, chosen at export.

Components (manifest kinds) and their formats:
  attention, shared_projection   fp32 | int4 (post-training, com.microsoft::MatMulNBits)
                                 | ternary (trained with QAT, ai.bmoe::TernaryMatMul)
  embeddings (token table, tied LM head, positions)
                                 fp32 | int8 | int4: one blockwise table per weight; the head is a
                                 MatMulNBits on it, the lookups com.microsoft::GatherBlockQuantized
                                 on the same bytes, so nothing is stored twice

Two stages: `prepare_linears` swaps a module's ternary-trained linears before graph capture
(ternary → packed TernaryMatMul, otherwise a dense copy of trits·scale); `compress_graph`
rewrites the captured graph's weight-consuming nodes (Gemm, MatMul, Gather) whose weights are
selected for int4/int8. Quantization is symmetric round-to-nearest per block of `block_size`
along K with one fp32 scale per block and MatMulNBits' implicit zero point 2^(bits-1); the
MatMulNBits nodes also quantize their activations to int8 per block (ACCURACY_LEVEL).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import tensor_kind
from bmoe_runtime.nn.ternary import TernaryLinear, fake_quantize

from . import torch_ops  # noqa: F401  (registers torch.ops.bmoe.*)
from .packed import pack_ternary

LINEAR_FORMATS = ("fp32", "int4", "ternary")
EMBED_FORMATS = ("fp32", "int8", "int4")
BITS = {"int4": 4, "int8": 8}
CONTRIB_DOMAIN = "com.microsoft"
# MatMulNBits with int8 activations (per block of K): ORT's fast CPU path, ~2.5x the fp32-compute path at
# 4 bits and its only usable one at 8 bits (60x slower without, 20x slower than fp32), M=1, 4096x1024, 1 thread
ACCURACY_LEVEL = 4
# the CLI option that chooses each component's format (for error messages)
OPTION_OF = {"attention": "--attn", "shared_projection": "--proj", "embeddings": "--embed"}
TRAIN_FLAG_OF = {"attention": "attn", "shared_projection": "proj"}


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W [N, K] → (B [N, k_blocks, block_size·bits/8] uint8, scales [N, k_blocks] float32), MatMulNBits layout.

    Symmetric: code = round(w / s) + 2^(bits-1) with s = max|w| / (2^(bits-1) − 1) over the block;
    K is zero-padded to whole blocks. Rows go in chunks of ~256K weights: the float temporaries stay a few
    MiB whatever the weight's size (the exporter's bounded memory)."""
    n, k = w.shape
    k_blocks = -(-k // block_size)
    codes = np.empty((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((n, k_blocks), np.float32)
    step = max(1, (1 << 18) // (k_blocks * block_size))
    for r in range(0, n, step):
        codes[r:r + step], scales[r:r + step] = _quantize_rows(w[r:r + step], bits, block_size, k_blocks)
    return codes, scales


def _quantize_rows(w: np.ndarray, bits: int, block_size: int, k_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    padded = np.zeros((n, k_blocks * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, k_blocks, block_size)
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(blocks).max(axis=-1) / qmax).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    codes = (np.clip(np.rint(blocks / safe), -qmax, qmax) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales


class PackedTernaryLinear(nn.Module):
    """A ternary-trained linear as exported: packed trits + row scales → ai.bmoe::TernaryMatMul."""

    def __init__(self, linear: TernaryLinear, packing: str, act_quant: bool):
        super().__init__()
        self.k, self.packing, self.act_quant = linear.in_features, packing, int(act_quant)
        trits, scale = pack_ternary(linear.weight, linear.per_row_scale, packing)
        self.register_buffer("trits", trits)
        self.register_buffer("trit_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.bmoe.ternary_matmul(x.reshape(-1, self.k), self.trits, self.trit_scale, self.k, self.packing,
                                          self.act_quant)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _dense_copy(linear: TernaryLinear) -> nn.Linear:
    """The trained forward's weight, trits·scale, as a plain fp32 linear (a Gemm once captured)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=False)
    with torch.no_grad():
        out.weight.copy_(fake_quantize(linear.weight.detach(), linear.per_row_scale))
    return out


def prepare_linears(module: nn.Module, formats: dict[str, str], packing: str, act_quant: bool) -> None:
    """Swap every TernaryLinear inside `module` (in place) for its exported form; refuse a format for a
    component the module does not have, and `ternary` for one that was not trained ternary."""
    present = {tensor_kind(name) for name, _ in module.named_parameters()}
    for kind, fmt in formats.items():
        if kind not in present:
            raise BmoeError(_absent(kind, fmt))
    trained: set[str] = set()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TernaryLinear):
                kind = tensor_kind(_path(module, child) + ".weight")
                trained.add(kind)
                swap = (PackedTernaryLinear(child, packing, act_quant) if formats.get(kind) == "ternary"
                        else _dense_copy(child))
                setattr(parent, name, swap)
    for kind, fmt in formats.items():
        if fmt == "ternary" and kind not in trained:
            raise BmoeError(f"{OPTION_OF[kind]} ternary needs a checkpoint trained with ternary {kind.replace('_', ' ')} "
                            f"(bmoe-train --ternary {TRAIN_FLAG_OF[kind]}); this checkpoint's are fp32: "
                            f"use {OPTION_OF[kind]} int4 or fp32")


def _absent(kind: str, fmt: str) -> str:
    return f"{OPTION_OF.get(kind, kind)} {fmt}: this model has no {kind.replace('_', ' ')} weights to compress"


def _path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


class _Graph:
    """Just enough graph surgery: fresh names, new initializers, node lists."""

    def __init__(self, model: onnx.ModelProto, values: Callable[[onnx.TensorProto], np.ndarray],
                 initializer: Callable[[np.ndarray, str], onnx.TensorProto]):
        self.g = model.graph
        self.values, self.initializer = values, initializer
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.quantized: dict[tuple[str, int], tuple[str, str, int, int]] = {}
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}__q{self._count}"

    def const(self, base: str, value: np.ndarray) -> str:
        key = (base, value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            self._consts[key] = self.name(base)
            self.g.initializer.append(numpy_helper.from_array(value, self._consts[key]))
        return self._consts[key]

    def weight_nk(self, name: str) -> np.ndarray:
        return self.values(self.inits[name]).astype(np.float32, copy=False)  # a view of the deferred tensor

    def quantize(self, weight: str, bits: int, block_size: int, transpose: bool = False) -> tuple[str, str, int, int]:
        """(blob, scales, N, K) of initializer `weight` as [N, K] (transposed first if it is [K, N]); once per weight."""
        key = (weight, bits)
        if key not in self.quantized:
            w = self.weight_nk(weight)
            w = w.T if transpose else w
            blob, scales = quantize_blockwise(w, bits, block_size)
            suffix = f"_q{bits}"
            self.g.initializer.extend([self.initializer(blob, weight + suffix),
                                       self.initializer(scales, weight + suffix + "_scales")])
            self.quantized[key] = (weight + suffix, weight + suffix + "_scales", *w.shape)
        return self.quantized[key]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _matmul_nbits(gr: _Graph, a: str, y: str, weight: str, bits: int, block_size: int, transpose: bool
                  ) -> list[onnx.NodeProto]:
    # scales stay [N, k_blocks] (ORT reads them as [N·k_blocks]), the same table the lookups gather rows of
    blob, scales, n, k = gr.quantize(weight, bits, block_size, transpose)
    return [helper.make_node("MatMulNBits", [a, blob, scales], [y], name=gr.name(weight + "_matmul"),
                             domain=CONTRIB_DOMAIN, K=k, N=n, bits=bits, block_size=block_size,
                             accuracy_level=ACCURACY_LEVEL)]


def _gather_dequantized(gr: _Graph, node: onnx.NodeProto, bits: int, block_size: int) -> list[onnx.NodeProto]:
    """Gather(table, ids) on the quantized table: GatherBlockQuantized (≈2x faster in ORT than the same with
    standard ops, measured), then [..., k_blocks, block] → [..., K]."""
    weight, ids = node.input
    blob, scales, n, k = gr.quantize(weight, bits, block_size)
    k_blocks = -(-k // block_size)
    nm = gr.name
    # its scales are [N, k_blocks, 1]: a view ORT folds into a copy of the (small) scale table
    scales3, rows, ids_shape, shape = (nm(weight + s) for s in ("_scales3", "_rows", "_ids_shape", "_shape"))
    out = [helper.make_node("Unsqueeze", [scales, gr.const("last", np.array([-1], np.int64))], [scales3], name=nm("u")),
           helper.make_node("GatherBlockQuantized", [blob, ids, scales3], [rows], name=nm(weight + "_gather"),
                            domain=CONTRIB_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
           helper.make_node("Shape", [ids], [ids_shape], name=nm("ids_shape")),
           helper.make_node("Concat", [ids_shape, gr.const("padded_k", np.array([k_blocks * block_size], np.int64))],
                            [shape], name=nm("shape"), axis=0)]
    if k_blocks * block_size == k:
        return out + [helper.make_node("Reshape", [rows, shape], [node.output[0]], name=nm("rows"))]
    padded = nm(weight + "_padded")  # drop the padding of the last block
    return out + [helper.make_node("Reshape", [rows, shape], [padded], name=nm("rows")),
                  helper.make_node("Slice", [padded, gr.const("starts", np.array([0], np.int64)),
                                             gr.const("ends", np.array([k], np.int64)),
                                             gr.const("axes", np.array([-1], np.int64))], [node.output[0]],
                                   name=nm("unpad"))]


def _linear_weight(gr: _Graph, node: onnx.NodeProto) -> tuple[str, bool] | None:
    """(initializer, stored as [K, N]) for a Gemm/MatMul y = x·Wᵀ on a constant weight, else None."""
    if node.op_type == "Gemm":
        a = _attrs(node)
        if (len(node.input) == 2 and node.input[1] in gr.inits and a.get("transA", 0) == 0
                and a.get("alpha", 1.0) == 1.0):
            return node.input[1], not a.get("transB", 0)
    elif node.op_type == "MatMul":
        b = node.input[1]
        if b in gr.inits:
            return b, True
        t = gr.producer.get(b)
        if t is not None and t.op_type == "Transpose" and t.input[0] in gr.inits and _attrs(t).get("perm") == [1, 0]:
            return t.input[0], False
    return None


def compress_graph(model: onnx.ModelProto, formats: dict[str, str], block_size: int = 32,
                   values: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array,
                   initializer: Callable[[np.ndarray, str], onnx.TensorProto] = numpy_helper.from_array
                   ) -> dict[str, int]:
    """Rewrite `model` in place: int4/int8 components become MatMulNBits / dequantizing Gathers.
    values / initializer: an initializer's array, a new quantized weight's initializer (the exporter's hold
    weights outside the proto, external.py).
    Returns how many nodes were rewritten per component; refuses a chosen component with no weights."""
    bits_of = {kind: BITS[fmt] for kind, fmt in formats.items() if fmt in BITS}
    if not bits_of:
        return {}
    gr = _Graph(model, values, initializer)
    done = {kind: 0 for kind in bits_of}
    nodes: list[onnx.NodeProto] = []
    for node in gr.g.node:
        new = None
        if node.op_type == "Gather" and node.input[0] in gr.inits and _attrs(node).get("axis", 0) == 0:
            kind = tensor_kind(node.input[0])
            if kind == "embeddings" and kind in bits_of and len(gr.inits[node.input[0]].dims) == 2:
                new = _gather_dequantized(gr, node, bits_of[kind], block_size)
        elif (found := _linear_weight(gr, node)) is not None:
            weight, transposed = found
            kind = tensor_kind(weight)
            if kind in bits_of:
                new = _matmul_nbits(gr, node.input[0], node.output[0], weight, bits_of[kind], block_size, transposed)
        if new is None:
            nodes.append(node)
        else:
            nodes.extend(new)
            done[kind] += 1
    for kind, n in done.items():
        if not n:
            raise BmoeError(_absent(kind, formats[kind]))
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    _drop_unused(gr.g)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return done


def _drop_unused(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (the head's Transpose) and initializers no node reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
