"""Long-context inference across ranks: the sharded KV cache (cache.py), prefill by
pass-KV or pass-Q (prefill.py, choice in strategy.py) and decode (decode.py), all over the
same partial-attention step (partial.py) and the exact lse merge (merge.py)."""
from .cache import ShardedKVCache, chunk_positions, chunk_runs, decode_owners, placement
from .decode import ring_decode
from .prefill import ring_prefill
from .strategy import choose_strategy, pass_kv_bytes, pass_q_bytes

__all__ = ["ShardedKVCache", "ring_prefill", "ring_decode", "choose_strategy",
           "placement", "chunk_runs", "chunk_positions", "decode_owners", "pass_kv_bytes",
           "pass_q_bytes"]
