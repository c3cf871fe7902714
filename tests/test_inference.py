"""ring_attn.inference: the sharded KV cache, ring_prefill (pass-KV, pass-Q, auto) and
ring_decode against single-device attention over the whole context.

Reference: torch's math SDPA in float64 on the full concatenated context (every cached
token + the new ones, in global order) with the global causal rule (key position <=
query position: bottom-right for a chunk attending to its whole prefix); ours must stay
within 4x torch's own error in the same dtype (helpers.assert_close_to_ref). Every
scenario interleaves prefill chunks (several in a row: chunked prefill), decode steps of
one and of two tokens, and a chunk smaller than P (ranks with no new token). gloo runs
P = 1..4 in one spawn of 4 processes on subgroups (as test_ring.py); the pure placement
and strategy functions are tested without a process group.
"""
from __future__ import annotations

import pytest
import torch

import ring_attn
from dist_utils import assert_all_ok, assert_subgroup_results, on_subgroups, run_ranks
from helpers import assert_close_to_ref, sdpa_reference, torch_sdpa
from ring_attn.comm import record_traffic
from ring_attn.errors import RingAttnError, RingAttnTypeError
from ring_attn.inference import (ShardedKVCache, choose_strategy, chunk_runs, decode_owners,
                                 pass_kv_bytes, pass_q_bytes, placement, ring_decode,
                                 ring_prefill)

# (kind, new tokens, strategy): chunked prefill, decode steps, a chunk smaller than P.
SCENARIO = [("prefill", 23, "pass_kv"), ("prefill", 9, "pass_q"), ("decode", 1, None),
            ("decode", 2, None), ("prefill", 3, "auto"), ("decode", 1, None),
            ("prefill", 12, "pass_q"), ("prefill", 5, "pass_kv")]
TOTAL = sum(n for _, n, _ in SCENARIO)


def _context(seed: int, hq: int, hk: int, dtype: torch.dtype, device: str, d: int = 12,
             dv: int = 10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, TOTAL, d, generator=g)
    k = torch.randn(2, hk, TOTAL, d, generator=g)
    v = torch.randn(2, hk, TOTAL, dv, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _expected(q, k, v, pos: torch.Tensor, end: int):
    """(float64 reference, torch in q's dtype) for the queries at pos over keys 0..end-1."""
    keys = torch.arange(end, device=q.device)
    mask = keys.view(1, -1) <= pos.view(-1, 1)
    args = (q.index_select(2, pos), k[:, :, :end], v[:, :, :end])
    ref = sdpa_reference(*args, attn_mask=mask, enable_gqa=True)
    theirs = torch_sdpa(*args, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return ref, theirs


def _run_scenario(cache: ShardedKVCache, q, k, v, failures: list, what: str,
                  strategies=None) -> None:
    t = 0
    for i, (kind, n, strategy) in enumerate(SCENARIO):
        if strategies is not None and strategy is not None:
            strategy = strategies[i % len(strategies)]
        if kind == "prefill":
            pos = cache.prefill_positions(n)
            ql, kl, vl = (x.index_select(2, pos) for x in (q, k, v))
            out = ring_prefill(ql, kl, vl, cache, strategy=strategy)
        else:
            pos = torch.arange(t, t + n, device=q.device)
            out = ring_decode(*(x[:, :, t:t + n] for x in (q, k, v)), cache)
            if cache.world_size > 1:  # every rank returns the same bits
                import torch.distributed as dist
                outs = [torch.empty_like(out) for _ in range(cache.world_size)]
                dist.all_gather(outs, out, group=cache.info.group)
                if not all(torch.equal(o, outs[0]) for o in outs):
                    failures.append(f"{what} step {i}: decode outputs differ between ranks")
        t += n
        ref, theirs = _expected(q, k, v, pos, t)
        try:
            assert_close_to_ref(out, theirs, ref, factor=4.0,
                                what=f"{what} step {i} {kind} n={n} {strategy}")
        except AssertionError as e:
            failures.append(str(e))
    # Equal shares: floor or ceil of T / P tokens per rank, memory = rows * row bytes.
    p, n_local = cache.world_size, cache.local_length()
    if not TOTAL // p <= n_local <= -(-TOTAL // p) or cache.length() != TOTAL:
        failures.append(f"{what}: rank holds {n_local} of {cache.length()} tokens")
    row = 2 * k.size(1) * (k.size(3) + v.size(3)) * k.element_size()
    if cache.memory_bytes() != n_local * row:
        failures.append(f"{what}: memory_bytes {cache.memory_bytes()} != {n_local} rows")
    # The cache holds this rank's rows at their global positions (K rows equal the input's).
    got = cache.keys()
    if not torch.equal(got, k.index_select(2, cache.positions())):
        failures.append(f"{what}: cached keys are not the inputs' rows at their positions")


def _check_one_rank(device: str) -> None:
    """P = 1 without torch.distributed: the whole scenario, fp32 / bf16 / fp64, MHA/GQA/MQA."""
    failures: list = []
    for hq, hk in ((4, 4), (4, 2), (4, 1)):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            q, k, v = _context(hq * 7 + hk, hq, hk, dtype, device)
            cache = ShardedKVCache(1, 2, hk, 12, 10, dtype=dtype, device=device)
            _run_scenario(cache, q, k, v, failures, f"P=1 {hq}/{hk} {dtype}")
    assert not failures, "\n".join(failures)


def test_inference_one_rank_cpu() -> None:
    _check_one_rank("cpu")


@pytest.mark.cuda
def test_inference_one_rank_cuda() -> None:
    _check_one_rank("cuda")


# ---- pure functions ------------------------------------------------------------------
def test_placement_balances_and_chunk_runs_cover_the_chunk() -> None:
    for p in range(1, 6):
        counts = [0] * p
        for n in (0, 1, 2, 3, 7, 16, 1, 1, 5, 33, 1):
            take = placement(counts, n)
            assert sum(take) == n
            counts = [c + t for c, t in zip(counts, take)]
            assert max(counts) - min(counts) <= 1, (p, counts)
            runs = chunk_runs(take)
            covered = sorted(i for rr in runs for s, m in rr for i in range(s, s + m))
            assert covered == list(range(n)), (p, take, runs)
            for r, rr in enumerate(runs):  # a head piece of ceil(n/2), a tail of floor(n/2)
                assert [m for _, m in rr] == [x for x in (take[r] - take[r] // 2,
                                                          take[r] // 2) if x > 0]
    # Decode tokens go round-robin once balanced, and to the emptiest ranks first.
    assert decode_owners([3, 3, 3, 3], 6) == [0, 1, 2, 3, 0, 1]
    assert decode_owners([4, 4, 3, 3], 3) == [2, 3, 0]


def test_choose_strategy_follows_the_bytes() -> None:
    f32, bf16 = torch.float32, torch.bfloat16
    kw = dict(exposed_round_bytes=0)  # bytes only
    assert choose_strategy(100, 0, 8, 8, 64, 64, f32, 4, **kw) == "pass_kv"   # no cache
    assert choose_strategy(100, 10_000, 8, 8, 64, 64, f32, 4, **kw) == "pass_q"  # long cache
    assert choose_strategy(100, 10_000, 8, 8, 64, 64, f32, 1, **kw) == "pass_kv"  # no sends
    # GQA g = 8: the queries are 8x the K/V per token, so pass-Q needs a 8x longer cache.
    assert choose_strategy(100, 500, 32, 4, 64, 64, f32, 4, **kw) == "pass_kv"
    assert choose_strategy(100, 900, 32, 4, 64, 64, f32, 4, **kw) == "pass_q"
    # The switch sits where the per-rank byte formulas cross (P = 4, balanced shards),
    # pass-Q's exposed round counted as x bytes.
    for x in (0, 2 ** 20, 3 * 2 ** 19, 3 * 2 ** 20):
        for dtype in (f32, bf16):
            for hq, hk in ((8, 8), (8, 2), (8, 1)):
                for t in (0, 64, 256, 1024, 4096, 16384, 65536):
                    n, b = 256, 2
                    kv = pass_kv_bytes([(t + n) // 4] * 4, b, hk, 64, 64, dtype, 0)
                    qb = pass_q_bytes([n // 4] * 4, b, hq, 64, 64, dtype, 0)
                    want = "pass_q" if qb + x < kv else "pass_kv"
                    got = choose_strategy(n, t, hq, hk, 64, 64, dtype, 4, b,
                                          exposed_round_bytes=x)
                    assert got == want, (x, dtype, hq, hk, t)


def test_cache_grows_geometrically_and_checks_arguments() -> None:
    assert (ring_attn.ShardedKVCache, ring_attn.ring_prefill, ring_attn.ring_decode) == \
        (ShardedKVCache, ring_prefill, ring_decode)
    cache = ShardedKVCache(2, 1, 2, 8, dtype=torch.float32)
    q = torch.randn(1, 4, 1, 8)
    kv = torch.randn(1, 2, 1, 8)
    with torch.inference_mode():  # a cache made outside inference mode grows inside it
        for _ in range(300):
            ring_decode(q, kv, kv, cache, layer=1)
    ring_decode(q, kv, kv, cache, layer=1)  # and goes on growing outside it
    assert cache.length(1) == 301 and cache.length(0) == 0
    assert cache.reallocations(1) <= 5  # 16 -> 32 -> ... -> 512: 5, not 300
    with pytest.raises(RingAttnError, match="layer must be in \\[0, 2\\)"):
        ring_decode(q, kv, kv, cache, layer=2)
    with pytest.raises(RingAttnError, match="dtype must be the cache's torch.float32"):
        ring_decode(q.double(), kv, kv, cache)
    with pytest.raises(RingAttnError, match="dim 1 \\(heads\\) must be 2"):
        ring_decode(q, q, q, cache)
    with pytest.raises(RingAttnError, match="requires grad"):
        ring_prefill(q.requires_grad_(), kv, kv, cache)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ring_prefill(q.detach(), kv, kv, cache, strategy="ring")
    with pytest.raises(RingAttnTypeError, match="ShardedKVCache"):
        ring_decode(q.detach(), kv, kv, object())
    # A serving batch of different cached lengths is refused, saying what is supported.
    two = ShardedKVCache(1, 2, 2, 8)
    q2, kv2 = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    ring_prefill(q2, kv2, kv2, two, cache_seqlens=torch.tensor([0, 0]))
    with pytest.raises(RingAttnError, match="different cached lengths in one batch are not "
                                            "supported: cache_seqlens = \\[3, 2\\].*same 3 "
                                            "tokens for each of its 2 sequences"):
        ring_decode(q2[:, :, :1], kv2[:, :, :1], kv2[:, :, :1], two, cache_seqlens=[3, 2])
    assert two.length() == 3


# ---- gloo, P = 1..4 --------------------------------------------------------------------
def _traffic_case(rank: int, p: int, group, failures: list) -> None:
    """Bytes on the wire equal strategy.py's closed forms (pass-KV, pass-Q, decode)."""
    hq, hk, d, dv = 4, 2, 12, 10
    q, k, v = _context(5, hq, hk, torch.float32, "cpu")
    cache = ShardedKVCache(1, 2, hk, d, dv, group=group)
    for n, strategy in ((20, "pass_kv"), (14, "pass_q")):
        counts = cache.counts()
        pos = cache.prefill_positions(n)
        with record_traffic() as tr:
            ring_prefill(*(x.index_select(2, pos) for x in (q, k, v)), cache, group=group,
                         strategy=strategy)
        take = [c2 - c1 for c1, c2 in zip(counts, cache.counts())]
        want = (pass_kv_bytes([c + t for c, t in zip(counts, take)], 2, hk, d, dv,
                              torch.float32, rank) if strategy == "pass_kv" else
                pass_q_bytes(take, 2, hq, d, dv, torch.float32, rank))
        if tr.bytes != want:
            failures.append(f"traffic P={p} rank {rank} {strategy}: {tr.bytes} != {want}")
    with record_traffic() as tr:
        t = cache.length()
        ring_decode(*(x[:, :, t:t + 1] for x in (q, k, v)), cache, group=group)
    want = (p - 1) * 2 * hq * (dv + 2) * 4
    if tr.bytes != want:
        failures.append(f"traffic P={p} rank {rank} decode: {tr.bytes} != {want}")


def _error_case(rank: int, p: int, group, failures: list) -> None:
    """A bad shard on one rank raises on every rank (before anything is sent)."""
    cache = ShardedKVCache(1, 1, 2, 8, group=group)
    # Two extra tokens on the last rank: no chunk size puts that many there (P > 1; one
    # rank's shard is the whole chunk, whatever its length).
    n = cache.prefill_positions(8).numel() + (2 if rank == p - 1 else 0)
    x = torch.randn(1, 2, n, 8)
    try:
        ring_prefill(x, x, x, cache, group=group)
        if p > 1:
            failures.append(f"errors P={p} rank {rank}: a wrong shard length did not raise")
    except RingAttnError as e:
        if "shards have" not in str(e):
            failures.append(f"errors P={p} rank {rank}: unexpected error {e}")
    if p > 1 and cache.length() != 0:
        failures.append(f"errors P={p} rank {rank}: the refused call changed the cache")
    cache = ShardedKVCache(1, 1, 2, 8, group=group)
    dtype = torch.float64 if rank == 0 else torch.float32
    try:
        y = torch.randn(1, 2, 1, 8, dtype=dtype)
        ring_decode(y, y, y, cache, group=group)
        failures.append(f"errors P={p} rank {rank}: a wrong dtype on rank 0 did not raise")
    except RingAttnError as e:
        if "dtype" not in str(e) and "rank(s) [0]" not in str(e):
            failures.append(f"errors P={p} rank {rank}: unexpected error {e}")


def _inference_in_group(r: int, p: int, group) -> tuple[int, list[str]]:
    failures: list = []
    n = 0
    for hq, hk in ((4, 4), (4, 2), (4, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            if p == 4 and dtype == torch.bfloat16 and hk == 4:
                continue  # 2 cores: P = 4 runs fewer cases
            q, k, v = _context(hq * 7 + hk, hq, hk, dtype, "cpu")
            cache = ShardedKVCache(1, 2, hk, 12, 10, dtype=dtype, group=group)
            _run_scenario(cache, q, k, v, failures, f"P={p} rank {r} {hq}/{hk} {dtype}")
            n += 1
    # Every prefill strategy on every chunk (pass-KV and pass-Q both exact).
    q, k, v = _context(3, 4, 2, torch.float32, "cpu")
    for strategies in (["pass_kv"], ["pass_q"]):
        cache = ShardedKVCache(1, 2, 2, 12, 10, group=group)
        _run_scenario(cache, q, k, v, failures, f"P={p} rank {r} all {strategies}",
                      strategies)
        n += 1
    _traffic_case(r, p, group, failures)
    _error_case(r, p, group, failures)
    return n, failures


def inference_checks(rank: int, world_size: int) -> dict[int, tuple[int, list[str]]]:
    return on_subgroups(rank, world_size, _inference_in_group)


def test_inference_gloo_matches_single_device(tmp_path) -> None:
    results = assert_all_ok(run_ranks(inference_checks, 4, tmp_path, pg_timeout_s=60,
                                      join_timeout_s=240))
    assert_subgroup_results(results, 4, min_cases=7)


def test_generate_example_matches_one_process() -> None:
    """examples/generate.py under torchrun at P = 2 (chunked prefill, then decode) gives
    exactly the tokens of the same model in one process without ring_attn."""
    from test_examples import _torchrun
    out = _torchrun("generate.py", "--prompt-len", "96", "--chunk", "40", "--new-tokens", "6",
                    "--dtype", "float64")
    assert "PASS: P = 2 generated the same 6 tokens as one process" in out, out
    assert "cache 51 of 101 tokens" in out and "cache 50 of 101 tokens" in out, out
