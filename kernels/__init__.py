"""Triton kernels of groie-triton, installed as ``groie_triton.kernels``. They know nothing of nn.Modules."""
