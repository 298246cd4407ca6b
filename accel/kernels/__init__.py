"""Shared attention kernels: block-sparse flash attention with LSE (Triton on CUDA, PyTorch elsewhere), dense
attention with LSE and the block-mass pass that sparse-attention searches use. See ``accel.kernels.block_sparse``."""

from .block_sparse import attention_with_lse, block_mass, block_sparse_attention

__all__ = ["attention_with_lse", "block_mass", "block_sparse_attention"]
