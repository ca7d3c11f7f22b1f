"""Console scripts: bmoe-train, bmoe-run and the `bmoe` tool."""

from __future__ import annotations

import click

from bmoe_runtime.errors import BmoeError, CheckpointError, user_errors
from bmoe_runtime.choices import EXPERT_FORMS, PRESET_NAMES, VARIANTS


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan (which passes every range comparison) and inf."""

    name = "finite float"

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


BUDGET_MB = FiniteFloat(min=1, max=2**24)  # 1 MiB .. 16 TiB: past either end it is a typo, not a device


def _backend(backend: str) -> str:
    """auto: ort when the op library is found, else numba. A $BMOE_OPS_LIB that is not a file is an error,
    not a silent fallback."""
    import os

    from bmoe_runtime.backends import ort_ops

    env = os.environ.get("BMOE_OPS_LIB")
    if env and backend != "numba" and not os.path.isfile(env):
        raise BmoeError(f"BMOE_OPS_LIB={env[:200]} is not a file (unset it to use the installed op library)")
    if backend == "auto":
        return "ort" if ort_ops.available() else "numba"
    return backend


def _cap_threads(threads: int | None) -> int | None:
    """No more threads than this process may run on: more only oversubscribe the cores."""
    from bmoe_runtime.planning.devices import resolve_device  # not runtime.session: it imports numba

    cores = resolve_device("host").cores
    if threads and threads > cores:
        click.echo(f"[bmoe] --threads {threads} capped to the {cores} cores this machine gives the process", err=True)
        return cores
    return threads


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(), help="Corpus: a directory with train/valid/test.txt (or "
              "train/ valid/ test/ directories of .txt files), or one text file (split 90/10); tokenized once into "
              "memory-mapped shards in --cache-dir.")
@click.option("--out", required=True, type=click.Path(), help="Checkpoint to write (model.pt).")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="tiny", show_default=True)
@click.option("--variant", type=click.Choice(VARIANTS), default="butterfly", show_default=True)
@click.option("--expert-form", type=click.Choice(EXPERT_FORMS), default="paper", show_default=True)
@click.option("--experts", type=click.IntRange(1, 2**16), help="Number of experts N (preset's by default).")
@click.option("--top-k", type=click.IntRange(1, 1024), help="Experts per token (preset's by default).")
@click.option("--d-model", type=click.IntRange(1, 2**16))  # bounds: what an export's manifest may declare
@click.option("--d-ff", type=click.IntRange(1, 2**18))
@click.option("--layers", type=click.IntRange(1, 1024))
@click.option("--heads", type=click.IntRange(1, 1024), help="Attention heads (preset's by default).")
@click.option("--dropout", type=FiniteFloat(min=0.0, max=1.0, max_open=True),
              help="Dropout while training (embeddings, attention, residual branches) [default: 0].")
@click.option("--steps", type=click.IntRange(1, 10**9), help="Optimizer steps (preset's by default).")
@click.option("--batch", type=click.IntRange(1, 2**16))
@click.option("--seq", type=click.IntRange(1, 2**20))
@click.option("--lr", type=FiniteFloat(min=0, min_open=True, max=10))
@click.option("--eval-every", type=click.IntRange(1, 10**9))
@click.option("--log-every", type=click.IntRange(1, 10**9), help="Steps between train-loss curve entries [default: 10].")
@click.option("--eval-tokens", type=click.IntRange(0, 2**40), help="Valid tokens per periodic evaluation, 0 = the "
              "whole split (preset's by default; the final evaluation always reads the whole split).")
@click.option("--keep-best", is_flag=True, default=None, help="Also write OUT's stem + .best.pt: the weights at the "
              "lowest valid loss evaluated (periodic and final evaluations; with --eval-tokens 0 all on the whole "
              "split).")
@click.option("--per-tensor-scale", is_flag=True, help="One ternary scale per matrix instead of per row.")
@click.option("--ternary", "ternary_parts", type=click.Choice(["attn", "proj"]), multiple=True,
              help="Also train these ternary (QAT, as the experts): attention projections, the paper form's shared "
                   "projection; repeatable. Export them with bmoe-export --attn/--proj ternary.")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe"]), default="byte", show_default=True)
@click.option("--bpe-vocab", type=click.IntRange(257, 2**21), default=4096, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, help="Random seed [default: 0; a resumed run keeps its own].")
@click.option("--resume", is_flag=True, help="Continue from --out's saved training state (on any number of ranks).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Token-shard cache [default: $BMOE_CACHE_DIR, "
              "else ~/.cache/bmoe/tokens].")
@click.option("--stop-at", type=click.IntRange(1, 10**9), help="Stop after this step's checkpoint, as if interrupted "
              "(--resume continues).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="Run the training step as one CUDA graph, captured "
              "once and replayed (--device cuda, one rank; under torchrun the step stays eager) [default: on with "
              "--device cuda, where the step can be captured].")
@click.option("--compile/--no-compile", "compiled", default=None, help="torch.compile the model's loss (--device cuda) "
              "[default: off].")
@user_errors
def train_cli(data, out, preset, variant, expert_form, experts, top_k, d_model, d_ff, layers, heads, dropout, steps, batch, seq, lr,
              eval_every, log_every, eval_tokens, keep_best, per_tensor_scale, ternary_parts, tokenizer, bpe_vocab,
              device, seed, resume, cache_dir, stop_at, cuda_graphs, compiled):
    """Train a ButterflyMoE language model (or a baseline) on a text corpus.

    Data-parallel on G GPUs: torchrun --nproc_per_node G -m bmoe_runtime.cli train --device cuda ...
    (--batch is the global batch, split across the ranks)."""
    from bmoe_runtime.train.trainer import train

    model = {"variant": variant, "expert_form": expert_form, "n_experts": experts, "top_k": top_k,
             "d_model": d_model, "d_ff": d_ff, "n_layers": layers, "n_heads": heads, "dropout": dropout}
    if per_tensor_scale:
        model["per_row_scale"] = False
    for part in ternary_parts:
        model[f"ternary_{part}"] = True
    run = {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "eval_every": eval_every, "log_every": log_every,
           "eval_tokens": eval_tokens, "keep_best": keep_best, "seed": seed}
    try:
        train(data, out, preset, {k: v for k, v in model.items() if v is not None},
              {k: v for k, v in run.items() if v is not None}, tokenizer, bpe_vocab, device, resume, log=click.echo,
              cache_dir=cache_dir, stop_at=stop_at, cuda_graphs=cuda_graphs, compiled=compiled)
    except KeyError as exc:  # a saved training state without a field the trainer needs
        if not resume:
            raise
        raise CheckpointError(f"{out} has an incomplete training state (no {exc}); it cannot be resumed") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--prompt", "-p", default="ROMEO:", show_default=True)
@click.option("-n", "n_new", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--backend", type=click.Choice(["auto", "ort", "numba"]), default="auto", show_default=True,
              help="auto: ONNX Runtime with the C++ ops when built, else the Numba reference runtime.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads (at most this machine's cores).")
@click.option("--temperature", type=FiniteFloat(min=0.0, max=100.0), default=0.8, show_default=True,
              help="Sampling temperature (seeded, so runs repeat); 0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens; 0 = all.")
@click.option("--top-p", type=FiniteFloat(min=0.0, min_open=True, max=1.0), default=1.0, show_default=True,
              help="Sample among the most likely tokens whose probabilities reach p; 1 = all.")
@click.option("--repetition-penalty", type=FiniteFloat(min=0.0, min_open=True, max=100.0), default=1.0,
              show_default=True, help="Divide the logit of every token already in the text by this (HF's rule); 1 = off.")
@click.option("--ignore-eos", is_flag=True, help="Never end at the end-of-text token (it is not generated); "
              "by default generation stops there.")
@click.option("--max-context", type=click.IntRange(min=1), help="Stop cleanly once prompt + generated tokens reach "
              "this many positions (default and at most: the model's max_seq).")
@click.option("--engine", type=click.Choice(["auto", "genai", "loop"]), default="auto", show_default=True,
              help="With --backend ort: genai = ONNX Runtime GenAI's generate loop (pip install bmoe[genai]); "
              "loop = bmoe's own Python loop; auto = genai when installed and the export has its genai_config.json.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Sampling seed. Each engine has its own random generator: sampled text differs between "
              "--engine genai and loop (greedy text does not).")
@click.option("--json", "json_path", type=click.Path(), help="Write the run's report here.")
@click.option("--device", help="Plan for this device (bmoe devices lists them; or a .toml profile); "
              "off the device, threads are limited to its cores and its speed is estimated.")
@click.option("--budget-mb", type=BUDGET_MB, help="Memory budget (MiB) for the plan "
              "(default: the device's RAM less its reserved share).")
@click.option("--context", type=click.IntRange(min=1), help="Context length to plan the KV cache for "
              "(default: prompt + new tokens).")
@click.option("--lookahead", is_flag=True, help="When angles are streamed, prefetch the next layer's experts "
              "predicted by its router on the current hidden state.")
@click.option("--strict-budget", is_flag=True, help="Exit non-zero when the measured peak RSS exceeds the budget.")
@user_errors
def run_cli(model_dir, prompt, n_new, backend, threads, temperature, top_k, top_p, repetition_penalty, ignore_eos,
            max_context, engine, seed, json_path, device, budget_mb, context, lookahead, strict_budget):
    """Generate text with an exported model (default: the bundled one)."""
    import json
    import sys

    from bmoe_runtime.runtime.generate import GenerationStats, Generator
    from bmoe_runtime import default_model_dir
    from bmoe_runtime.planning import ram

    model_dir = model_dir or default_model_dir()
    backend = _backend(backend)
    threads = _cap_threads(threads)
    plan, slots = None, None
    planned = _planned_cache(model_dir)  # a planned directory streams as written: no rewrite at load
    if planned is not None and lookahead:
        raise BmoeError("--lookahead rewrites the graph at load: not for a planned directory (bmoe plan --write)")
    chosen = _engine(engine, backend, model_dir, streamed=False)  # planned with the chosen engine's overhead
    if device or budget_mb or context:  # plan first, then allocate
        plan, threads = _run_plan(model_dir, backend, device or "host", budget_mb, context, threads, prompt, n_new,
                                  max_context, chosen, planned)
        slots = plan[1].cache_experts if plan[1].streaming and planned is None else None
        if slots is not None and chosen == "genai":  # GenAI cannot stream: bmoe's loop, planned again for it
            chosen = _engine(engine, backend, model_dir, streamed=True)
            plan, threads = _run_plan(model_dir, backend, device or "host", budget_mb, context, threads, prompt,
                                      n_new, max_context, chosen)
            slots = plan[1].cache_experts if plan[1].streaming else None
    engine = chosen
    if engine == "genai":
        from bmoe_runtime.runtime.genai_engine import GenAIGenerator

        gen = GenAIGenerator(model_dir, threads)
    else:
        from bmoe_runtime.runtime.session import ModelSession  # imports numba: not in a GenAI run

        gen = Generator(ModelSession(model_dir, backend, threads, angle_cache_slots=slots,
                                     lookahead=lookahead and slots is not None))
    click.echo(f"[bmoe] {model_dir} on {backend}" + (" through ONNX Runtime GenAI" if engine == "genai" else ""),
               err=True)
    stats = GenerationStats()
    options = {"top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty,
               "eos": "suppress" if ignore_eos else "stop", "max_context": max_context or gen.cfg["max_seq"]}
    tokens = gen.tokens(gen.tokenizer.encode(prompt), n_new, temperature, seed, stats, **options)  # refuses bad settings now
    sys.stdout.write(prompt)  # only once the run is known to be valid
    shown = text = ""
    for _ in tokens:
        text = gen.tokenizer.decode(stats.tokens)
        stable = text.rstrip("\ufffd")  # a byte token may complete a character only later: hold it back
        sys.stdout.write(stable[len(shown):])
        sys.stdout.flush()
        shown = stable
    sys.stdout.write(text[len(shown):] + "\n")
    shown = text
    if stats.stop_reason == "context":
        click.echo(f"[bmoe] stopped at the context limit: {options['max_context']} positions "
                   f"({stats.prompt_tokens} prompt + {stats.new_tokens} new)", err=True)
    elif stats.stop_reason == "eos":
        click.echo(f"[bmoe] stopped at the end-of-text token after {stats.new_tokens} tokens", err=True)
    report = {"model": str(model_dir), "backend": backend, "engine": engine, "threads": threads,
              "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "stop_reason": stats.stop_reason,
              "sampling": {"temperature": temperature, "seed": seed, **options},
              "time_to_first_token_s": stats.first_token_s, "decode_tokens_per_s": stats.decode_tok_s,
              "decode_tokens_per_cpu_s": stats.decode_tok_per_cpu_s, "text": shown}
    click.echo(f"[bmoe] first token {stats.first_token_s * 1000:.1f} ms, decode {stats.decode_tok_s:.1f} tok/s", err=True)
    report["memory"] = ram.measure()
    if plan:
        report.update(_run_report(*plan, report["memory"], stats.decode_tok_s))
        _check_budget(plan[1], report["memory"], strict_budget)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


def _engine(engine: str, backend: str, model_dir, streamed: bool) -> str:
    """genai or loop: GenAI where it is installed and can run this (resident angles, an export with its
    genai_config.json); auto says why it falls back, an explicit --engine genai that cannot is an error."""
    from bmoe_runtime.format.genai_config import has_genai_files
    from bmoe_runtime.format.manifest import read_manifest
    from bmoe_runtime.runtime import genai_engine

    if engine == "loop" or (engine == "auto" and backend != "ort"):
        return "loop"
    why = None
    if backend != "ort":
        why = "needs --backend ort"
    elif not genai_engine.available():
        why = "is not installed (pip install bmoe[genai])"
    elif streamed:  # GenAI loads model.onnx as it is; streaming an export is a graph rewrite done by bmoe's session
        why = ("cannot stream angles from an export (bmoe's loop rewrites the graph at load; "
               "`bmoe plan --write` writes a directory GenAI streams)")
    elif not has_genai_files(read_manifest(model_dir, verify="none")):
        why = "needs the export's genai_config.json (exported before bmoe wrote it: re-export)"
    if why is None:
        return "genai"
    if engine == "genai":
        raise BmoeError(f"--engine genai: ONNX Runtime GenAI {why}")
    if genai_engine.available():  # installed but not usable here: say so
        click.echo(f"[bmoe] generating with bmoe's own loop: ONNX Runtime GenAI {why}", err=True)
    return "loop"


def _planned_cache(model_dir) -> int | None:
    """Experts a layer a planned directory caches (bmoe plan --write), None for an export."""
    from bmoe_runtime.format.manifest import read_manifest
    from bmoe_runtime.runtime.planned_dir import planned_cache

    return planned_cache(read_manifest(model_dir, verify="none"))  # the session verifies the files


def _run_plan(model_dir, backend: str, device: str, budget_mb: float | None, context: int | None,
              threads: int | None, prompt: str, n_new: int, max_context: int | None = None,
              engine: str = "loop", planned: int | None = None) -> tuple[tuple, int | None]:
    """Plan before loading: refuse what cannot fit, limit threads off-device, say what is not implemented.
    planned: a planned directory's cache (experts a layer), which the plan keeps."""
    from bmoe_runtime.planning.devices import resolve_device
    from bmoe_runtime.errors import BmoeError
    from bmoe_runtime.format.manifest import read_manifest
    from bmoe_runtime.planning.planner import MIB, Settings, make_plan, overhead_in_this_process, refusal
    from bmoe_runtime.format.tokenizer import load_tokenizer

    dev = resolve_device(device)
    manifest = read_manifest(model_dir, verify="size")  # the session checks sha256 as it reads the files
    tok = load_tokenizer(model_dir, manifest)  # bounded, and its own sha256 checked
    n_prompt = len(tok.encode(prompt))
    limit = min(max_context or manifest["config"]["max_seq"], manifest["config"]["max_seq"])
    n_new = max(1, min(n_new, limit - n_prompt))  # generation stops at the context limit
    if context is not None and context < n_prompt + n_new:
        raise BmoeError(f"--context {context} is shorter than the prompt ({n_prompt} tokens) + {n_new} new tokens")
    if not dev.is_host:
        if threads and threads > dev.cores:
            click.echo(f"[bmoe] --threads {threads} limited to {dev.name}'s {dev.cores} cores", err=True)
        # by default also no more than this host has: oversubscribed threads only slow the run down
        threads = min(threads or min(dev.cores, resolve_device("host").cores), dev.cores)
    settings = Settings(backend, context or n_prompt + n_new, n_prompt, 1, threads)
    budget = int(budget_mb * MIB) if budget_mb else None
    opts = manifest.get("export_options", {})  # this process is bmoe-run itself: measure its overhead here
    if engine == "genai":
        from bmoe_runtime.runtime import genai_engine

        overhead = genai_engine.overhead_in_this_process()
    else:
        overhead = overhead_in_this_process(backend, opts.get("packing", "2bit"), int(opts.get("act_quant", False)))
    plan = make_plan(manifest, dev, settings, budget, overhead, model_name=str(model_dir), cache_experts=planned)
    if planned is not None and not plan.fits:
        device = str(manifest["streamed"]["device"])[:60]
        raise BmoeError(f"{model_dir} was planned for {device} with {planned} experts "
                        f"a layer cached: that peaks at {plan.peak_bytes / MIB:.1f} MiB here, over the "
                        f"{plan.budget_bytes / MIB:.1f} MiB budget; plan the export again (bmoe plan --write)")
    if refusal(plan):
        raise BmoeError(refusal(plan))
    click.echo(f"[bmoe] {plan.summary()}", err=True)
    return (dev, plan), threads


def _check_budget(plan, memory: dict, strict: bool) -> None:  # Plan
    """The budget is a promise: a measured peak above it is reported loudly (and fails with --strict-budget)."""
    from bmoe_runtime.errors import BmoeError
    from bmoe_runtime.planning.planner import MIB

    peak = memory["peak_rss_bytes"]
    if peak is None:
        if strict:
            raise BmoeError("--strict-budget: peak RSS cannot be measured on this platform")
        return
    if peak > plan.budget_bytes:
        line = (f"BUDGET EXCEEDED: measured peak RSS {peak / MIB:.1f} MiB > budget {plan.budget_bytes / MIB:.1f} MiB "
                f"(predicted {plan.peak_bytes / MIB:.1f} MiB)")
        if strict:
            raise BmoeError(line)
        click.echo(f"[bmoe] {line}", err=True)


def _run_report(dev, plan, memory: dict, measured_tok_s: float) -> dict:  # Device, Plan
    """Planned vs measured memory, the angle cache's counters; off the device, a labelled estimate of its speed."""
    from bmoe_runtime.planning.planner import MIB
    from bmoe_runtime.runtime.streaming import cache_stats

    peak = memory["peak_rss_bytes"]
    ratio = peak / plan.peak_bytes if peak else None
    line = f"[bmoe] memory: peak RSS {peak / MIB:.1f} MiB" if peak else "[bmoe] memory: peak RSS unknown"
    if memory["pss_bytes"]:
        line += f", PSS {memory['pss_bytes'] / MIB:.1f} MiB"
    line += f"; predicted peak {plan.peak_bytes / MIB:.1f} MiB"
    line += f" (measured/predicted {ratio:.2f})" if ratio else ""
    click.echo(line, err=True)
    out = {"device": dev.to_dict(), "on_device": dev.is_here, "plan": plan.to_dict(),
           "memory": {**memory, "predicted_peak_bytes": plan.peak_bytes, "measured_over_predicted": ratio},
           "streaming": {"streamed": plan.streaming, "cache_experts_per_layer": plan.cache_experts}}
    if plan.streaming:
        counters = cache_stats(plan.settings["backend"])
        out["streaming"].update(counters, mb_streamed=counters["bytes_read"] / MIB)
        prefetch = (f", {counters['prefetches']} prefetched ({counters['prefetch_hits']} used)"
                    if counters.get("prefetches") else "")
        click.echo(f"[bmoe] angle cache: {plan.cache_experts}/{plan.n_experts} experts a layer; {counters['hits']} hits, "
                   f"{counters['misses']} misses{prefetch}, {counters['bytes_read'] / MIB:.2f} MiB read from angles.bin",
                   err=True)
    if dev.is_here:
        click.echo(f"[bmoe] measured on {dev.name} itself ({plan.settings['threads']} threads)", err=True)
    else:
        click.echo(f"[bmoe] NOT run on {dev.name}: ran on this host with {plan.settings['threads']} threads "
                   f"(at most {dev.name}'s {dev.cores} cores); the memory above is this host's", err=True)
        out["estimate"] = {"label": "ESTIMATE (not measured): memory/storage bandwidth bound, compute not modelled",
                           "device": dev.name, "decode_tokens_per_s": plan.estimate_tokens_per_s,
                           "ram_read_bytes_per_token": plan.ram_read_bytes_per_token,
                           "streamed_bytes_per_token": plan.streamed_bytes_per_token,
                           "mem_bandwidth_gbs": dev.mem_bandwidth_gbs, "measured_here_tokens_per_s": measured_tok_s}
        storage = (f" + {plan.streamed_bytes_per_token / 1024:.1f} KiB from storage" if plan.streaming else "")
        if plan.estimate_tokens_per_s is not None:
            click.echo(f"[bmoe] ESTIMATE for {dev.name}: <= {plan.estimate_tokens_per_s:,.0f} tok/s decode "
                       f"({plan.ram_read_bytes_per_token / MIB:.2f} MiB read per token at "
                       f"{dev.mem_bandwidth_gbs:g} GB/s{storage}; compute not modelled, so a ceiling)", err=True)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def devices_cli():
    """List the device profiles (and this host) the planner knows."""
    from bmoe_runtime.planning.devices import ALIASES, all_devices

    def num(v, fmt: str) -> str:
        return "unknown" if v is None else format(v, fmt)

    click.echo(f"{'name':<20}{'arch':<9}{'cores':>6}{'RAM MiB':>9}{'reserved':>9}{'budget MiB':>11}{'mem GB/s':>10}"
               f"{'read MB/s':>10}{'lat ms':>8}  isa")
    for d in all_devices():
        mark = "*" if d.is_here and not d.is_host else " "
        click.echo(f"{mark} {d.name:<18}{d.arch:<9}{d.cores:>6}{d.ram_mb:>9.0f}{d.reserved_fraction:>9.2f}"
                   f"{d.budget_bytes / 2**20:>11.0f}{num(d.mem_bandwidth_gbs, 'g'):>10}"
                   f"{num(d.storage_read_mbs, 'g'):>10}"
                   f"{num(d.storage_latency_ms, 'g'):>8}  {','.join(d.isa)}")
    click.echo("aliases: " + ", ".join(f"{a} -> {n}" for a, n in ALIASES.items()))
    click.echo("host: read from this machine (budget = MemAvailable; bandwidths not measured)")
    click.echo("marked *: this machine is that board (its detect markers match); bmoe-run --device measures on it")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--device", default="host", show_default=True, help="Profile name, alias, host, or a .toml file.")
@click.option("--budget-mb", type=BUDGET_MB, help="Memory budget in MiB.")
@click.option("--context", type=click.IntRange(min=1), help="KV positions (default: the model's max_seq).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "ort", "numba"]), default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(["python", "native"]),
              help="python: bmoe-run; native: an app embedding ONNX Runtime + libbmoe_ops (no Python). "
              "Default: the device profile's (native for the phones).")
@click.option("--overhead-mb", type=click.FloatRange(min=0, min_open=True, max=2**24),
              help="Runtime overhead in MiB, measured on the device (replaces this host's measurement).")
@click.option("--json", "json_path", type=click.Path(), help="Write the plan here.")
@click.option("--write", "write_dir", type=click.Path(), help="Write a planned model directory here: the export "
              "with its angles streamed from angles.bin through the plan's cache, in the graph itself (for ONNX "
              "Runtime GenAI and native apps; docs/embedding.md). Absent or empty, or a bmoe export with --force.")
@click.option("--force", is_flag=True, help="With --write: replace the bmoe export already there.")
@click.option("--lookahead", is_flag=True, help="With --write: also prefetch the next layer's experts predicted by "
              "its router (AnglePrefetch nodes in the graph).")
@user_errors
def plan_cli(model_dir, device, budget_mb, context, batch, backend, runtime, overhead_mb, json_path, write_dir,
             force, lookahead):
    """Plan memory for running MODEL_DIR on a device (default model: the bundled one)."""
    import json

    from bmoe_runtime import default_model_dir
    from bmoe_runtime.planning.devices import resolve_device
    from bmoe_runtime.format.manifest import read_manifest
    from bmoe_runtime.planning.planner import MIB, Settings, make_plan, refusal
    from bmoe_runtime.runtime.planned_dir import planned_cache, write_planned

    model_dir = model_dir or default_model_dir()
    backend = _backend(backend)
    dev = resolve_device(device)
    runtime = runtime or dev.runtime
    if runtime == "native":
        if backend == "numba":
            raise BmoeError("--runtime native is ONNX Runtime with libbmoe_ops: use --backend ort (or auto)")
        backend = "ort"  # a native app runs ORT; the library need not be built on this host to plan for it
    budget = int(budget_mb * MIB) if budget_mb else None
    overhead = (int(overhead_mb * MIB), "given: --overhead-mb") if overhead_mb else None
    manifest = read_manifest(model_dir, verify=True)
    if lookahead and not write_dir:
        raise BmoeError("--lookahead is written into the graph: use it with --write")
    if write_dir and planned_cache(manifest) is not None:
        raise BmoeError(f"{model_dir} is already a planned directory: plan the export it was written from")
    settings = Settings(backend, context, None, batch, runtime=runtime)

    def plan_for(cache: int | None):
        return make_plan(manifest, dev, settings, budget, overhead, model_name=str(model_dir), cache_experts=cache)

    plan = plan_for(planned_cache(manifest))
    if write_dir and plan.fits and not plan.streaming:  # everything fits: cache every expert, each read once
        plan = plan_for(plan.n_experts)
    click.echo(plan.table())
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(plan.to_dict(), f, indent=1)
    if refusal(plan):
        raise BmoeError(refusal(plan))
    if write_dir:
        out = write_planned(model_dir, write_dir, plan.cache_experts,
                            {"device": dev.name, "runtime": runtime, "budget_bytes": plan.budget_bytes,
                             "planned_peak_bytes": plan.peak_bytes}, force, lookahead)
        click.echo(f"wrote {out}: angles stream from angles.bin, {plan.cache_experts}/{plan.n_experts} experts a "
                   "layer cached (run it with bmoe-run, ONNX Runtime GenAI or a native app: docs/embedding.md)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_cli():
    """bmoe: train, export and run ButterflyMoE models."""


main_cli.add_command(train_cli, "train")
main_cli.add_command(run_cli, "run")
main_cli.add_command(devices_cli, "devices")
main_cli.add_command(plan_cli, "plan")

if __name__ == "__main__":
    main_cli()
