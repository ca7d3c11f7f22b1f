"""Peak RSS of `bmoe-export` against the checkpoint's size (issue 16, part 4: ≤ 1.5× the checkpoint).

Builds checkpoints of increasing size (untrained: memory does not depend on training), runs the exporter
in a subprocess per (checkpoint, options) and takes its peak RSS: the kernel's high-water mark of the
exporter's own address space (VmHWM, read by the process as it exits; wait4's ru_maxrss would also
count the forking parent's pages) and, as a cross-check, psutil samples every 5 ms. The
exporter's fixed cost (interpreter, torch, torch.onnx's exporter) is the peak exporting a tiny
checkpoint with the same options in the same run; the table gives peak / checkpoint and
(peak − that baseline) / checkpoint. Median (min–max) of --repeats runs.

    python benchmarks/export_memory.py                  # table; JSON in runs/bench/export_memory/
    python benchmarks/export_memory.py --update-docs    # also the table block in docs/memory.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import cpu_model, publish  # noqa: E402

MIB = 2**20
D512 = dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048, max_seq=128, top_k=2)  # the paper preset's shape


OPTIONS = {
    "default": [],
    "attn+proj int4, embed int8": ["--attn", "int4", "--proj", "int4", "--embed", "int8"],
    "attn+proj ternary": ["--attn", "ternary", "--proj", "ternary"],  # QAT checkpoints only
}
QAT = dict(ternary_attn=True, ternary_proj=True)


@dataclass(frozen=True)
class Spec:
    name: str
    config: dict
    options: tuple[str, ...] = ("default", "attn+proj int4, embed int8")
    optimizer: bool = False  # with AdamW state, as bmoe-train writes it (2 more copies of the weights)


BASELINE = "tiny (baseline)"
SPECS = [
    Spec(BASELINE, dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, n_experts=4, max_seq=16, **QAT), tuple(OPTIONS)),
    Spec("d512 butterfly N=64", dict(D512, n_experts=64)),
    Spec("d512 butterfly N=64 + AdamW state", dict(D512, n_experts=64), ("default",), optimizer=True),
    Spec("d512 butterfly N=64, QAT", dict(D512, n_experts=64, **QAT), ("attn+proj ternary",)),
    Spec("d512 dense N=64, 2 layers, d_ff 1024", dict(D512, n_layers=2, d_ff=1024, n_experts=64, variant="dense")),
    Spec("d512 dense N=64 (paper preset shape)", dict(D512, n_experts=64, variant="dense")),
]


def make_checkpoint(spec: Spec, path: Path) -> int:
    import torch

    from bmoe_runtime.format.tokenizer import ByteTokenizer
    from bmoe_runtime.nn.model import ModelConfig, MoELM
    from bmoe_runtime.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MoELM(ModelConfig(**spec.config))
    state = None
    if spec.optimizer:  # one real AdamW step: its state has the weights' shapes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
        logits.float().square().mean().backward()
        opt.step()
        state = {"step": 1, "optimizer": opt.state_dict()}
    save_checkpoint(path, model, ByteTokenizer(), {}, train_state=state)
    return path.stat().st_size


# bmoe-export, writing its VmHWM (KiB) to argv[1] as it exits
_EXPORT_REPORTING_HWM = """import atexit, sys
def _hwm():
    with open(sys.argv[1], "w") as f:
        f.write(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
atexit.register(_hwm)
from exporters.cli import export_cli
export_cli(sys.argv[2:], prog_name="bmoe-export")
"""


def export_peak_rss(ckpt: Path, out: Path, options: list[str], interval: float = 0.005) -> tuple[int, int, float]:
    """(peak RSS: VmHWM, sampled peak RSS of the process tree, seconds) of `bmoe-export ckpt -o out options`;
    raises if it fails."""
    hwm = out.with_name(out.name + ".hwm")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_REPORTING_HWM, str(hwm), str(ckpt), "-o", str(out),
                             "--force", *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampled, done = [0], threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                sampled[0] = max(sampled[0], rss)
                time.sleep(interval)
        except psutil.Error:  # the process ended between two samples
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"bmoe-export {ckpt} failed ({proc.returncode}): {stderr.decode()[-400:]}")
    return int(hwm.read_text()) * 1024, sampled[0], time.perf_counter() - start


def run(repeats: int, work: Path) -> dict:
    rows = []
    for i, spec in enumerate(SPECS):
        ckpt = work / f"ckpt{i}.pt"
        size = make_checkpoint(spec, ckpt)
        for label in spec.options:
            options = OPTIONS[label]
            peaks, sampled, secs = [], [], []
            for _ in range(repeats):
                p, s, t = export_peak_rss(ckpt, work / "out", options)
                peaks.append(p)
                sampled.append(s)
                secs.append(t)
            rows.append({"checkpoint": spec.name, "options": label, "ckpt_bytes": size, "peak_rss": peaks,
                         "sampled_rss": sampled, "seconds": secs})
            print(f"{spec.name}, {label}: checkpoint {size / MIB:.1f} MiB, "
                  f"peak {statistics.median(peaks) / MIB:.0f} MiB ({statistics.median(secs):.1f} s)", flush=True)
        ckpt.unlink()
    base = {r["options"]: statistics.median(r["peak_rss"]) for r in rows if r["checkpoint"] == BASELINE}
    for r in rows:
        peak = statistics.median(r["peak_rss"])
        r["baseline_rss"] = base[r["options"]]
        r["ratio"] = peak / r["ckpt_bytes"]
        r["ratio_over_baseline"] = (peak - r["baseline_rss"]) / r["ckpt_bytes"]
        r["within_bound"] = peak <= 1.5 * r["ckpt_bytes"] + r["baseline_rss"]
    return {"cpu": cpu_model(), "repeats": repeats, "python": sys.version.split()[0], "rows": rows}


def table(res: dict) -> str:
    gap = max(abs(statistics.median(r["peak_rss"]) - statistics.median(r["sampled_rss"])) for r in res["rows"])
    lines = [f"{res['cpu']}; peak RSS = VmHWM of the `bmoe-export` process (psutil's 5 ms samples within "
             f"{gap / MIB:.1f} MiB of it), median (min–max) of {res['repeats']} runs; baseline = the same export of a tiny checkpoint "
             "(interpreter + torch + torch.onnx: the exporter's fixed cost).", "",
             "| checkpoint | options | checkpoint MiB | peak RSS MiB | peak / ckpt | (peak − baseline) / ckpt "
             "| ≤ 1.5× ckpt + baseline | export s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p = [x / MIB for x in r["peak_rss"]]
        over = "—" if r["checkpoint"] == BASELINE else f"**{r['ratio_over_baseline']:.2f}×**"
        lines.append(f"| {r['checkpoint']} | {r['options']} | {r['ckpt_bytes'] / MIB:.1f} | {statistics.median(p):.0f} "
                     f"({min(p):.0f}–{max(p):.0f}) | {r['ratio']:.2f}× | {over} | "
                     f"{'yes' if r['within_bound'] else 'NO'} | {statistics.median(r['seconds']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="results directory [runs/bench/export_memory]")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the table block in docs/memory.md and docs/export_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.repeats, Path(tmp))
    publish("export_memory", res, table(res), args.out, args.update_docs, "memory.md", "export-memory-table")


if __name__ == "__main__":
    main()
