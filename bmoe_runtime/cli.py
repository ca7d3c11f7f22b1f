"""Console scripts: bmoe-train, bmoe-run and the `bmoe` tool."""

from __future__ import annotations

import click

from .errors import user_errors
from .moe import EXPERT_FORMS, VARIANTS
from .train import PRESETS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(), help="Corpus: a directory with train/valid/test.txt, or one text file (split 90/10).")
@click.option("--out", required=True, type=click.Path(), help="Checkpoint to write (model.pt).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--variant", type=click.Choice(VARIANTS), default="butterfly", show_default=True)
@click.option("--expert-form", type=click.Choice(EXPERT_FORMS), default="paper", show_default=True)
@click.option("--experts", type=int, help="Number of experts N (preset's by default).")
@click.option("--top-k", type=int, help="Experts per token (preset's by default).")
@click.option("--d-model", type=int)
@click.option("--d-ff", type=int)
@click.option("--layers", type=int)
@click.option("--steps", type=int, help="Optimizer steps (preset's by default).")
@click.option("--batch", type=int)
@click.option("--seq", type=int)
@click.option("--lr", type=float)
@click.option("--eval-every", type=int)
@click.option("--per-tensor-scale", is_flag=True, help="One ternary scale per matrix instead of per row.")
@click.option("--tokenizer", type=click.Choice(["byte", "bpe"]), default="byte", show_default=True)
@click.option("--bpe-vocab", type=int, default=4096, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from --out's saved training state.")
@user_errors
def train_cli(data, out, preset, variant, expert_form, experts, top_k, d_model, d_ff, layers, steps, batch, seq, lr,
              eval_every, per_tensor_scale, tokenizer, bpe_vocab, device, seed, resume):
    """Train a ButterflyMoE language model (or a baseline) on a text corpus."""
    from .train import train

    model = {"variant": variant, "expert_form": expert_form, "n_experts": experts, "top_k": top_k,
             "d_model": d_model, "d_ff": d_ff, "n_layers": layers}
    if per_tensor_scale:
        model["per_row_scale"] = False
    run = {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "eval_every": eval_every, "seed": seed}
    train(data, out, preset, {k: v for k, v in model.items() if v is not None},
          {k: v for k, v in run.items() if v is not None}, tokenizer, bpe_vocab, device, resume, log=click.echo)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--prompt", "-p", default="ROMEO:", show_default=True)
@click.option("-n", "n_new", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--backend", type=click.Choice(["auto", "ort", "numba"]), default="auto", show_default=True,
              help="auto: ONNX Runtime with the C++ ops when built, else the Numba reference runtime.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="Write the run's report here.")
@user_errors
def run_cli(model_dir, prompt, n_new, backend, threads, temperature, seed, json_path):
    """Generate text with an exported model (default: the bundled one)."""
    import json
    import sys

    from .generate import GenerationStats, Generator
    from .session import ModelSession
    from . import default_model_dir, ort_ops

    model_dir = model_dir or default_model_dir()
    if backend == "auto":
        backend = "ort" if ort_ops.available() else "numba"
    gen = Generator(ModelSession(model_dir, backend, threads))
    click.echo(f"[bmoe] {model_dir} on {backend}", err=True)
    stats = GenerationStats()
    sys.stdout.write(prompt)
    shown = ""
    for _ in gen.tokens(gen.tokenizer.encode(prompt), n_new, temperature, seed, stats):
        text = gen.tokenizer.decode(stats.tokens)
        sys.stdout.write(text[len(shown):])  # a byte token may complete a character only later
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    report = {"model": str(model_dir), "backend": backend, "threads": threads, "prompt_tokens": stats.prompt_tokens,
              "new_tokens": stats.new_tokens, "time_to_first_token_s": stats.first_token_s,
              "decode_tokens_per_s": stats.decode_tok_s, "text": shown}
    click.echo(f"[bmoe] first token {stats.first_token_s * 1000:.1f} ms, decode {stats.decode_tok_s:.1f} tok/s", err=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_cli():
    """bmoe: train, export and run ButterflyMoE models."""


main_cli.add_command(train_cli, "train")
main_cli.add_command(run_cli, "run")

if __name__ == "__main__":
    main_cli()
