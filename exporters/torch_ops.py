"""The ai.bmoe ops as torch custom ops, with their ONNX translations.

During export the expert banks are replaced by packed modules (`packed.py`) that call
these ops on their packed buffers; torch.onnx (dynamo) then emits one ai.bmoe node
per call. Their eager implementations follow docs/ops.md, so the packed model also
runs in PyTorch (used to check a pack before it is written).
"""

from __future__ import annotations

import numpy as np
import onnxscript
import torch

from bmoe_runtime.format import op_schemas
from bmoe_runtime.nn.butterfly import active_pairs, butterfly_apply
from bmoe_runtime.format.packing import unpack_trits

op_schemas.register()  # onnxscript resolves ai.bmoe ops through the registered schemas
_bmoe = onnxscript.values.Opset(op_schemas.DOMAIN, op_schemas.VERSION)


def dequantize_angles(angles: torch.Tensor, angle_scale: torch.Tensor | None) -> torch.Tensor:
    if angles.dtype == torch.int8:
        return angles.float() * angle_scale.float()[:, None, None]
    return angles.float()


@torch.library.custom_op("bmoe::butterfly_rotate", mutates_args=())
def butterfly_rotate(x: torch.Tensor, angles: torch.Tensor, expert_index: torch.Tensor,
                     angle_scale: torch.Tensor | None, transpose: int) -> torch.Tensor:
    theta = dequantize_angles(angles, angle_scale)
    active = active_pairs(x.shape[1])
    c = torch.where(active, torch.cos(theta), torch.ones_like(theta))
    s = torch.where(active, torch.sin(theta), torch.zeros_like(theta))
    return butterfly_apply(x, c[expert_index], s[expert_index], bool(transpose))


@butterfly_rotate.register_fake
def _(x, angles, expert_index, angle_scale, transpose):
    return torch.empty_like(x)


@torch.library.custom_op("bmoe::ternary_matmul", mutates_args=())
def ternary_matmul(a: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, k: int, packing: str,
                   act_quant: int) -> torch.Tensor:
    trits = torch.from_numpy(unpack_trits(w_packed.numpy(), k, packing).astype(np.float32))
    if act_quant:
        amax = a.abs().amax(dim=1, keepdim=True)
        s = amax / 127
        q = torch.where(amax > 0, torch.clamp(torch.sign(a) * torch.floor(a.abs() / torch.where(amax > 0, s, 1) + 0.5),
                                              -127, 127), 0)
        return (q @ trits.T) * s * scale
    return (a @ trits.T) * scale


@ternary_matmul.register_fake
def _(a, w_packed, scale, k, packing, act_quant):
    return a.new_empty(a.shape[0], w_packed.shape[0])


def _butterfly_rotate_onnx(x, angles, expert_index, angle_scale, transpose: int):
    if angle_scale is None:
        return _bmoe.ButterflyRotate(x, angles, expert_index, transpose=transpose)
    return _bmoe.ButterflyRotate(x, angles, expert_index, angle_scale, transpose=transpose)


def _ternary_matmul_onnx(a, w_packed, scale, k: int, packing: str, act_quant: int):
    return _bmoe.TernaryMatMul(a, w_packed, scale, K=k, packing=packing, act_quant=act_quant)


TRANSLATIONS = {
    torch.ops.bmoe.butterfly_rotate.default: _butterfly_rotate_onnx,
    torch.ops.bmoe.ternary_matmul.default: _ternary_matmul_onnx,
}
