"""longinfer: fast long-context prefill with dynamic sparse attention.

The public surface grows with the package; kernels live in :mod:`longinfer.ops`.
"""

__version__ = "0.1.0"
