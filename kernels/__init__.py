"""Shared attention kernels (block-sparse flash attention with LSE): Triton on CUDA, a PyTorch path elsewhere.

Nothing is implemented here yet; the sparse-attention issue fills this package.
"""
