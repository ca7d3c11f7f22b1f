"""Memory plan: will an exported LM fit a device, and with how large an angle cache?

resident: peak = runtime + copies·(weights + all angles) + cos/sin tables of ≤ 8 experts (ort)
                + max(load transient, KV cache + activations)
streamed: peak = runtime + copies·weights + c·cos/sin tables (the angle cache)
                + max(load transient, KV cache + activations)

All angles stay resident when that fits. Otherwise angles are streamed from angles.bin
(bmoe_runtime.runtime.streaming) into a cache of c experts a layer: the largest c in
[top_k, n_experts] under the budget wins; if even c = top_k does not fit, the plan is
refused. Every term is listed in docs/planner.md
with the measurements behind it. Sizes are bytes; MiB = 2^20 bytes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bmoe_runtime.planning.devices import Device
from bmoe_runtime.errors import BmoeError, require_numba

MIB = 2**20
F32 = 4
# Per-backend memory behaviour, measured on exported models (docs/planner.md):
#   numba: onnx.load holds every weight in the protobuf and the ReferenceEvaluator again as numpy
#          arrays (2 copies); onnx.checker serializes the loaded model once more while loading
#          (1 transient copy); it keeps every intermediate of a step until the step returns.
#   ort:   one copy of the weights; the arena reuses activation buffers across layers; ButterflyRotate
#          computes the cos/sin tables of the experts a call uses from the angles, at most 8 experts at
#          a time, into one buffer kept across calls (custom_ops/src/butterfly_op.cc, kCallExperts).
#          Two kernels keep a second, repacked copy of constant weights next to the initializer (measured on the
#          bundled d384/6-layer model: +4.2 MiB at session creation for 4.2 MiB of int4 weights):
#          com.microsoft::MatMulNBits (MLAS prepacks the 4-bit blocks and scales) and TernaryMatMul: in exact mode
#          its LUT layout (custom_ops/src/ternary.h: 18 trits a uint32, rows padded to 16), with act_quant its digit
#          rows (4 trits a byte, rows padded to 256 trits). Counted on every CPU, although only the variants that
#          have these paths make the copy (avx512 and scalar; digit rows: AVX-512 VNNI and scalar).
COPIES = {"numba": 2, "ort": 1}
LOAD_TRANSIENT_COPIES = {"numba": 1, "ort": 0}
CALL_TABLE_EXPERTS = {"numba": 0, "ort": 8}
# If the overhead probe cannot run: peak RSS of the probe on the dev machine (x86_64, Python 3.11).
FALLBACK_OVERHEAD = {"numba": 350 * MIB, "ort": 325 * MIB}
# runtime "native": an app embedding ONNX Runtime 1.32 + libbmoe_ops, one trivial session run, no Python.
# Median peak RSS of 7 runs of benchmarks/native/native_overhead.py (x86-64, 1 thread): 30.3 MiB (30.3-30.4).
# An Android/iOS app adds its own framework on top; override with --overhead-mb when measured there.
NATIVE_OVERHEAD = int(30.3 * MIB)
RUNTIMES = ("python", "native")
# Unplanned allocations of a real run (Python objects of the generation loop, allocator slack, page-granular
# growth, ORT's first-run buffers): 1.7-4.5 MiB above the predicted peak in issue 12, 3.2-3.4 MiB in bmoe-run
# (both backends) and the C example with the d256/4-layer bundled model; with the d384/6-layer one (issue 15),
# 5.8 MiB (its int4 export) and 7.5 MiB (an fp32 export of the same checkpoint) in bmoe-run --backend ort.
# The plan keeps this much of the budget free so that a measured peak never exceeds the budget.
SAFETY_MARGIN = 8 * MIB


@dataclass(frozen=True)
class Settings:
    backend: str = "ort"
    context: int | None = None  # KV positions; default the model's max_seq
    prefill: int | None = None  # tokens in the first step (the prompt); default the whole context
    batch: int = 1
    threads: int | None = None
    runtime: str = "python"  # python: bmoe-run; native: an app embedding ORT + libbmoe_ops (backend ort)


@dataclass
class Plan:
    model: str
    device: dict
    settings: dict
    budget_bytes: int
    budget_source: str
    components: dict[str, int]  # what the peak adds up from, in order
    load_transient_bytes: int  # overlaps nothing of the run: max(this, KV + activations) counts
    peak_bytes: int
    fits: bool
    n_experts: int
    top_k: int
    moe_layers: int
    cache_experts: int  # per layer
    expert_angle_bytes: int  # one expert's angle slices, all layers
    smallest_peak_bytes: int  # cache of top_k experts a layer
    all_resident_peak_bytes: int
    streaming: bool
    expected_misses_per_token: float
    streamed_bytes_per_token: float
    ram_read_bytes_per_token: float
    estimate_tokens_per_s: float | None  # bandwidth roofline on the device; None when bandwidth is unknown
    overhead_source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        s = self.settings
        rows = [f"plan: {self.model} on {self.device['name']} ({s['backend']} backend, context {s['context']}, "
                f"prefill {s['prefill']}, batch {s['batch']}, threads {s['threads'] or 'default'})",
                f"budget {self.budget_bytes / MIB:.1f} MiB: {self.budget_source}", "",
                f"{'component':<44}{'MiB':>12}"]
        rows += [f"  {name:<42}{b / MIB:>12.3f}" for name, b in self.components.items()]
        if self.load_transient_bytes:
            rows.append(f"  {'(load transient, before KV/activations)':<42}{self.load_transient_bytes / MIB:>12.3f}")
        rows += [f"{'peak (predicted)':<44}{self.peak_bytes / MIB:>12.3f}"
                 f"   {100 * self.peak_bytes / self.budget_bytes:.1f}% of budget",
                 f"{f'smallest plan ({self.top_k} experts a layer)':<44}{self.smallest_peak_bytes / MIB:>12.3f}",
                 f"{'all angles resident':<44}{self.all_resident_peak_bytes / MIB:>12.3f}", "",
                 f"angle cache: {self.cache_experts} of {self.n_experts} experts a layer × {self.moe_layers} layers "
                 f"({'the rest streamed from angles.bin' if self.streaming else 'all resident, nothing streamed'})"]
        if self.streaming:
            rows.append(f"streamed per token: {self.expected_misses_per_token:.2f} expert misses, "
                        f"{self.streamed_bytes_per_token / 1024:.1f} KiB (uniform routing)")
        rows.append(f"RAM read per token: {self.ram_read_bytes_per_token / MIB:.3f} MiB")
        if self.estimate_tokens_per_s is not None:
            rows.append(f"ESTIMATE decode on {self.device['name']}: <= {self.estimate_tokens_per_s:,.0f} tok/s "
                        f"(memory/storage bandwidth bound; compute not modelled)")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def summary(self) -> str:
        return (f"plan for {self.device['name']}: peak {self.peak_bytes / MIB:.1f} MiB of "
                f"{self.budget_bytes / MIB:.1f} MiB budget, angle cache {self.cache_experts}/{self.n_experts} "
                f"experts a layer{', streamed from angles.bin' if self.streaming else ''}")


def warm_up(backend: str, packing: str = "2bit", act_quant: int = 0) -> None:
    """Import and exercise what a bmoe-run of this backend uses, before any model is loaded."""
    import numpy as np

    import bmoe_runtime.runtime.generate  # noqa: F401  (what bmoe-run imports)
    import bmoe_runtime.runtime.session  # noqa: F401
    if backend == "numba":  # imports and compiles (or loads from numba's cache) both kernels
        require_numba()
        import onnx.reference  # noqa: F401

        from bmoe_runtime.backends import numba_ops
        from bmoe_runtime.format.packing import packed_cols
        x = np.ones((2, 8), np.float32)
        numba_ops.butterfly_rotate(x, np.zeros((1, 3, 4), np.float32))
        numba_ops.ternary_matmul(x, np.zeros((4, packed_cols(8, packing)), np.uint8), np.ones(4, np.float32), 8,
                                 packing, act_quant)
    else:  # onnxruntime with the ai.bmoe library and one (trivial) session
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from bmoe_runtime.backends import ort_ops
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        opts = ort.SessionOptions()
        ort_ops.register(opts)
        s = ort.InferenceSession(helper.make_model(g).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        s.run(None, {"x": np.ones(1, np.float32)})


_PROBE = "import sys; from bmoe_runtime.planning import planner, ram; " \
         "planner.warm_up(sys.argv[1], sys.argv[2], int(sys.argv[3])); print(ram.peak_rss())"


def overhead_override() -> tuple[int, str] | None:
    given = os.environ.get("BMOE_OVERHEAD_MB")
    if not given:
        return None
    try:
        mb = float(given)
    except ValueError:
        mb = -1.0
    if not 0 < mb < 2**24:
        raise BmoeError(f"BMOE_OVERHEAD_MB must be a positive number of MiB, got {given!r}")
    return int(mb * MIB), "given: $BMOE_OVERHEAD_MB"


def overhead_in_this_process(backend: str, packing: str = "2bit", act_quant: int = 0) -> tuple[int, str]:
    """The runtime overhead measured in this very process (bmoe-run, before it loads the model).

    Nothing is spawned, so under a tight memory limit the measurement cannot be what gets killed.
    Only meaningful in a lean process: one that has loaded torch, say, reports torch too.
    """
    given = overhead_override()
    if given:
        return given
    from bmoe_runtime.planning.ram import peak_rss

    warm_up(backend, packing, act_quant)
    peak = peak_rss()
    if peak is None:
        return FALLBACK_OVERHEAD[backend], "fallback constant (peak RSS not readable here)"
    return peak, "measured: peak RSS of this process before loading the model"


@functools.lru_cache(maxsize=None)
def runtime_overhead(backend: str, packing: str = "2bit", act_quant: int = 0) -> tuple[int, str]:
    """Peak RSS of a fresh process that imports and warms up what bmoe-run uses, before any model.

    $BMOE_OVERHEAD_MB replaces the measurement (e.g. with one taken on the target device).
    """
    given = overhead_override()
    if given:
        return given
    root = str(Path(__file__).resolve().parents[2])  # the directory holding bmoe_runtime/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, backend, packing, str(act_quant)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        return int(out.stdout.split()[-1]), "measured: peak RSS of a bare import in a subprocess"
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        return FALLBACK_OVERHEAD[backend], f"fallback constant (probe failed: {type(exc).__name__})"


def native_overhead() -> tuple[int, str]:
    """An app embedding ONNX Runtime + libbmoe_ops (no Python): measured, or $BMOE_OVERHEAD_MB."""
    return overhead_override() or (NATIVE_OVERHEAD, "measured: C app + ORT + libbmoe_ops "
                                                     "(benchmarks/native/native_overhead.py, x86-64 host)")


def kernel_weight_copies(manifest: dict, backend: str) -> dict[str, int]:
    """Second copies ORT kernels make of constant weights at session creation (see COPIES); for numba, the
    float32 weights its MatMulNBits dequantizes per call (largest node: float32 + uint8 codes, 5 B a weight)."""
    tensors = manifest["tensors"]
    if backend != "ort":
        largest = max((t["shape"][0] * t["shape"][1] * t["shape"][2] * 2 for name, t in tensors.items()
                       if name.endswith("_q4")), default=0)  # [N, k_blocks, blob]: 2 weights a byte
        return {"MatMulNBits dequantized per call (numba, largest node)": 5 * largest} if largest else {}
    nbits = sum(t["bytes"] for name, t in tensors.items() if name.endswith(("_q4", "_q4_scales")))
    opts = manifest.get("export_options", {})
    act_quant = bool(opts.get("act_quant", False))
    trits_per_byte = 5 if opts.get("packing") == "base3" else 4
    repacked = 0
    for name, t in tensors.items():
        if t["kind"] in ("prototypes", "attention", "shared_projection") and name.endswith("w_packed"):
            rows, k = t["shape"][0], t["shape"][-1] * trits_per_byte  # k: K rounded up to a whole byte
            repacked += rows * -(-k // 256) * 64 if act_quant else -(-rows // 16) * 16 * -(-k // 18) * 4
    label = ("TernaryMatMul digit rows, act_quant (ort's second copy)" if act_quant
             else "TernaryMatMul LUT layout, exact mode (ort's second copy)")
    return {k: v for k, v in (("MatMulNBits prepacked 4-bit weights (ort's second copy)", nbits),
                              (label, repacked)) if v}


def _table_bytes(shape: list[int], backend: str = "ort") -> int:
    """cos/sin table of one expert: the C++ op's layout is P·(S + min(S, 4)) floats (custom_ops/src/butterfly.h),
    numba's is cos and sin [S, P/2] each."""
    s, p = shape[1], 2 * shape[2]
    return F32 * p * (s + min(s, 4)) if backend == "ort" else F32 * p * s


def activation_bytes(cfg: dict, backend: str, tokens: int, context: int, batch: int) -> int:
    """Intermediates of one step of `tokens` new tokens over `context` positions (counted on the graph).

    Per token and layer, in floats: 11·d (norms, q/k/v, attention out, residuals) + N (router)
    + 5·H·ctx (scores: QKᵀ, scaled, masked, softmax, one softmax temporary) + the expert banks;
    per token once: 4·d + V (embeddings, final norm, logits); per step: V·d (transposed tied head).
    numba keeps all L layers' intermediates until the step ends; ORT reuses buffers (1 layer, an upper bound).
    """
    d, f, k, n, h, v = (cfg[x] for x in ("d_model", "d_ff", "top_k", "n_experts", "n_heads", "vocab_size"))
    if cfg.get("expert_form", "paper") == "paper":
        banks, per_layer = 1, 2 * k * d + 3 * k * f + 2 * f  # pairs, rotated, matmul, rotated, gated, sum, GELU
    else:
        banks, per_layer = 2, 5 * k * d + 4 * k * f + d
    if cfg.get("variant", "butterfly") in ("dense", "ternary"):
        per_layer += banks * k * d * f  # Gather copies each chosen expert's matrix
    per_layer += 11 * d + n + 5 * h * context
    layers = cfg["n_layers"] if backend == "numba" else 1
    return F32 * (batch * tokens * (layers * per_layer + 4 * d + v) + v * d)


def make_plan(manifest: dict, device: Device, settings: Settings, budget_bytes: int | None = None,
              overhead: tuple[int, str] | None = None, model_name: str = "model", all_resident: bool = False,
              cache_experts: int | None = None) -> Plan:
    """The plan with the largest angle cache under the budget (or all experts, with all_resident; or, for a
    planned directory, its streamed cache of cache_experts experts a layer)."""
    if manifest.get("kind") != "lm" or "config" not in manifest:
        raise BmoeError(f"{model_name}: planning needs a language-model export (kind 'lm')")
    if settings.backend not in COPIES:
        raise BmoeError(f"unknown backend {settings.backend!r}; expected one of {', '.join(COPIES)}")
    cfg = manifest["config"]
    context = settings.context or cfg["max_seq"]
    if not 1 <= context <= cfg["max_seq"]:
        raise BmoeError(f"context {context} is outside [1, {cfg['max_seq']}] (the model's max_seq)")
    prefill = min(settings.prefill or context, context)
    if settings.batch < 1:
        raise BmoeError(f"batch must be >= 1, got {settings.batch}")
    ram = int(device.ram_mb * MIB)
    if budget_bytes is None:
        budget_bytes = device.budget_bytes
        source = (f"{device.ram_mb:.0f} MiB RAM × (1 − {device.reserved_fraction:g} reserved)" if not device.is_host
                  else "MemAvailable of this machine")
    else:
        source = "--budget-mb"
        if budget_bytes > ram:
            raise BmoeError(f"budget {budget_bytes / MIB:.0f} MiB exceeds {device.name}'s "
                            f"{device.ram_mb:.0f} MiB of RAM")
    if settings.runtime not in RUNTIMES:
        raise BmoeError(f"unknown runtime {settings.runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if settings.runtime == "native" and settings.backend != "ort":
        raise BmoeError("runtime native is ONNX Runtime with libbmoe_ops: it needs backend ort")
    backend, copies = settings.backend, COPIES[settings.backend]
    opts = manifest.get("export_options", {})
    if overhead is None:
        overhead = native_overhead() if settings.runtime == "native" else \
            runtime_overhead(backend, opts.get("packing", "2bit"), int(opts.get("act_quant", False)))

    # Angles by MoE layer: the tables of one layer (θ and φ of each bank) are indexed by the same expert.
    layers: dict[str, list[dict]] = {}
    for t in manifest.get("angle_tables", []):
        layers.setdefault(t["tensor"].rsplit(".", 2)[0], []).append(t)
    shapes = {name: t["shape"] for name, t in manifest["tensors"].items()}
    n_exp, top_k = cfg["n_experts"], cfg["top_k"]
    slice_bytes = sum(t["expert_bytes"] for ts in layers.values() for t in ts)  # one expert, all layers
    # The largest table of any node, for the experts one resident call holds at a time.
    table_bytes = min(CALL_TABLE_EXPERTS[backend], n_exp) * max(
        (_table_bytes(shapes[t["tensor"]]) for ts in layers.values() for t in ts), default=0)
    by_kind = dict(manifest["bytes_by_kind"])
    angle_rest = by_kind.pop("angles", 0) - slice_bytes * n_exp  # int8 per-expert scales: tiny, kept resident
    if angle_rest:
        by_kind["angle_scales"] = angle_rest
    resident = sum(by_kind.values())
    kernel_copies = kernel_weight_copies(manifest, backend)

    kv = 2 * cfg["n_layers"] * settings.batch * context * cfg["d_model"] * F32
    act = activation_bytes(cfg, backend, prefill, context, settings.batch)

    stream_table_bytes = sum(_table_bytes(shapes[t["tensor"]], backend) for ts in layers.values() for t in ts)

    def parts(c: int, streamed: bool) -> tuple[dict[str, int], int, int]:
        runtime = "native app" if settings.runtime == "native" else backend
        comp = {f"runtime ({runtime}; {overhead[1].split(':')[0]})": overhead[0]}
        comp |= {f"weights: {kind}": b for kind, b in sorted(by_kind.items(), key=lambda kb: -kb[1])}
        if copies > 1:
            comp["weights: second copy (protobuf + numpy)"] = (copies - 1) * resident
        comp |= {f"weights: {what}": b for what, b in kernel_copies.items()}
        if streamed:  # raw angles are never loaded; the cache holds c experts' cos/sin tables a layer
            comp[f"angle cache: {c}/{n_exp} experts × {len(layers)} layers (cos/sin)"] = c * stream_table_bytes
        else:
            comp[f"angles: {c}/{n_exp} experts × {len(layers)} layers" + (f" × {copies}" if copies > 1 else "")] = \
                copies * c * slice_bytes
            if table_bytes:
                comp[f"angles: cos/sin tables of ≤ {CALL_TABLE_EXPERTS[backend]} experts a call (ort op)"] = \
                    table_bytes
        comp["KV cache (past + present)"] = 2 * kv
        comp[f"activations ({prefill}-token step)"] = act
        comp["safety margin (unplanned allocations)"] = SAFETY_MARGIN
        transient = LOAD_TRANSIENT_COPIES[backend] * (resident + (0 if streamed else c * slice_bytes))
        return comp, transient, sum(comp.values()) - 2 * kv - act + max(transient, 2 * kv + act)

    lo = min(top_k, n_exp) if layers else 0
    cache, streaming = (n_exp if layers else 0), False
    if cache_experts is not None and layers:  # fixed in the graph: streamed whatever the budget
        cache, streaming = min(cache_experts, n_exp), True
    elif not all_resident and parts(cache, False)[2] > budget_bytes and layers:
        streaming = True
        while cache > lo and parts(cache, True)[2] > budget_bytes:
            cache -= 1
    comp, transient, peak = parts(cache, streaming)

    # Per token: weights read (tied head read whole, one position row), the chosen experts' angles, KV at mean fill.
    emb = sum(b["bytes"] for n, b in manifest["tensors"].items() if "tok_emb" in n) or by_kind.get("embeddings", 0)
    pos = sum(b["bytes"] for n, b in manifest["tensors"].items() if "pos_emb" in n) // cfg["max_seq"]
    weights_read = resident - by_kind.get("embeddings", 0) - by_kind.get("experts", 0) + emb + pos \
        + by_kind.get("experts", 0) * top_k // n_exp
    angle_read = top_k * slice_bytes  # tables are computed from the angles (and stay in cache)
    ram_read = weights_read / settings.batch + angle_read + cfg["n_layers"] * context * cfg["d_model"] * F32
    miss_frac = (1 - cache / n_exp) if layers else 0.0
    misses = len(layers) * top_k * miss_frac
    streamed = top_k * miss_frac * slice_bytes
    estimate = None
    if device.mem_bandwidth_gbs:
        seconds = ram_read / (device.mem_bandwidth_gbs * 1e9)
        if streamed:  # one pread per angle table of each missed expert
            reads = misses * (len(manifest["angle_tables"]) / len(layers))
            seconds += streamed / (device.storage_read_mbs * 1e6) + reads * device.storage_latency_ms / 1e3
        estimate = 1 / seconds
    notes = []
    if not device.is_here and overhead[1].startswith("measured"):
        stack = "native stack" if settings.runtime == "native" else "Python stack"
        notes.append(f"runtime overhead is measured on this host ({sys.platform}); {device.name}'s {stack} "
                     f"may differ (override: --overhead-mb)")
    return Plan(model=model_name, device=device.to_dict(),
                settings={"backend": backend, "runtime": settings.runtime, "context": context, "prefill": prefill,
                          "batch": settings.batch, "threads": settings.threads},
                budget_bytes=budget_bytes, budget_source=source, components=comp, load_transient_bytes=transient,
                peak_bytes=peak, fits=peak <= budget_bytes, n_experts=n_exp, top_k=top_k, moe_layers=len(layers),
                cache_experts=cache, expert_angle_bytes=slice_bytes,
                smallest_peak_bytes=parts(lo, bool(layers))[2] if layers else parts(0, False)[2],
                all_resident_peak_bytes=parts(n_exp if layers else 0, False)[2], streaming=streaming,
                expected_misses_per_token=misses, streamed_bytes_per_token=streamed,
                ram_read_bytes_per_token=ram_read, estimate_tokens_per_s=estimate, overhead_source=overhead[1],
                notes=notes)


def refusal(plan: Plan) -> str | None:
    """One line saying why the plan does not fit, or None."""
    if plan.fits:
        return None
    big = sorted(plan.components.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {b / MIB:.1f}" for name, b in big)
    return (f"{plan.model} does not fit {plan.device['name']}: even the smallest plan (angles of {plan.top_k} experts "
            f"a layer in RAM) peaks at {plan.smallest_peak_bytes / MIB:.1f} MiB, the budget is "
            f"{plan.budget_bytes / MIB:.1f} MiB ({plan.budget_source}); largest parts (MiB): {parts}. "
            f"Try a shorter --context, another backend or a larger --budget-mb.")
