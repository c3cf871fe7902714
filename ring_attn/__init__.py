"""ring_attn: exact attention over sequences split across ranks, on fused CPU/CUDA kernels."""
from .functional import scaled_dot_product_attention
from .layout import pad_for_ring, positions, shard, unshard
from .ring import ring_attention
from .sequence_parallel import sequence_parallel
from . import simulated  # noqa: E402,F401  (ring_attn.simulated.simulated_ring_attention)

__all__ = ["scaled_dot_product_attention", "ring_attention", "shard", "unshard", "positions",
           "pad_for_ring", "sequence_parallel"]
__version__ = "0.1.0"
