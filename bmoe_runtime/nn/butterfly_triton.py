"""Fused ButterflyRotate for CUDA (Triton): one kernel for the forward, one for the backward.

Same math as `butterfly.butterfly_apply` (docs/ops.md): log2(P) stages of Givens rotations in
FFT pairing, pairs reaching into the zero padding left as identity, `transpose` applying the
stages in reverse order with the sine negated. What changes is where the work happens:

- rows are grouped by expert (a sort on the GPU, no host synchronisation) into tiles of
  BLOCK_M rows of ONE expert, so a program computes that expert's cos/sin once per stage from
  the angle table and shares them across its rows: no [rows, S, P/2] tables in HBM;
- a tile's rows stay in registers/shared memory through all log2(P) stages: x is read once
  and y written once;
- the backward recomputes the forward in registers from x (nothing but x is saved), then walks
  the stages back, inverting each rotation (they are orthogonal) while propagating the
  gradient; an angle's gradient is σ·(g_b'·a' − g_a'·b') of its stage's outputs (σ = −1 for
  transpose), summed over the tile's rows in registers and added into the expert's slot with
  one atomic per angle per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bmoe_runtime.format.butterfly_layout import n_stages, padded_size


@triton.jit
def _stage_tables(ang_ptr, s: tl.constexpr, D, P: tl.constexpr, TRANSPOSE: tl.constexpr):
    """cos, signed sin [P/(2h), h] of stage s; inactive pairs (j + h ≥ D) get (1, 0)."""
    h: tl.constexpr = 1 << s
    nb: tl.constexpr = P // (2 * h)
    theta = tl.reshape(tl.load(ang_ptr + s * (P // 2) + tl.arange(0, P // 2)).to(tl.float32), [nb, h])
    j = tl.arange(0, nb)[:, None] * (2 * h) + tl.arange(0, h)[None, :]
    active = j + h < D
    c = tl.where(active, tl.cos(theta), 1.0)
    sn = tl.where(active, tl.sin(theta), 0.0)
    if TRANSPOSE:
        sn = -sn
    return c, sn, active


@triton.jit
def _split(z, BM: tl.constexpr, P: tl.constexpr, s: tl.constexpr):
    """[BM, P] → the two ends (a, b) [BM, P/(2h), h] of every pair of stage s."""
    h: tl.constexpr = 1 << s
    return tl.split(tl.permute(tl.reshape(z, [BM, P // (2 * h), 2, h]), [0, 1, 3, 2]))


@triton.jit
def _merge(a, b, BM: tl.constexpr, P: tl.constexpr):
    """Inverse of _split."""
    return tl.reshape(tl.permute(tl.join(a, b), [0, 1, 3, 2]), [BM, P])


@triton.jit
def _forward_stage(z, ang_ptr, s: tl.constexpr, D, BM: tl.constexpr, P: tl.constexpr, TRANSPOSE: tl.constexpr):
    c, sn, _ = _stage_tables(ang_ptr, s, D, P, TRANSPOSE)
    a, b = _split(z, BM, P, s)
    return _merge(c * a - sn * b, sn * a + c * b, BM, P)


@triton.jit
def _rotate(z, ang_ptr, D, BM: tl.constexpr, P: tl.constexpr, S: tl.constexpr, TRANSPOSE: tl.constexpr):
    if TRANSPOSE:
        for s in tl.static_range(S - 1, -1, -1):
            z = _forward_stage(z, ang_ptr, s, D, BM, P, TRANSPOSE)
    else:
        for s in tl.static_range(0, S):
            z = _forward_stage(z, ang_ptr, s, D, BM, P, TRANSPOSE)
    return z


@triton.jit
def _backward_stage(z, g, ang_ptr, gang_ptr, s: tl.constexpr, D, BM: tl.constexpr, P: tl.constexpr,
                    TRANSPOSE: tl.constexpr):
    """(z, g) = the stage's outputs and their gradient → its inputs and theirs; adds the angles' gradient."""
    c, sn, active = _stage_tables(ang_ptr, s, D, P, TRANSPOSE)
    a, b = _split(z, BM, P, s)
    ga, gb = _split(g, BM, P, s)
    dtheta = tl.sum(gb * a - ga * b, axis=0)
    if TRANSPOSE:
        dtheta = -dtheta
    dtheta = tl.where(active, dtheta, 0.0)
    tl.atomic_add(gang_ptr + s * (P // 2) + tl.arange(0, P // 2), tl.reshape(dtheta, [P // 2]), sem="relaxed")
    z = _merge(c * a + sn * b, c * b - sn * a, BM, P)  # Rᵀ: back to the stage's inputs
    g = _merge(c * ga + sn * gb, c * gb - sn * ga, BM, P)
    return z, g


@triton.jit
def _tile(order_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr, BM: tl.constexpr):
    t = tl.program_id(0)
    n = tl.load(tile_rows_ptr + t)
    e = tl.load(tile_expert_ptr + t).to(tl.int64)
    m = tl.arange(0, BM)
    valid = m < n
    rows = tl.load(order_ptr + tl.load(tile_start_ptr + t) + m, mask=valid, other=0).to(tl.int64)
    return n, e, rows, valid


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, ang_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr, D,
                BM: tl.constexpr, P: tl.constexpr, S: tl.constexpr, TRANSPOSE: tl.constexpr):
    n, e, rows, valid = _tile(order_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr, BM)
    if n > 0:
        col = tl.arange(0, P)
        offs = rows[:, None] * D + col[None, :]
        mask = valid[:, None] & (col[None, :] < D)
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _rotate(z, ang_ptr + e * (S * (P // 2)), D, BM, P, S, TRANSPOSE)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, gy_ptr, gx_ptr, ang_ptr, gang_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr,
                D, BM: tl.constexpr, P: tl.constexpr, S: tl.constexpr, TRANSPOSE: tl.constexpr):
    n, e, rows, valid = _tile(order_ptr, tile_expert_ptr, tile_start_ptr, tile_rows_ptr, BM)
    if n > 0:
        col = tl.arange(0, P)
        offs = rows[:, None] * D + col[None, :]
        mask = valid[:, None] & (col[None, :] < D)
        ang = ang_ptr + e * (S * (P // 2))
        gang = gang_ptr + e * (S * (P // 2))
        z = _rotate(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), ang, D, BM, P, S, TRANSPOSE)
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:  # the applied stages, last first
            for s in tl.static_range(0, S):
                z, g = _backward_stage(z, g, ang, gang, s, D, BM, P, TRANSPOSE)
        else:
            for s in tl.static_range(S - 1, -1, -1):
                z, g = _backward_stage(z, g, ang, gang, s, D, BM, P, TRANSPOSE)
        tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)


def _block_rows(p: int, budget: int) -> int:
    """Rows per tile: about `budget` fp32 values of a tile live at once (no register spills)."""
    return max(1, min(64, budget // p))


def _num_warps(bm: int, p: int) -> int:
    return 8 if bm * p >= 8192 else 4


FWD_BUDGET, BWD_BUDGET = 8192, 4096


class RowGroups:
    """Rows of a batch grouped by expert, computed on the GPU without host synchronisation.

    order lists the rows expert by expert; tiles(bm) cuts each expert's run into tiles of at
    most bm rows. The grid is the static bound ceil(M/bm) + E; tiles past the real ones have 0 rows.
    """

    def __init__(self, expert_index: torch.Tensor | None, n_rows: int, n_experts: int, device: torch.device):
        self.n_rows, self.n_experts = n_rows, n_experts
        if expert_index is None:
            self.order = torch.arange(n_rows, device=device, dtype=torch.int32)
            self.counts = torch.full((1,), n_rows, device=device, dtype=torch.int64)
        else:
            self.order = torch.argsort(expert_index, stable=True).to(torch.int32)
            self.counts = torch.zeros(n_experts, device=device, dtype=torch.int64).scatter_add_(
                0, expert_index, torch.ones_like(expert_index))
        self._tiles: dict[int, tuple[torch.Tensor, ...]] = {}

    def tiles(self, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if bm not in self._tiles:
            counts = self.counts
            per_expert = (counts + bm - 1) // bm
            tile_end = torch.cumsum(per_expert, 0)
            row_start = torch.cumsum(counts, 0) - counts
            t = torch.arange((self.n_rows + bm - 1) // bm + counts.numel(), device=counts.device)
            expert = torch.searchsorted(tile_end, t, right=True).clamp_(max=counts.numel() - 1)
            local = t - (tile_end[expert] - per_expert[expert])
            rows = (counts[expert] - local * bm).clamp(0, bm)
            self._tiles[bm] = (expert.to(torch.int32), (row_start[expert] + local * bm).to(torch.int32),
                               rows.to(torch.int32))
        return self._tiles[bm]


def _launch_fwd(x, angles, groups, transpose, out_dtype):
    m, d = x.shape
    p, s = padded_size(d), n_stages(d)
    bm = _block_rows(p, FWD_BUDGET)
    expert, start, rows = groups.tiles(bm)
    y = torch.empty((m, d), device=x.device, dtype=out_dtype)
    if m:
        _fwd_kernel[(expert.numel(),)](x, y, angles, groups.order, expert, start, rows, d,
                                       BM=bm, P=p, S=s, TRANSPOSE=transpose, num_warps=_num_warps(bm, p))
    return y


class _ButterflyRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, angles, groups: RowGroups, transpose: bool):
        x, angles = x.contiguous(), angles.contiguous()
        ctx.save_for_backward(x, angles)
        ctx.groups, ctx.transpose = groups, transpose
        return _launch_fwd(x, angles, groups, transpose, torch.promote_types(x.dtype, angles.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, angles = ctx.saved_tensors
        m, d = x.shape
        p, s = padded_size(d), n_stages(d)
        bm = _block_rows(p, BWD_BUDGET)
        expert, start, rows = ctx.groups.tiles(bm)
        gx = torch.empty_like(x)
        gang = torch.zeros(angles.shape, device=x.device, dtype=torch.float32)
        if m:
            _bwd_kernel[(expert.numel(),)](x, gy.contiguous(), gx, angles, gang, ctx.groups.order, expert, start, rows,
                                           d, BM=bm, P=p, S=s, TRANSPOSE=ctx.transpose, num_warps=_num_warps(bm, p))
        return gx, gang.to(angles.dtype), None, None


def butterfly_rotate(x: torch.Tensor, angles: torch.Tensor, groups: RowGroups, transpose: bool = False) -> torch.Tensor:
    """Rotate rows of x [M, d] (CUDA) by their experts' butterflies; angles [E, S, P/2], groups from RowGroups.

    The result has x's dtype promoted with the angles' (as the reference's arithmetic does);
    the arithmetic is float32 whatever the input dtype.
    """
    return _ButterflyRotate.apply(x, angles, groups, transpose)
