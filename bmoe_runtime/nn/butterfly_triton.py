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
def _tile(order_ptr, counts_ptr, E, BM: tl.constexpr, E_PAD: tl.constexpr):
    """Tile t = program_id: the t-th run of ≤ BM rows when each expert's rows are cut into tiles
    (experts in order). Returns (rows in tile, expert, row ids, row mask); past the last tile, 0 rows."""
    t = tl.program_id(0)
    e_ids = tl.arange(0, E_PAD)
    count = tl.load(counts_ptr + e_ids, mask=e_ids < E, other=0)
    tiles = (count + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= t).to(tl.int32))  # this tile's expert (E when past the last tile)
    mine = e_ids == e
    local = t - tl.sum(tl.where(mine, tile_end - tiles, 0))  # tile number inside the expert's run
    row0 = tl.sum(tl.where(mine, tl.cumsum(count, 0) - count, 0)) + local * BM
    n = tl.minimum(tl.sum(tl.where(mine, count, 0)) - local * BM, BM)
    m = tl.arange(0, BM)
    valid = m < n
    rows = tl.load(order_ptr + row0 + m, mask=valid, other=0).to(tl.int64)
    return n, e.to(tl.int64), rows, valid


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, ang_ptr, order_ptr, counts_ptr, E, D, BM: tl.constexpr, E_PAD: tl.constexpr,
                P: tl.constexpr, S: tl.constexpr, TRANSPOSE: tl.constexpr):
    n, e, rows, valid = _tile(order_ptr, counts_ptr, E, BM, E_PAD)
    if n > 0:
        col = tl.arange(0, P)
        offs = rows[:, None] * D + col[None, :]
        mask = valid[:, None] & (col[None, :] < D)
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _rotate(z, ang_ptr + e * (S * (P // 2)), D, BM, P, S, TRANSPOSE)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, gy_ptr, gx_ptr, ang_ptr, gang_ptr, order_ptr, counts_ptr, E, D, BM: tl.constexpr,
                E_PAD: tl.constexpr, P: tl.constexpr, S: tl.constexpr, TRANSPOSE: tl.constexpr):
    n, e, rows, valid = _tile(order_ptr, counts_ptr, E, BM, E_PAD)
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


def tile_shape(p: int, backward: bool) -> tuple[int, int]:
    """(rows per tile, warps): a tile of rows × P values sized by a sweep on an H200 (benchmarks/butterfly_kernel.py,
    8192 rows, 64 experts): large P wants big tiles (fewer cos/sin evaluations and angle atomics per row),
    small P small ones (more programs in flight)."""
    if p >= 2048:
        values = 16384
    elif p >= 1024:
        values = 8192 if not backward else 4096
    else:
        values = 4096 if not backward else 2048
    return max(1, min(64, values // p)), 16 if values >= 16384 else 8


class RowGroups:
    """Rows of a batch grouped by expert on the GPU (no host synchronisation): `order` lists the rows
    expert by expert, `counts` the rows of each expert. The kernels cut each expert's run into tiles
    themselves; the grid is the static bound ceil(M/BM) + E, tiles past the real ones have no rows."""

    def __init__(self, expert_index: torch.Tensor | None, n_rows: int, n_experts: int, device: torch.device):
        self.n_rows, self.n_experts = n_rows, (1 if expert_index is None else n_experts)
        if expert_index is None:
            self.order = torch.arange(n_rows, device=device, dtype=torch.int32)
            self.counts = torch.full((1,), n_rows, device=device, dtype=torch.int32)
        else:
            self.order = torch.argsort(expert_index, stable=True).to(torch.int32)
            self.counts = torch.zeros(n_experts, device=device, dtype=torch.int32).scatter_add_(
                0, expert_index, torch.ones_like(expert_index, dtype=torch.int32))

    def launch_args(self, bm: int) -> tuple[tuple[int], dict]:
        grid = ((self.n_rows + bm - 1) // bm + self.n_experts,)
        return grid, {"BM": bm, "E_PAD": max(16, triton.next_power_of_2(self.n_experts))}


def launch_forward(x, angles, groups: RowGroups, transpose: bool, out_dtype, bm: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    m, d = x.shape
    p, s = padded_size(d), n_stages(d)
    bm0, warps0 = tile_shape(p, backward=False)
    grid, meta = groups.launch_args(bm or bm0)
    y = torch.empty((m, d), device=x.device, dtype=out_dtype)
    if m:
        _fwd_kernel[grid](x, y, angles, groups.order, groups.counts, groups.n_experts, d, P=p, S=s,
                          TRANSPOSE=transpose, num_warps=num_warps or warps0, **meta)
    return y


def launch_backward(x, angles, gy, groups: RowGroups, transpose: bool, bm: int | None = None,
                    num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    m, d = x.shape
    p, s = padded_size(d), n_stages(d)
    bm0, warps0 = tile_shape(p, backward=True)
    grid, meta = groups.launch_args(bm or bm0)
    gx = torch.empty_like(x)
    gang = torch.zeros(angles.shape, device=x.device, dtype=torch.float32)
    if m:
        _bwd_kernel[grid](x, gy, gx, angles, gang, groups.order, groups.counts, groups.n_experts, d, P=p, S=s,
                          TRANSPOSE=transpose, num_warps=num_warps or warps0, **meta)
    return gx, gang


class _ButterflyRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, angles, groups: RowGroups, transpose: bool):
        x, angles = x.contiguous(), angles.contiguous()
        ctx.save_for_backward(x, angles)
        ctx.groups, ctx.transpose = groups, transpose
        return launch_forward(x, angles, groups, transpose, torch.promote_types(x.dtype, angles.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, angles = ctx.saved_tensors
        gx, gang = launch_backward(x, angles, gy.contiguous(), ctx.groups, ctx.transpose)
        return gx, gang.to(angles.dtype), None, None


def butterfly_rotate(x: torch.Tensor, angles: torch.Tensor, groups: RowGroups, transpose: bool = False) -> torch.Tensor:
    """Rotate rows of x [M, d] (CUDA) by their experts' butterflies; angles [E, S, P/2], groups from RowGroups.

    The result has x's dtype promoted with the angles' (as the reference's arithmetic does);
    the arithmetic is float32 whatever the input dtype.
    """
    return _ButterflyRotate.apply(x, angles, groups, transpose)
