"""Kernels for the ai.bmoe ops: the C++ library through ONNX Runtime, and the Numba reference (no torch)."""
