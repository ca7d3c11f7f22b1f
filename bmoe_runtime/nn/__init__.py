"""The PyTorch model: butterfly rotations, ternary quantization, MoE layers, the decoder LM (needs torch)."""
