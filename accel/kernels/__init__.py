"""Shared attention kernels: block-sparse flash attention with LSE (Triton on CUDA, PyTorch elsewhere), dense
attention with LSE, the block-mass passes that sparse-attention searches use, exact or from sampled rows
(``accel.kernels.block_sparse``), attention over each query token's own choice of key blocks
(``accel.kernels.token_sparse``), and block selections with their recall (``accel.kernels.selection``).
``accel.kernels.triton_backend`` holds the Triton kernel itself (imports ``triton``)."""

from .block_sparse import (
    attention_with_lse,
    block_mass,
    block_sparse_attention,
    dense_break_even,
    sampled_block_mass,
)
from .selection import mask_from_selection, recall, selected_key_tokens, selection_from_mask, top_k_selection
from .token_sparse import token_sparse_attention

__all__ = ["attention_with_lse", "block_mass", "block_sparse_attention", "dense_break_even", "mask_from_selection",
           "recall",
           "sampled_block_mass", "selected_key_tokens", "selection_from_mask", "token_sparse_attention",
           "top_k_selection"]
