"""Training: corpus, checkpoints and the training loop (needs torch)."""
