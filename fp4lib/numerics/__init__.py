"""Numerics of FP4: element formats, block scaling, the compiled kernels and error analysis."""
