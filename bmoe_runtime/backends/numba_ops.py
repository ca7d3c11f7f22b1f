"""Reference implementations of the ai.bmoe ops (docs/ops.md) in Numba.

Readable first, parallel over rows/columns where it pays. Every input is validated as
the spec lists; violations raise OpError, never an out-of-bounds read.

ButterflyRotate's streamed form (docs/ops.md) reads each expert's angles from a file on
demand into a bounded LRU (AngleStream); its counters are angle_cache_stats().
AnglePrefetch (router look-ahead) fills the AngleStream shared by cache_key
(AngleStream.shared) with the experts a later layer is predicted to use (angle_prefetch).
"""

from __future__ import annotations

import os
import stat
import threading
import weakref
from collections import OrderedDict

import numpy as np
from numba import njit, prange

from bmoe_runtime.format.butterfly_layout import active_mask, angle_shape, n_stages, padded_size
from bmoe_runtime.errors import OpError  # noqa: F401  (raised here; numba_ops.OpError is public)
from bmoe_runtime.format.packing import TRITS_PER_BYTE, packed_cols


def _lut(packing: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte → its trits [256, per] and an invalid-byte flag [256]."""
    per = TRITS_PER_BYTE[packing]
    lut = np.zeros((256, per), np.int8)
    bad = np.zeros(256, np.bool_)
    for b in range(256):
        for i in range(per):
            if packing == "2bit":
                code = (b >> (2 * i)) & 3
                bad[b] |= code == 3
                lut[b, i] = {0: 0, 1: 1, 2: -1, 3: 0}[code]
            else:
                bad[b] = b > 242
                lut[b, i] = (b // 3 ** i) % 3 - 1
    return lut, bad


_LUTS = {p: _lut(p) for p in TRITS_PER_BYTE}


def _ternary_rows(a_t, packed, lut, bad, k_len):  # a_t [K, M] (float32 or int32) → acc [M, N], invalid flag per row
    m = a_t.shape[1]
    n_rows, per = packed.shape[0], lut.shape[1]
    acc = np.zeros((m, n_rows), a_t.dtype)
    invalid = np.zeros(n_rows, np.bool_)
    for n in prange(n_rows):
        col = np.zeros(m, a_t.dtype)
        for kb in range(packed.shape[1]):
            byte = packed[n, kb]
            if bad[byte]:
                invalid[n] = True
            for i in range(per):
                k = kb * per + i
                if k >= k_len:
                    break
                t = lut[byte, i]
                if t == 1:
                    for r in range(m):
                        col[r] += a_t[k, r]
                elif t == -1:
                    for r in range(m):
                        col[r] -= a_t[k, r]
        acc[:, n] = col
    return acc, invalid


def ternary_matmul(a: np.ndarray, w_packed: np.ndarray, scale: np.ndarray, k: int, packing: str = "2bit",
                   act_quant: int = 0) -> np.ndarray:
    if packing not in TRITS_PER_BYTE:
        raise OpError(f"TernaryMatMul: packing must be '2bit' or 'base3', got {packing!r}")
    if act_quant not in (0, 1):
        raise OpError(f"TernaryMatMul: act_quant must be 0 or 1, got {act_quant}")
    if k is None or k < 1:
        raise OpError(f"TernaryMatMul: attribute K must be ≥ 1, got {k}")
    a, w_packed, scale = np.asarray(a), np.asarray(w_packed), np.asarray(scale)
    if a.dtype != np.float32 or a.ndim != 2:
        raise OpError(f"TernaryMatMul: A must be 2-D float32, got {a.dtype} with shape {a.shape}")
    if a.shape[1] != k:
        raise OpError(f"TernaryMatMul: A has {a.shape[1]} columns, attribute K is {k}")
    if w_packed.dtype != np.uint8 or w_packed.ndim != 2 or w_packed.shape[0] < 1:
        raise OpError(f"TernaryMatMul: W_packed must be 2-D uint8 [N≥1, Kb], got {w_packed.dtype} {w_packed.shape}")
    kb = packed_cols(k, packing)
    if w_packed.shape[1] != kb:
        raise OpError(f"TernaryMatMul: W_packed has {w_packed.shape[1]} bytes a row, K={k} with {packing} needs {kb}")
    n = w_packed.shape[0]
    if scale.dtype != np.float32 or scale.shape != (n,):
        raise OpError(f"TernaryMatMul: scale must be float32 [{n}], got {scale.dtype} {scale.shape}")
    lut, bad = _LUTS[packing]
    kernel = _ternary_kernels[a.shape[0] * n * k >= PARALLEL_MIN_WORK]
    if act_quant:
        amax = np.abs(a).max(axis=1, keepdims=True) if a.shape[0] else np.zeros((0, 1), np.float32)
        s = (amax / np.float32(127)).astype(np.float32)
        safe = np.where(amax > 0, s, np.float32(1))
        q = np.clip(np.sign(a) * np.floor(np.abs(a) / safe + np.float32(0.5)), -127, 127).astype(np.int32)
        acc, invalid = kernel(np.ascontiguousarray(q.T), np.ascontiguousarray(w_packed), lut, bad, k)
        y = acc.astype(np.float32) * s * scale[None, :]
    else:
        acc, invalid = kernel(np.ascontiguousarray(a.T), np.ascontiguousarray(w_packed), lut, bad, k)
        y = acc * scale[None, :]
    if invalid.any():
        raise OpError(f"TernaryMatMul: invalid trit code in W_packed row {int(np.argmax(invalid))}")
    return y.astype(np.float32, copy=False)


def _rotate_rows(x, cos_t, sin_t, row_table, transpose):
    m, d = x.shape
    n_stages = cos_t.shape[1]
    p = 1 << n_stages
    y = np.empty_like(x)
    for r in prange(m):
        z = np.zeros(p, np.float32)
        z[:d] = x[r]
        e = row_table[r]
        for step in range(n_stages):
            s = n_stages - 1 - step if transpose else step
            h = 1 << s
            for k in range(p // 2):
                j = ((k >> s) << (s + 1)) | (k & (h - 1))
                c = cos_t[e, s, k]
                sn = -sin_t[e, s, k] if transpose else sin_t[e, s, k]
                a, b = z[j], z[j + h]
                z[j] = c * a - sn * b
                z[j + h] = sn * a + c * b
        y[r] = z[:d]
    return y


# Each kernel in a serial and a parallel build: for decode-sized work the thread pool's
# start-up costs more than the work itself.
PARALLEL_MIN_WORK = 1 << 20
_ternary_kernels = (njit(cache=True)(_ternary_rows), njit(parallel=True, cache=True)(_ternary_rows))
_rotate_kernels = (njit(cache=True)(_rotate_rows), njit(parallel=True, cache=True)(_rotate_rows))


def _cos_sin(theta: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [..., S, P/2] of float32 angles; inactive pairs hold 1 and 0."""
    active = active_mask(d)
    return (np.where(active, np.cos(theta), np.float32(1)).astype(np.float32),
            np.where(active, np.sin(theta), np.float32(0)).astype(np.float32))


def _check_x(x: np.ndarray, transpose: int) -> tuple[int, int, int, int]:
    if transpose not in (0, 1):
        raise OpError(f"ButterflyRotate: transpose must be 0 or 1, got {transpose}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] < 2:
        raise OpError(f"ButterflyRotate: X must be 2-D float32 with D ≥ 2, got {x.dtype} {x.shape}")
    m, d = x.shape
    return m, d, padded_size(d), n_stages(d)


def _check_index_scale(m: int, e_count: int, dtype, expert_index, angle_scale):
    if expert_index is None:
        if e_count != 1:
            raise OpError(f"ButterflyRotate: expert_index omitted but angles hold {e_count} experts")
        expert_index = np.zeros(m, np.int64)
    expert_index = np.asarray(expert_index)
    if expert_index.dtype != np.int64 or expert_index.shape != (m,):
        raise OpError(f"ButterflyRotate: expert_index must be int64 [{m}], got {expert_index.dtype} {expert_index.shape}")
    out_of_range = (expert_index < 0) | (expert_index >= e_count)
    if out_of_range.any():
        r = int(np.argmax(out_of_range))
        raise OpError(f"ButterflyRotate: expert_index[{r}] = {int(expert_index[r])} is out of range [0, {e_count})")
    if dtype == np.int8:
        if angle_scale is None:
            raise OpError("ButterflyRotate: int8 angles need angle_scale")
        angle_scale = np.asarray(angle_scale)
        if angle_scale.dtype != np.float32 or angle_scale.shape != (e_count,):
            raise OpError(f"ButterflyRotate: angle_scale must be float32 [{e_count}], got {angle_scale.dtype} {angle_scale.shape}")
    elif angle_scale is not None:
        raise OpError("ButterflyRotate: angle_scale is only allowed with int8 angles")
    return expert_index, angle_scale


def butterfly_rotate(x: np.ndarray, angles: np.ndarray, expert_index: np.ndarray | None = None,
                     angle_scale: np.ndarray | None = None, transpose: int = 0) -> np.ndarray:
    x, angles = np.asarray(x), np.asarray(angles)
    m, d, p, s_count = _check_x(x, transpose)
    if angles.dtype not in (np.float32, np.float16, np.int8) or angles.ndim != 3:
        raise OpError(f"ButterflyRotate: angles must be 3-D float32/float16/int8, got {angles.dtype} {angles.shape}")
    e_count = angles.shape[0]
    if e_count < 1 or angles.shape[1:] != (s_count, p // 2):
        raise OpError(f"ButterflyRotate: angles shape {angles.shape} does not fit D={d}: expected [E≥1, {s_count}, {p // 2}]")
    expert_index, angle_scale = _check_index_scale(m, e_count, angles.dtype, expert_index, angle_scale)
    # cos/sin once per expert that this call uses
    used, row_table = np.unique(expert_index, return_inverse=True)
    theta = angles[used].astype(np.float32)
    if angles.dtype == np.int8:
        theta *= angle_scale[used][:, None, None]
    cos_t, sin_t = _cos_sin(theta, d)
    kernel = _rotate_kernels[m * p * s_count >= PARALLEL_MIN_WORK]
    return kernel(np.ascontiguousarray(x), cos_t, sin_t, row_table.astype(np.int64), bool(transpose))


# ------------------------------------------------------------------ streamed angles

ANGLE_DTYPES = {1: np.dtype(np.float32), 10: np.dtype(np.float16), 3: np.dtype(np.int8)}  # ONNX TensorProto codes
_stats = {"hits": 0, "misses": 0, "bytes_read": 0, "prefetches": 0, "prefetch_hits": 0}
_stats_lock = threading.Lock()


def angle_cache_stats() -> dict[str, int]:
    """Totals over every AngleStream of the process: (call, expert) look-ups hit/missed, angle bytes read,
    experts read by AnglePrefetch (bytes in bytes_read, not in misses) and first hits on them."""
    with _stats_lock:
        return dict(_stats)


def angle_cache_reset() -> None:
    with _stats_lock:
        for k in _stats:
            _stats[k] = 0


def _count(**kw: int) -> None:
    with _stats_lock:
        for k, v in kw.items():
            _stats[k] += v


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_model_file(model_dir: str, file: str, what: str) -> tuple[int, int]:
    """(fd, size) of `file` opened for reading inside `model_dir`, by the library's rules
    (custom_ops/src/model_file.cc, docs/ops.md): relative, or absolute inside the directory;
    ".." may not climb out; no component may be a symbolic link; only a regular file, and a
    FIFO or device is refused without blocking. OpError otherwise."""
    named = f"ButterflyRotate: {what} '{file}'"
    if not file or "\0" in file:
        raise OpError(f"{named} is not a valid path")
    if os.path.isabs(file):
        norm = os.path.normpath(file)
        rel = None
        for base in (os.path.abspath(model_dir), os.path.realpath(model_dir)):
            if norm.startswith(base.rstrip("/") + "/"):
                rel = norm[len(base.rstrip("/")) + 1:]
                break
        if rel is None:
            raise OpError(f"{named} is outside the model directory '{model_dir}'")
    else:
        rel = os.path.normpath(file)
        if rel == "." or rel == ".." or rel.startswith("../"):
            raise OpError(f"{named} leaves the model directory '{model_dir}'")
    parts = rel.split("/")
    shown = os.path.join(model_dir, *parts)
    try:
        fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OpError(f"{named}: cannot open the model directory '{model_dir}': {exc.strerror}") from None
    try:
        for i, part in enumerate(parts):
            last = i + 1 == len(parts)
            try:  # look before opening: a FIFO or device is refused without ever being opened
                mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
            except OSError as exc:
                raise OpError(f"ButterflyRotate: cannot open {what} '{file}' ('{shown}'): {exc.strerror}") from None
            if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
                raise OpError(f"{named}: '{part}' is {_kind(mode)} " + (
                    "(must be a regular file)" if last else "(must be a directory; links are not followed)"))
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise OpError(f"ButterflyRotate: cannot open {what} '{file}' ('{shown}'): {exc.strerror}") from None
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OpError(f"{named} is {_kind(st.st_mode)} (must be a regular file)")
        os.set_blocking(fd, True)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


_registry: "weakref.WeakValueDictionary[str, AngleStream]" = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


class AngleStream:
    """The streamed angles of one ButterflyRotate node: expert e's slice [S, P/2] of an
    [E, S, P/2] table at `offset` in `path`, read with os.pread on a miss into an LRU of
    at most `slots` experts' cos/sin tables. Thread-safe; the file is opened once.
    Nodes with the same cache_key share one (AngleStream.shared)."""

    @classmethod
    def shared(cls, key: str | None, path: str, offset: int, experts: int, dtype_code: int, slots: int,
               op: str = "ButterflyRotate", model_dir: str | None = None,
               file_size: int | None = None) -> "AngleStream":
        """A new stream (key empty), or the live one registered under `key` (created if none);
        OpError if that one was opened with other parameters."""
        if not key:
            return cls(path, offset, experts, dtype_code, slots, model_dir, file_size)
        with _registry_lock:
            s = _registry.get(key)
            if s is None:
                s = cls(path, offset, experts, dtype_code, slots, model_dir, file_size)
                _registry[key] = s
            elif s.params != (model_dir, path, offset, file_size, experts, ANGLE_DTYPES.get(dtype_code), slots):
                raise OpError(f"{op}: cache_key '{key}' is already used by a node with other angle_file, "
                              f"angle_offset, angle_file_size, angle_experts, angle_dtype or cache_slots")
            return s

    def __init__(self, path: str, offset: int, experts: int, dtype_code: int, slots: int,
                 model_dir: str | None = None, file_size: int | None = None):
        """`path` is opened inside `model_dir` (open_model_file; None: the file's own directory)
        and must have exactly `file_size` bytes (None: any size that holds the experts)."""
        if offset is None or offset < 0:
            raise OpError(f"ButterflyRotate: attribute angle_offset must be ≥ 0, got {offset}")
        if experts is None or experts < 1:
            raise OpError("ButterflyRotate: attribute angle_experts is required with angle_file and must be ≥ 1")
        if dtype_code not in ANGLE_DTYPES:
            raise OpError(f"ButterflyRotate: attribute angle_dtype must be 1 (float32), 10 (float16) or 3 (int8), "
                          f"got {dtype_code}")
        if slots is None or slots < 1:
            raise OpError("ButterflyRotate: attribute cache_slots is required with angle_file and must be ≥ 1")
        if file_size is not None and file_size < 0:
            raise OpError(f"ButterflyRotate: attribute angle_file_size is required with angle_file and must be ≥ 0, "
                          f"got {file_size}")
        self.params = (model_dir, path, offset, file_size, experts, ANGLE_DTYPES[dtype_code], slots)
        self.path, self.offset, self.experts, self.slots = path, int(offset), int(experts), int(slots)
        self.dtype = ANGLE_DTYPES[dtype_code]
        self.fd, size = open_model_file(model_dir if model_dir is not None else os.path.dirname(path) or ".",
                                        path if model_dir is not None else os.path.basename(path), "angle_file")
        weakref.finalize(self, os.close, self.fd)
        self.file_size = size
        if file_size is not None and size != file_size:
            raise OpError(f"ButterflyRotate: angle_file '{path}' has {size} bytes, attribute angle_file_size says "
                          f"{file_size}")
        if self.experts > max(size - self.offset, 0) // self.dtype.itemsize:  # each slice ≥ one angle
            raise OpError(f"ButterflyRotate: attribute angle_experts = {self.experts} does not fit in angle_file "
                          f"'{path}' ({size} bytes) from angle_offset = {self.offset}")
        self._lock = threading.Lock()
        self._lru: OrderedDict[int, tuple[float, np.ndarray, np.ndarray]] = OrderedDict()  # e → (scale, cos, sin)
        self._stages = 0
        self._dim = 0  # D of the last group() (the tables depend on it): what a prefetch builds for
        self._prefetched: set[int] = set()  # cached by a prefetch, not hit since

    def check_extent(self, d: int) -> None:
        """OpError unless the file holds all experts' slices for width d from the offset."""
        s_count, half = angle_shape(d)
        nbytes = s_count * half * self.dtype.itemsize
        if self.experts > (self.file_size - self.offset) // nbytes:
            raise OpError(f"ButterflyRotate: angle_file '{self.path}' ({self.file_size} bytes) cannot hold "
                          f"angle_experts = {self.experts} slices of {nbytes} bytes (S = {s_count}) from "
                          f"angle_offset = {self.offset}")

    def _read(self, e: int, nbytes: int) -> bytes:
        start = self.offset + e * nbytes
        parts, done = [], 0
        while done < nbytes:
            try:
                chunk = os.pread(self.fd, nbytes - done, start + done)  # retries EINTR itself (PEP 475)
            except OSError as exc:
                raise OpError(f"ButterflyRotate: cannot read angle_file '{self.path}' for expert {e}: "
                              f"{exc.strerror}") from None
            if not chunk:
                raise OpError(f"ButterflyRotate: angle_file '{self.path}' is truncated: expert {e} needs bytes "
                              f"[{start}, {start + nbytes}), the file ends at {start + done}")
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def lookup(self, e: int, s_count: int, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Cached cos, sin of expert e (made most recent, a hit), or None (a miss)."""
        with self._lock:
            if s_count != self._stages:  # another D: the file holds other tables
                self._lru.clear()
                self._prefetched.clear()
                self._stages = s_count
            hit = self._lru.get(e)
            if hit is None or hit[0] != scale:
                return None
            self._lru.move_to_end(e)
            if e in self._prefetched:
                self._prefetched.discard(e)
                _count(hits=1, prefetch_hits=1)
            else:
                _count(hits=1)
            return hit[1], hit[2]

    def load(self, e: int, d: int, scale: float, prefetch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Read expert e's slice and build its cos, sin [S, P/2] for width d (inactive pairs: 1, 0)."""
        s_count, half = angle_shape(d)
        nbytes = s_count * half * self.dtype.itemsize
        theta = np.frombuffer(self._read(e, nbytes), self.dtype).reshape(s_count, half).astype(np.float32)
        if self.dtype == np.int8:
            theta *= np.float32(scale)
        cos_t, sin_t = _cos_sin(theta, d)
        if prefetch:
            _count(prefetches=1, bytes_read=nbytes)
        else:
            _count(misses=1, bytes_read=nbytes)
        return cos_t, sin_t

    def insert(self, e: int, s_count: int, scale: float, tabs: tuple[np.ndarray, np.ndarray],
               prefetch: bool = False) -> None:
        with self._lock:
            if s_count == self._stages:
                if prefetch and e not in self._lru:
                    self._prefetched.add(e)
                elif not prefetch:
                    self._prefetched.discard(e)
                self._lru[e] = (scale, *tabs)
                self._lru.move_to_end(e)
                while len(self._lru) > self.slots:
                    old, _ = self._lru.popitem(last=False)  # callers keep their own references
                    self._prefetched.discard(old)

    def prefetch(self, experts: list[int], scales: list[float]) -> None:
        """AnglePrefetch: bring the first `slots` distinct experts in (an already cached one is
        made most recent, no hit counted). Nothing before a rotate has used the stream (D unknown).
        Read errors are skipped: the rotate that needs the expert reports them."""
        with self._lock:
            d, s_count = self._dim, self._stages
        if not d:
            return
        seen: list[int] = []
        for e, sc in zip(experts, scales):
            if e in seen:
                continue
            if len(seen) == self.slots:
                break
            seen.append(e)
            with self._lock:
                hit = self._lru.get(e)
                if s_count == self._stages and hit is not None and hit[0] == sc:
                    self._lru.move_to_end(e)
                    continue
            try:
                tabs = self.load(e, d, sc, prefetch=True)
            except OpError:
                continue
            self.insert(e, s_count, sc, tabs, prefetch=True)

    def group(self, experts: list[int], d: int, scales: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tables of ≤ slots experts: hits first (made most recent), then the misses read and
        inserted in order, so no expert of the group evicts another (as the C++ kernel)."""
        s_count = n_stages(d)
        self.check_extent(d)
        with self._lock:
            if d != self._dim:  # the cos/sin tables depend on D (inactive pairs), not only on S
                self._lru.clear()
                self._prefetched.clear()
                self._dim = d
        tabs = [self.lookup(e, s_count, sc) for e, sc in zip(experts, scales)]
        for i, (e, sc) in enumerate(zip(experts, scales)):
            if tabs[i] is None:
                tabs[i] = self.load(e, d, sc)
                self.insert(e, s_count, sc, tabs[i])
        return tabs


def butterfly_rotate_streamed(x: np.ndarray, stream: AngleStream, expert_index: np.ndarray | None = None,
                              angle_scale: np.ndarray | None = None, transpose: int = 0) -> np.ndarray:
    """ButterflyRotate with angles streamed from `stream`: same result as the resident op.
    Rows are processed grouped by expert, at most stream.slots experts at a time."""
    x = np.asarray(x)
    m, d, p, s_count = _check_x(x, transpose)
    expert_index, angle_scale = _check_index_scale(m, stream.experts, stream.dtype, expert_index, angle_scale)
    used, row_table = np.unique(expert_index, return_inverse=True)
    row_table = row_table.reshape(-1).astype(np.int64)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    for g0 in range(0, len(used), stream.slots):
        group = used[g0:g0 + stream.slots]
        scales = [float(angle_scale[e]) if angle_scale is not None else 1.0 for e in group]
        tabs = stream.group([int(e) for e in group], d, scales)
        cos_t = np.stack([c for c, _ in tabs])
        sin_t = np.stack([s for _, s in tabs])
        rows = np.flatnonzero((row_table >= g0) & (row_table < g0 + len(group)))
        xr = x if len(rows) == m else np.ascontiguousarray(x[rows])
        kernel = _rotate_kernels[len(rows) * p * s_count >= PARALLEL_MIN_WORK]
        y[rows] = kernel(xr, cos_t, sin_t, row_table[rows] - g0, bool(transpose))
    return y


def angle_prefetch(x: np.ndarray, expert_ids: np.ndarray, stream: AngleStream,
                   angle_scale: np.ndarray | None = None) -> np.ndarray:
    """AnglePrefetch (docs/ops.md): load expert_ids' angles into `stream`, return X unchanged."""
    x, expert_ids = np.asarray(x), np.asarray(expert_ids)
    if x.dtype != np.float32:
        raise OpError(f"AnglePrefetch: X must be float32, got {x.dtype}")
    if expert_ids.dtype != np.int64:
        raise OpError(f"AnglePrefetch: expert_ids must be int64, got {expert_ids.dtype}")
    flat = expert_ids.reshape(-1)
    bad = (flat < 0) | (flat >= stream.experts)
    if bad.any():
        i = int(np.argmax(bad))
        raise OpError(f"AnglePrefetch: expert_ids[{i}] = {int(flat[i])} is out of range [0, {stream.experts})")
    if stream.dtype == np.int8:
        if angle_scale is None:
            raise OpError("AnglePrefetch: int8 angles need angle_scale")
        angle_scale = np.asarray(angle_scale)
        if angle_scale.dtype != np.float32 or angle_scale.shape != (stream.experts,):
            raise OpError(f"AnglePrefetch: angle_scale must be float32 [{stream.experts}], got "
                          f"{angle_scale.dtype} {angle_scale.shape}")
    elif angle_scale is not None:
        raise OpError("AnglePrefetch: angle_scale is only allowed with int8 angles")
    experts = [int(e) for e in flat]
    scales = [float(angle_scale[e]) if angle_scale is not None else 1.0 for e in experts]
    stream.prefetch(experts, scales)
    return x.copy()
