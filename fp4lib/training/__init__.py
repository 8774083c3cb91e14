"""Simulated FP4 training: operand specs, FP4 layers, recipes, the model, the loop, one run, checkpoints and data parallelism."""
