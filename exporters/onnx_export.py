"""Export: PyTorch module → OUTDIR with model.onnx, weights.bin, angles.bin, manifest.json.

Graph capture is torch.onnx's dynamo exporter; expert banks are first swapped for their
packed forms (packed.py) so every ButterflyMoE bank becomes
ButterflyRotate → TernaryMatMul → ButterflyRotate. Initializers are then laid out by us:
angle tables in their own file (the planner streams experts' angles from it, each
expert a contiguous slice), everything else in weights.bin, 64-byte aligned for mmap.
The directory is built under a temporary name beside OUTDIR (format/export_dir.py) and renamed
into place only when complete and checked, so a failed export never leaves a directory that
looks valid, and a killed one's leftovers are removed by the next export to OUTDIR. OUTDIR may
be absent or empty; a previous bmoe export there is replaced only with force; anything else
(a user's files) is refused, never deleted.

Memory is bounded by about the checkpoint's size plus a fixed cost (docs/memory.md): the checkpoint
is mapped, not copied (mapped.py), its model is packed in place, and the weights reach the files
straight from those tensors, one at a time (external.py), never through a proto holding them all.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from bmoe_runtime.format import op_schemas
from bmoe_runtime.format.export_dir import check_out_dir, staged_export
from bmoe_runtime.format.manifest import MANIFEST, build_manifest
from bmoe_runtime.nn.model import MoELM
from bmoe_runtime.format.packing import PACKINGS

from .compress import EMBED_FORMATS, LINEAR_FORMATS, compress_graph, prepare_linears
from .external import DeferredTensors, write_external
from .genai import genai_files
from .mapped import load_mapped
from .packed import ANGLE_DTYPES, pack_banks
from .torch_ops import TRANSLATIONS

OPSET = 20
MODEL_FILE = "model.onnx"


@dataclass
class ExportOptions:
    packing: str = "2bit"  # or "base3" (1.6 bits a weight)
    angle_dtype: str = "fp16"  # fp32 | fp16 | int8
    act_quant: bool = False  # int8 activations in TernaryMatMul
    # the dense weights around the experts (compress.py): fp32 | int4 | ternary (needs QAT) / fp32 | int8 | int4
    attn: str = "fp32"
    proj: str = "fp32"  # the paper form's shared projection
    embed: str = "fp32"  # token table + tied head, positions
    block_size: int = 32  # int4/int8: weights per scale along K

    def formats(self) -> dict[str, str]:
        """The compressed components (manifest kinds) and their formats."""
        chosen = {"attention": self.attn, "shared_projection": self.proj, "embeddings": self.embed}
        return {kind: fmt for kind, fmt in chosen.items() if fmt != "fp32"}

    def __post_init__(self) -> None:
        for name, allowed in (("attn", LINEAR_FORMATS), ("proj", LINEAR_FORMATS), ("embed", EMBED_FORMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} format {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.packing not in PACKINGS:
            raise ValueError(f"unknown packing {self.packing!r}; expected one of {', '.join(PACKINGS)}")
        if self.angle_dtype not in ANGLE_DTYPES:
            raise ValueError(f"unknown angle dtype {self.angle_dtype!r}; expected one of {', '.join(ANGLE_DTYPES)}")


class DecodeStep(nn.Module):
    """The LM as one incremental step: (ids, attention mask, positions, past KV) → (logits, present KV).
    attention_mask [B, P+T] (0 at padding) and position_ids [B, T] follow ONNX Runtime GenAI's decoder
    inputs, so each row of a padded batch (pads hidden wherever they are) generates as it would alone;
    bmoe's session fills them in for a caller that does not pad (runtime/session.py)."""

    def __init__(self, lm: MoELM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.lm(input_ids, pairs, attention_mask, position_ids)
        return logits, [t for kv in present for t in kv]


def kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _capture(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
             dynamic_shapes) -> tuple[onnx.ModelProto, DeferredTensors]:
    """The graph as a proto whose large initializers are placeholders, and the tensors they stand for."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    custom_translation_table=TRANSLATIONS, external_data=False, verbose=False)
    tensors = DeferredTensors()
    tensors.defer(program.model)
    model = program.model_proto  # without the deferred tensors' bytes
    for node in model.graph.node:  # drop the exporter's per-node stack traces: they triple model.onnx
        del node.metadata_props[:]
        node.doc_string = ""
    return model, tensors


def _write_dir(out_dir: Path, model: onnx.ModelProto, meta: dict, extra: dict[str, str], force: bool,
               tensors: DeferredTensors | None = None) -> Path:
    """tensors: the bytes of the proto's placeholder initializers (_capture); None when it holds them all."""
    with staged_export(Path(out_dir), force) as tmp:
        write_external(model, tmp, tensors or DeferredTensors())
        onnx.save(model, tmp / MODEL_FILE)
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        for name, text in extra.items():
            (tmp / name).write_text(text, encoding="utf-8")
        manifest = build_manifest(tmp, model, meta)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return Path(out_dir)


def _detached_memo(module: nn.Module) -> dict[int, torch.Tensor]:
    """deepcopy memo mapping each non-leaf tensor a module holds as a plain attribute (e.g. the
    `balance_loss` of a training forward) to a detached copy: torch cannot deepcopy non-leaf tensors."""
    return {id(v): v.detach().clone() for m in module.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}


def export_module(module: nn.Module, example_inputs: tuple, out_dir: str | Path, input_names: list[str],
                  output_names: list[str], dynamic_shapes=None, options: ExportOptions | None = None,
                  meta: dict | None = None, extra_files: dict[str, str] | None = None, force: bool = False) -> Path:
    """Export any nn.Module containing bmoe layers (its banks are packed on a copy). force: replace
    a previous bmoe export in out_dir."""
    check_out_dir(Path(out_dir), force)  # before minutes of work
    return _export_owned(copy.deepcopy(module, _detached_memo(module)), example_inputs, out_dir, input_names,
                         output_names, dynamic_shapes, options, meta, extra_files, force)


def _export_owned(module: nn.Module, example_inputs: tuple, out_dir: str | Path, input_names: list[str],
                  output_names: list[str], dynamic_shapes, options: ExportOptions | None, meta: dict | None,
                  extra_files: dict[str, str] | None, force: bool) -> Path:
    """export_module on a module the export may change (its banks and linears are swapped in place)."""
    options = options or ExportOptions()
    op_schemas.register()
    module.eval()
    n_banks = pack_banks(module, options.packing, options.angle_dtype, options.act_quant)
    prepare_linears(module, options.formats(), options.packing, options.act_quant)
    with torch.no_grad():
        model, tensors = _capture(module, example_inputs, input_names, output_names, dynamic_shapes)
    compress_graph(model, options.formats(), options.block_size, tensors.array, tensors.initializer)
    meta = {"kind": "module", **(meta or {}), "export_options": asdict(options), "expert_banks": n_banks,
            "inputs": input_names, "outputs": output_names}
    return _write_dir(Path(out_dir), model, meta, extra_files or {}, force, tensors)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                      force: bool = False) -> Path:
    """Export a bmoe-train checkpoint as an incremental decoder with a KV cache."""
    check_out_dir(Path(out_dir), force)
    model, tok, ckpt = load_mapped(checkpoint)  # weights mapped from the file, not copied
    cfg = model.cfg
    d_head = cfg.d_model // cfg.n_heads
    # Distinct example sizes keep every dynamic dim symbolic in the captured graph.
    batch, seq, past_len = 2, 3, 5
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.zeros(batch, cfg.n_heads, past_len, d_head) for _ in range(2 * cfg.n_layers)]
    b, t, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic = {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: torch.export.Dim("total")},
               "position_ids": {0: b, 1: t}, "past": [{0: b, 2: p} for _ in past]}  # total = past + seq (derived)
    meta = {"kind": "lm", "config": cfg.to_dict(), "metrics": {k: v for k, v in ckpt["metrics"].items() if k != "history"},
            "tokenizer": "tokenizer.json", "kv_layout": "[batch, heads, positions, d_head]"}
    inputs = ["input_ids", "attention_mask", "position_ids", *kv_names(cfg.n_layers, "past")]
    extra = genai_files(cfg.to_dict(), tok, inputs=inputs)  # tokenizer.json (Hugging Face) + the GenAI files
    return _export_owned(DecodeStep(model), (ids, mask, positions, past), out_dir, inputs,  # ours: no copy
                         ["logits", *kv_names(cfg.n_layers, "present")], dynamic, options, meta, extra, force)
