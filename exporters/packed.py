"""Inference forms of the expert banks, holding exactly what is exported.

PackedButterflyExperts  packed trits + row scales, angles in fp32/fp16/int8 → ai.bmoe ops
GatheredExperts         independent experts as one [N, d_out, d_in] table → Gather + MatMul
                        (standard ops; `ternary` experts are stored dequantized, there is
                        no expert-indexed ternary op in ai.bmoe v1)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bmoe_runtime.nn.moe import ButterflyExperts, IndependentExperts
from bmoe_runtime.format.packing import pack_trits
from bmoe_runtime.nn.ternary import quantize

from . import torch_ops  # noqa: F401  (registers torch.ops.bmoe.*)

ANGLE_DTYPES = ("fp32", "fp16", "int8")
# weights quantized and packed at a time: the float temporaries of quantize and pack_trits' int64 ones stay a
# few MiB whatever the matrix (the exporter's bounded memory)
PACK_CHUNK = 1 << 18


def pack_rows(trits: torch.Tensor, packing: str) -> torch.Tensor:
    """pack_trits of [N, K] trits, a chunk of rows at a time (rows pack independently)."""
    t = trits.numpy()
    step = max(1, PACK_CHUNK // max(1, t.shape[1]))
    return torch.from_numpy(np.concatenate([pack_trits(t[r:r + step], packing) for r in range(0, len(t), step)]))


def pack_ternary(w: torch.Tensor, per_row: bool, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed trits [N, Kb] uint8, scales [N] float32) of W [N, K], as quantize + pack_trits, a chunk of rows at
    a time where the scale is per row (a per-tensor scale needs every row at once)."""
    step = max(1, PACK_CHUNK // max(1, w.shape[1])) if per_row else len(w)
    packed, scales = [], []
    for r in range(0, len(w), step):
        trits, scale = quantize(w[r:r + step], per_row)
        packed.append(pack_rows(trits, packing))
        scales.append(scale.float())
    return torch.cat(packed), torch.cat(scales)


def encode_angles(angles: torch.Tensor, active: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[E, S, P/2] float angles → (stored angles, per-expert scale for int8). Unused slots are written as 0."""
    a = torch.where(active, angles.detach().float(), torch.zeros(()))
    if dtype == "fp32":
        return a.contiguous(), None
    if dtype == "fp16":
        return a.half().contiguous(), None
    if dtype == "int8":
        scale = (a.abs().amax(dim=(1, 2)) / 127).clamp_min(1e-12)
        q = torch.round(a / scale[:, None, None]).clamp(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    raise ValueError(f"unknown angle dtype {dtype!r}; expected one of {', '.join(ANGLE_DTYPES)}")


class PackedButterflyExperts(nn.Module):
    def __init__(self, bank: ButterflyExperts, packing: str = "2bit", angle_dtype: str = "fp32", act_quant: bool = False):
        super().__init__()
        self.d_in, self.d_out, self.packing, self.act_quant = bank.d_in, bank.d_out, packing, int(act_quant)
        w_packed, w_scale = pack_ternary(bank.weight, bank.per_row_scale, packing)
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("w_scale", w_scale)
        for side, rot in (("theta", bank.theta), ("phi", bank.phi)):
            angles, angle_scale = encode_angles(rot.angles, rot.active, angle_dtype)
            self.register_buffer(f"{side}_angles", angles)
            self.register_buffer(f"{side}_angle_scale", angle_scale)

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.bmoe
        u = ops.butterfly_rotate(x, self.phi_angles, expert_index, self.phi_angle_scale, 1)
        v = ops.ternary_matmul(u, self.w_packed, self.w_scale, self.d_in, self.packing, self.act_quant)
        return ops.butterfly_rotate(v, self.theta_angles, expert_index, self.theta_angle_scale, 0)


class GatheredExperts(nn.Module):
    def __init__(self, bank: IndependentExperts):
        super().__init__()
        self.register_buffer("expert_weight", bank.weights().detach().float().contiguous())

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        w = torch.index_select(self.expert_weight, 0, expert_index)  # [R, d_out, d_in]: only chosen experts are read
        return (w @ x.unsqueeze(-1)).squeeze(-1)


def pack_banks(module: nn.Module, packing: str, angle_dtype: str, act_quant: bool) -> int:
    """Replace every expert bank inside `module` with its packed form, in place; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ButterflyExperts):
            setattr(module, name, PackedButterflyExperts(child, packing, angle_dtype, act_quant))
            count += 1
        elif isinstance(child, IndependentExperts):
            setattr(module, name, GatheredExperts(child))
            count += 1
        else:
            count += pack_banks(child, packing, angle_dtype, act_quant)
    return count
