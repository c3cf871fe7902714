"""ring_attn: exact attention over sequences split across ranks, on fused CPU/CUDA kernels."""
from .functional import scaled_dot_product_attention

__all__ = ["scaled_dot_product_attention"]
__version__ = "0.1.0"
