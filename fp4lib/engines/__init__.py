"""Bridges to engines with real FP4 storage and kernels: bitsandbytes, torchao and block-scaled GEMMs."""
