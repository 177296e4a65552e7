"""Sparse-attention kernels (Triton) and their reference semantics (kernels landing)."""
