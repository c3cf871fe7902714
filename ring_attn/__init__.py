"""ring_attn: exact attention over sequences split across ranks, on fused CPU/CUDA kernels."""
from .documents import cu_seqlens_from_position_ids
from .functional import attention, scaled_dot_product_attention
from .inference import ShardedKVCache, ring_decode, ring_prefill
from .layout import pad_for_ring, positions, resolve_layout, shard, unshard
from .parallel.hybrid import hybrid_attention, hybrid_positions, hybrid_shard, hybrid_unshard
from .parallel.ulysses import ulysses_attention
from .profile import profile
from .ring import ring_attention
from .sequence_parallel import sequence_parallel
from .varlen import varlen_attention
from . import packing, plan, simulated  # noqa: E402,F401  (subpackages / modules by name)

__all__ = ["scaled_dot_product_attention", "attention", "varlen_attention",
           "cu_seqlens_from_position_ids", "ring_attention", "ulysses_attention",
           "hybrid_attention", "shard", "unshard", "positions", "pad_for_ring",
           "resolve_layout", "hybrid_shard", "hybrid_unshard", "hybrid_positions",
           "sequence_parallel", "profile", "ShardedKVCache", "ring_prefill", "ring_decode"]
__version__ = "0.1.0"
