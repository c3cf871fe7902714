"""Pass-KV or pass-Q for a prefill chunk: bytes each rank sends, and the choice "auto"
makes from them. Pure: unit-tested without a process group (tests/test_inference.py);
the gloo tests assert that the bytes counted on the wire equal these formulas.

Per rank, for a chunk of N new tokens over T cached ones (P ranks, B sequences, Hq query
heads, Hk KV heads, head dims D / Dv, e bytes per input element, a = 4 bytes per float32
accumulator element, 8 for float64 inputs):

  pass-KV  each rank's shard (cache + new: (T + N) / P tokens) visits every other rank:
           P - 1 messages of (T + N) / P * B * Hk * (D + Dv) * e
  pass-Q   each rank's queries visit every other rank, and each visited rank sends the
           partial (out, lse) home:
           P - 1 messages of N / P * B * Hq * D * e      (queries)
         + P - 1 messages of N / P * B * Hq * (Dv * a + 8) (out and float64 lse)

Both do the same kernel work (every new query against every cached and earlier new key);
what differs is the bytes and the messages: pass-Q sends P - 1 more (the partials), and
its last partial goes home after its last compute step, where the owner then merges:
an exposed round that pass-KV does not pay. "auto" picks the strategy that sends fewer
bytes once that round is counted as X bytes (the link's latency times its bandwidth):
pass-Q iff (P-1)/P * B * N * Hq * (D * e + Dv * a + 8) + X < (P-1)/P * B * (T + N) * Hk *
(D + Dv) * e. Without X, with D = Dv and g = Hq / Hk, that is T + N > g * N * (1 + 1/D) in
float32 and T + N > 1.5 * g * N * (1 + 4/(3 D)) in bf16: pass-Q once the cache is longer
than about g (1.5 g) times the chunk; X moves the switch to longer caches, most for short
chunks. The crossover measured on CPU/gloo: benchmarks/results/inference.md.
"""
from __future__ import annotations

import torch

STRATEGIES = ("auto", "pass_kv", "pass_q")


def check_strategy(strategy: object) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"ring_attn: strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _sizes(dtype: torch.dtype) -> tuple[int, int]:
    e = torch.empty((), dtype=dtype).element_size()
    return e, 8 if dtype == torch.float64 else 4


def pass_kv_bytes(rows_per_rank: list[int], batch: int, kv_heads: int, head_dim: int,
                  value_head_dim: int, dtype: torch.dtype, rank: int) -> int:
    """Bytes rank sends in a pass-KV prefill: the shards (cache + new rows) of every rank
    but the one it would receive next (rank + 1's), which completed its tour."""
    p = len(rows_per_rank)
    e, _ = _sizes(dtype)
    sent = sum(rows_per_rank[(rank - t) % p] for t in range(p - 1))
    return sent * batch * kv_heads * (head_dim + value_head_dim) * e


def pass_q_bytes(new_per_rank: list[int], batch: int, heads: int, head_dim: int,
                 value_head_dim: int, dtype: torch.dtype, rank: int) -> int:
    """Bytes rank sends in a pass-Q prefill: the queries of ranks rank, rank - 1, ...
    (P - 1 hops), and the partial (out, lse) of every other rank's queries, home."""
    p = len(new_per_rank)
    e, a = _sizes(dtype)
    queries = sum(new_per_rank[(rank - t) % p] for t in range(p - 1))
    partials = sum(new_per_rank[s] for s in range(p) if s != rank)
    return batch * heads * (queries * head_dim * e + partials * (value_head_dim * a + 8))


# X, fitted on benchmarks/bench_inference.py's grid (P = 4 gloo ranks on the 2-core VM,
# 30 points of (Hk, T, N); each point 7-25 pairs of 8-layer prefills, the strategy faster
# in the median pair). Pooled over the two runs of 2026-11-29 01:09 and 01:14 UTC, every X
# from 0.75 to 2.25 MiB picks the faster at all 30 points, 0.5 MiB and 3 MiB at 25 (worst
# 1.14x): 1.5 MiB, the middle; two later runs 28 and 30 of 30 (worst 1.07x). Pooled over
# the four, resolved points pin it: pass-KV is faster where it sends 0.70 MiB more (Hk 8,
# T 256, N 1024: 0.97x), pass-Q where pass-KV sends 2.86-2.99 MiB more (Hk 8, T 1024:
# 1.07-1.14x; Hk 2, T 4096, N 64: 1.06x). A tail growing with the chunk (the rule before,
# fitted on best-of-9 single calls: 2.25 MiB + 2x the partials) kept pass-KV at Hk 8,
# T 1024, N 256 and 1024, 1.06-1.18x slower. On NVLink-class links (~10 us x 100 GB/s) X
# would be ~1 MB; not measured.
EXPOSED_ROUND_BYTES = 3 * 2 ** 19  # 1.5 MiB


def choose_strategy(n_new: int, n_cached: int, heads: int, kv_heads: int, head_dim: int,
                    value_head_dim: int, dtype: torch.dtype, world_size: int,
                    batch: int = 1, exposed_round_bytes: int = EXPOSED_ROUND_BYTES) -> str:
    """"pass_q" when its bytes per rank plus its exposed round (exposed_round_bytes) are
    fewer than pass-KV's (balanced shards), else "pass_kv"; one rank: "pass_kv" (nothing
    is sent)."""
    if world_size <= 1 or n_new == 0:
        return "pass_kv"
    e, a = _sizes(dtype)
    share = batch * (world_size - 1) / world_size  # each rank sends P - 1 of P shares
    kv = share * (n_cached + n_new) * kv_heads * (head_dim + value_head_dim) * e
    q = share * n_new * heads * (head_dim * e + value_head_dim * a + 8)
    return "pass_q" if q + exposed_round_bytes < kv else "pass_kv"
