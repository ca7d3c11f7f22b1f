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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_cli():
    """bmoe: train, export and run ButterflyMoE models."""


main_cli.add_command(train_cli, "train")

if __name__ == "__main__":
    main_cli()
