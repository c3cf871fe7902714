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
what differs is the bytes and what overlaps: every pass-KV transfer overlaps a compute
step, while pass-Q's partials go home after its last one. "auto" picks the strategy
that sends fewer bytes once pass-Q's exposed tail is counted as bytes (X + c * B * N * Hq *
(Dv * a + 8), below): pass-Q iff (P-1)/P * B * [N * Hq * (D * e + Dv * a + 8)] + tail <
(P-1)/P * B * [(T + N) * Hk * (D + Dv) * e]. Without the tail, with D = Dv and g = Hq / Hk,
that is T + N > g * N * (1 + 1/D) in float32 and T + N > 1.5 * g * N * (1 + 4/(3 D)) in
bf16: pass-Q once the cache is longer than about g (1.5 g) times the chunk; the tail moves
the switch to longer caches. The crossover measured on CPU/gloo:
benchmarks/results/inference.md.
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


# pass-Q's partials go home after its last compute, and the owner then merges P - 1 of
# them: a tail that nothing overlaps and pass-KV does not pay. Counted as the bytes the
# link would move in that time: a fixed round (latency x bandwidth) plus TAIL_FACTOR times
# the chunk's partial (out, lse) bytes, since the last message and the merges grow with the
# chunk. Fitted on benchmarks/bench_inference.py's grid (P = 4 gloo ranks, 2-core VM): on
# the quiet run (load 2.4) a bytes-only switch at 3 MiB was wrong by 1.34x at Hq:Hk 8:2,
# T 4096, N 64 (pass-KV 2.86 MiB more, pass-Q faster: 9.8 vs 13.0 ms) yet right at 8:8,
# T 1024, N 256 (2.99 MiB more, pass-KV faster: 13.8 vs 16.0 ms): no constant separates
# them, a tail growing with N does. 2.25 MiB + 2 x partials: 29 of 30 points of that run,
# worst 1.01x (a fit on that run; the loaded runs disagree with each other by up to 1.9x
# at the near-ties, benchmarks/results/inference.md). On NVLink-class links (~10 us x
# 100 GB/s) the round would be ~1 MB.
EXPOSED_ROUND_BYTES = 9 * 2 ** 18  # 2.25 MiB
TAIL_FACTOR = 2.0


def choose_strategy(n_new: int, n_cached: int, heads: int, kv_heads: int, head_dim: int,
                    value_head_dim: int, dtype: torch.dtype, world_size: int,
                    batch: int = 1, exposed_round_bytes: int = EXPOSED_ROUND_BYTES,
                    tail_factor: float = TAIL_FACTOR) -> str:
    """"pass_q" when its bytes per rank plus its exposed tail (exposed_round_bytes +
    tail_factor x the chunk's partial bytes) are fewer than pass-KV's (balanced shards),
    else "pass_kv"; one rank: "pass_kv" (nothing is sent)."""
    if world_size <= 1 or n_new == 0:
        return "pass_kv"
    e, a = _sizes(dtype)
    share = batch * (world_size - 1) / world_size  # each rank sends P - 1 of P shares
    kv = share * (n_cached + n_new) * kv_heads * (head_dim + value_head_dim) * e
    q = share * n_new * heads * (head_dim * e + value_head_dim * a + 8)
    tail = exposed_round_bytes + tail_factor * batch * n_new * heads * (value_head_dim * a + 8)
    return "pass_q" if q + tail < kv else "pass_kv"
