"""bmoe-export: PyTorch ButterflyMoE models → ONNX with the ai.bmoe custom ops."""

from .onnx_export import ExportOptions, export_checkpoint, export_module

__all__ = ["ExportOptions", "export_checkpoint", "export_module"]
