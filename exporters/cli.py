"""bmoe-export model.pt -o OUTDIR."""

from __future__ import annotations

import json

import click

from bmoe_runtime.errors import user_errors
from bmoe_runtime.format.packing import PACKINGS

from .compress import EMBED_FORMATS, LINEAR_FORMATS
from .packed import ANGLE_DTYPES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Directory to write: absent or empty (a previous export there only with --force).")
@click.option("--force", is_flag=True, help="Replace the bmoe export in OUT (never a directory holding anything else).")
@click.option("--packing", type=click.Choice(PACKINGS), default="2bit", show_default=True,
              help="Trit layout: 2bit (fast) or base3 (1.6 bits a weight).")
@click.option("--angles", "angle_dtype", type=click.Choice(ANGLE_DTYPES), default="fp16", show_default=True)
@click.option("--act-quant", is_flag=True, help="int8 activations in TernaryMatMul.")
@click.option("--attn", type=click.Choice(LINEAR_FORMATS), default="fp32", show_default=True,
              help="Attention projections: int4 (MatMulNBits, any checkpoint) or ternary (trained with --ternary attn).")
@click.option("--proj", type=click.Choice(LINEAR_FORMATS), default="fp32", show_default=True,
              help="The paper form's shared projection: int4, or ternary (trained with --ternary proj).")
@click.option("--embed", type=click.Choice(EMBED_FORMATS), default="fp32", show_default=True,
              help="Token/position embeddings and the tied LM head: int8 or int4 blockwise.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="int4/int8: weights sharing one scale.")
@user_errors
def export_cli(checkpoint, out_dir, force, packing, angle_dtype, act_quant, attn, proj, embed, block_size):
    """Export a bmoe-train checkpoint to ONNX with the ai.bmoe custom ops."""
    from .onnx_export import ExportOptions, export_checkpoint

    options = ExportOptions(packing, angle_dtype, act_quant, attn, proj, embed, int(block_size))
    click.echo(f"exporting {checkpoint} ({packing} trits, {angle_dtype} angles, attention {attn}, "
               f"projection {proj}, embeddings {embed}) ...", err=True)
    out = export_checkpoint(checkpoint, out_dir, options, force=force)
    manifest = json.loads((out / "manifest.json").read_text())
    for kind, n in sorted(manifest["bytes_by_kind"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  {kind:<18} {n / 1024:10.1f} KiB")
    total = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"wrote {out} ({total / 1024:.1f} KiB in {len(manifest['files'])} files)")


if __name__ == "__main__":
    export_cli()
