"""Sliding windows, packed documents and softcap through the ring (issue 11).

Reference: torch's math SDPA on the FULL sequence in float64 with the equivalent explicit
bool mask, vis[i, j] = (not causal or j <= i) and (left < 0 or j >= i - left) and
(right < 0 or j <= i + right) and doc(i) == doc(j), built here from the definition (not
from ring_attn's rule). The simulated ring (every layout, P up to 8) checks the numerics
of the schedule's skipped, narrowed and short-hop blocks; gloo rings of P = 1..4 check the
real transfers, the hop count and bytes of the contiguous layout (counted by
comm.record_traffic), dropout against the one-device kernel with the same seed, and that
ranks disagreeing on window / softcap / cu_seqlens raise on every rank.
"""
from __future__ import annotations

import math
import random
from typing import Optional

import pytest
import torch

import ring_attn
from dist_utils import assert_all_ok, assert_subgroup_results, on_subgroups, run_ranks
from helpers import assert_close_to_ref, random_bool_mask, sdpa_reference
from ring_attn import ops
from ring_attn.functional import draw_seed
from ring_attn.layout import LAYOUTS, global_positions
from ring_attn.simulated import simulated_ring_attention


def random_cu(total: int, rng: random.Random) -> torch.Tensor:
    """Document boundaries over total tokens with empty and 1-token documents."""
    cu = [0]
    while cu[-1] < total:
        cu.append(min(total, cu[-1] + rng.choice([0, 1, 1, 2, 3, 5, 9, 14])))
    return torch.tensor(cu, dtype=rng.choice([torch.int32, torch.int64]))


def reference_mask(s: int, causal: bool, window: Optional[tuple[int, int]],
                   cu: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    vis = torch.ones(s, s, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff().long())
        vis &= doc.view(-1, 1) == doc.view(1, -1)
    return vis if mask is None else mask & vis


def softcap_reference(q, k, v, vis, cap: float, hq: int, hk: int) -> torch.Tensor:
    """The contract's formula in float64: s = scale q k^T; s = cap tanh(s / cap); + mask."""
    k = k.repeat_interleave(hq // hk, 1)
    v = v.repeat_interleave(hq // hk, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def softcap_in_kernels() -> bool:
    """Whether the CPU kernels apply softcap yet (the field exists before the kernels)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) * 10 for _ in range(3))
    out, _ = ops.attn_fwd(q, k, v, scale=1.0, softcap=1.0)
    plain, _ = ops.attn_fwd(q, k, v, scale=1.0)
    return not torch.allclose(out, plain)


def _inputs(g: torch.Generator, s: int, hq: int, hk: int, dtype: torch.dtype, d: int = 8,
            dv: int = 6):
    q = torch.randn(2, hq, s, d, generator=g)
    k = torch.randn(2, hk, s, d, generator=g)
    v = torch.randn(2, hk, s, dv, generator=g)
    dout = torch.randn(2, hq, s, dv, generator=g)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _windows(s_local: int, s: int) -> list:
    """Shorter than a shard, longer than a shard, longer than the sequence, left-only,
    both sides, zero."""
    return [(0, 0), (1, 0), (s_local - 1, 0), (s_local + 2, 0), (s + 5, 0), (3, -1),
            (2, 3), (s_local + 1, 1)]


def _grads(out, dout, xs):
    return torch.autograd.grad(out, xs, dout)


def _compare(what: str, got, ref, theirs=None, failures=None, **kw) -> None:
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref,
                             theirs or [None] * len(got)):
        try:
            assert_close_to_ref(a, t, r, what=f"{what} {name}", **kw)
        except AssertionError as e:
            if failures is None:
                raise
            failures.append(str(e))


# --- the simulated ring: every layout, P up to 8 -------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS + ("auto",))
def test_simulated_window_documents_match_sdpa(layout: str) -> None:
    rng = random.Random(7)
    g = torch.Generator().manual_seed(3)
    n = 0
    for p in (1, 2, 3, 5, 8):
        s_local = 4
        s = p * s_local
        for w_i, window in enumerate(_windows(s_local, s)):
            causal = w_i % 2 == 0 if window[1] != 0 else True
            hq, hk = (4, 2) if w_i % 3 else (3, 1)
            cu = random_cu(s, rng) if w_i % 2 else None
            mask = random_bool_mask((2, 1, s, s), g, keep=0.8) if w_i % 4 == 1 else None
            q, k, v, dout = _inputs(g, s, hq, hk, torch.float64)
            vis = reference_mask(s, causal, window, cu, mask)
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = sdpa_reference(*xs, attn_mask=vis, enable_gqa=True)
            want = [ref, *_grads(ref, dout, xs)]
            ys = [t.clone().requires_grad_() for t in (q, k, v)]
            out = simulated_ring_attention(*ys, world_size=p, layout=layout, is_causal=causal,
                                           attn_mask=mask, window=window, cu_seqlens=cu)
            got = [out, *_grads(out, dout, ys)]
            _compare(f"{layout} P={p} causal={causal} window={window} cu={cu}", got, want)
            n += 1
    assert n == 40


def test_simulated_window_float32_and_dropout() -> None:
    """float32 within 4x torch's float32 error; dropout equal to the one-device kernel's
    with the same seed (the same elements dropped: positions key the RNG)."""
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    for layout in LAYOUTS:
        for p in (2, 4):
            s = 8 * p
            for window, causal in (((3, 0), True), ((9, 2), False)):
                cu = random_cu(s, rng)
                q, k, v, dout = _inputs(g, s, 4, 2, torch.float32)
                vis = reference_mask(s, causal, window, cu, None)
                x64 = [t.double().requires_grad_() for t in (q, k, v)]
                ref = sdpa_reference(*x64, attn_mask=vis, enable_gqa=True)
                xt = [t.clone().requires_grad_() for t in (q, k, v)]
                theirs = sdpa_reference(*xt, attn_mask=vis, enable_gqa=True,
                                        dtype=torch.float32)
                ys = [t.clone().requires_grad_() for t in (q, k, v)]
                out = simulated_ring_attention(*ys, world_size=p, layout=layout,
                                               is_causal=causal, window=window, cu_seqlens=cu)
                what = f"fp32 {layout} P={p} {window}"
                _compare(what, [out, *_grads(out, dout, ys)], [ref, *_grads(ref, dout, x64)],
                         [theirs, *_grads(theirs, dout, xt)], factor=4.0)
                # Dropout: the one-device kernel on the full sequence, same seed.
                torch.manual_seed(11)
                seed = draw_seed()
                one = ops.attn_fwd(*xt, None, is_causal=causal, scale=1 / math.sqrt(8),
                                   dropout_p=0.3, seed=seed, cu_seqlens_q=cu.to(torch.int64),
                                   cu_seqlens_k=cu.to(torch.int64), window_left=window[0],
                                   window_right=window[1])[0]
                ys = [t.clone().requires_grad_() for t in (q, k, v)]
                ring = simulated_ring_attention(*ys, world_size=p, layout=layout,
                                                is_causal=causal, window=window, cu_seqlens=cu,
                                                dropout_p=0.3, seed=seed)
                _compare(f"dropout {what}", [ring, *_grads(ring, dout, ys)],
                         [one, *_grads(one, dout, xt)], atol_floor=2e-6)


def test_simulated_softcap() -> None:
    if not softcap_in_kernels():
        pytest.skip("the CPU kernels do not apply softcap yet (cpu helper's change)")
    g = torch.Generator().manual_seed(8)
    for layout in LAYOUTS:
        for p in (1, 3):
            s = 4 * p
            for cap in (30.0, 50.0):
                q, k, v, dout = _inputs(g, s, 4, 2, torch.float64)
                q = q * 12  # scores of std ~34: the cap bends them
                vis = reference_mask(s, True, (5, 0), None, None)
                xs = [t.clone().requires_grad_() for t in (q, k, v)]
                ref = softcap_reference(*xs, vis, cap, 4, 2)
                ys = [t.clone().requires_grad_() for t in (q, k, v)]
                out = simulated_ring_attention(*ys, world_size=p, layout=layout,
                                               is_causal=True, window=(5, 0), softcap=cap)
                _compare(f"softcap {cap} {layout} P={p}", [out, *_grads(out, dout, ys)],
                         [ref, *_grads(ref, dout, xs)])


def test_simulated_window_nonfinite_like_math() -> None:
    """A NaN/inf outside every window still reaches the output as in torch's math backend
    on the full sequence (additive masking): the short-hop schedule must then fetch and
    compute the shard that holds it."""
    from test_ring_nonfinite import CASES, _compare as compare_nonfinite, _inputs as bad_inputs
    failures = []
    for layout in ("contiguous", "zigzag"):
        for case in CASES:
            xs, dout = bad_inputs(case, 16)
            vis = reference_mask(16, True, (2, 0), None, None)
            x64 = [x.double().requires_grad_() for x in xs]
            ref = sdpa_reference(*x64, attn_mask=vis)
            want = [ref, *_grads(ref, dout.double(), x64)]
            ys = [x.clone().requires_grad_() for x in xs]
            out = simulated_ring_attention(*ys, world_size=4, layout=layout, is_causal=True,
                                           window=(2, 0))
            failures += compare_nonfinite([out, *_grads(out, dout, ys)], want,
                                          f"{layout} {case}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("bad, err, match", [
    (dict(window=(-2, 0)), RuntimeError, "window left bound must be >= 0"),
    (dict(window=(3, 1.5)), TypeError, "pair of ints"),
    (dict(window=3), TypeError, "pair"),
    (dict(softcap=-1.0), RuntimeError, "softcap must be finite and > 0"),
    (dict(softcap=float("inf")), RuntimeError, "softcap"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), RuntimeError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 5])), RuntimeError, "must end at the token count 8"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), RuntimeError, "int32 or int64"),
])
def test_simulated_bad_arguments(bad, err, match) -> None:
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(err, match=match):
        simulated_ring_attention(q, q, q, world_size=2, **bad)


# --- real rings on gloo ---------------------------------------------------------------------

def _gloo_case(rank: int, p: int, group, layout: str, causal: bool, window, hq: int, hk: int,
               use_mask: bool, use_docs: bool, seed: int, failures: list[str]) -> None:
    s_local = 6
    s = p * s_local
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    q, k, v, dout = _inputs(g, s, hq, hk, torch.float32)
    mask = random_bool_mask((2, 1, s, s), g, keep=0.8) if use_mask else None
    cu = random_cu(s, rng) if use_docs else None
    vis = reference_mask(s, causal, window, cu, mask)
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*x64, attn_mask=vis, enable_gqa=hq != hk)
    xt = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = sdpa_reference(*xt, attn_mask=vis, enable_gqa=hq != hk, dtype=torch.float32)
    concrete = ring_attn.layout.resolve_layout(layout, window, p, s, is_causal=causal)
    pos = global_positions(rank, p, s_local, concrete)

    def local(x):
        return x.index_select(2, pos).contiguous()
    ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
    out = ring_attn.ring_attention(ql, kl, vl, is_causal=causal, group=group, layout=layout,
                                   attn_mask=None if mask is None else local(mask),
                                   window=window, cu_seqlens=cu)
    got = [out, *_grads(out, local(dout), (ql, kl, vl))]
    want = [local(t.detach()) for t in (ref, *_grads(ref, dout, x64))]
    torch_ = [local(t.detach()) for t in (theirs, *_grads(theirs, dout, xt))]
    _compare(f"gloo P={p} r{rank} {layout} causal={causal} w={window} mask={use_mask} "
             f"docs={use_docs}", got, want, torch_, failures, factor=4.0)


def _traffic_case(rank: int, p: int, group, failures: list[str]) -> None:
    """Contiguous, causal, window shorter than a shard: one forward hop carrying the last
    `left` K/V rows; the backward brings them again and sends dK/dV for them home."""
    s_local, left, b, hk, d = 8, 3, 2, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(b, hk, s_local, d, generator=g) for _ in range(4))
    xs = [t.requires_grad_() for t in (q, k, v)]
    with ring_attn.comm.record_traffic() as fwd:
        out = ring_attn.ring_attention(*xs, is_causal=True, group=group, layout="contiguous",
                                       window=(left, 0))
    with ring_attn.comm.record_traffic() as bwd:
        out.backward(dout)
    row = 2 * b * hk * d * 4  # K and V rows, float32
    sends = 1 if rank < p - 1 else 0  # the last rank sends nothing: no wrap-around
    want_fwd = [(rank + 1, ring_attn.comm.KV_TAG, left * row)] * sends
    want_bwd = want_fwd + ([(rank - 1, ring_attn.comm.HOME_TAG, left * row)] if rank else [])
    if fwd.sent != want_fwd or sorted(bwd.sent) != sorted(want_bwd):
        failures.append(f"traffic P={p} rank {rank}: forward {fwd.sent} (want {want_fwd}), "
                        f"backward {bwd.sent} (want {want_bwd})")
    # The full causal ring for comparison: rank r < P-1 sends its own and r earlier
    # shards on, whole (the last rank's are needed by nobody after it: no wrap-around).
    with ring_attn.comm.record_traffic() as full:
        ring_attn.ring_attention(*xs, is_causal=True, group=group, layout="contiguous")
    n_full = rank + 1 if rank < p - 1 else 0
    if full.sent != [(rank + 1, ring_attn.comm.KV_TAG, s_local * row)] * n_full:
        failures.append(f"traffic P={p} rank {rank}: full ring sent {full.sent}")


def _mismatch_case(rank: int, p: int, group, failures: list[str]) -> None:
    """One rank's window / softcap / cu_seqlens differs: every rank raises before any
    transfer, naming the argument and the rank."""
    x = torch.randn(1, 2, 4, 8)
    cu_ok = torch.tensor([0, 3, 4 * p])
    cases = [("window left", dict(window=(2 + (rank == p - 1), 0))),
             ("softcap", dict(softcap=30.0 if rank != p - 1 else 50.0)),
             ("cu_seqlens", dict(cu_seqlens=cu_ok if rank != p - 1 else
                                 torch.tensor([0, 2, 4 * p])))]
    for name, kw in cases:
        try:
            with ring_attn.comm.record_traffic() as t:
                ring_attn.ring_attention(x, x, x, group=group, layout="contiguous", **kw)
            failures.append(f"mismatch {name}: rank {rank} did not raise")
        except RuntimeError as e:
            if f"disagree on {name}" not in str(e) or f"rank {p - 1} has" not in str(e):
                failures.append(f"mismatch {name}: rank {rank}: {e}")
            if t.sent:
                failures.append(f"mismatch {name}: rank {rank} sent {t.sent} before raising")
    # A bad value on one rank: every rank raises, the bad one with its own error.
    try:
        ring_attn.ring_attention(x, x, x, group=group,
                                 window=(-3, 0) if rank == 0 else (2, 0))
        failures.append(f"bad window: rank {rank} did not raise")
    except RuntimeError as e:
        want = "window left bound must be >= 0" if rank == 0 else "rank(s) [0] rejected"
        if want not in str(e):
            failures.append(f"bad window: rank {rank}: {e}")


def _nonfinite_case(rank: int, p: int, group, failures: list[str]) -> None:
    """A NaN key far outside every window (rank 0's first key): math makes every row NaN
    (NaN + -inf), so every rank must receive and compute rank 0's shard."""
    from test_ring_nonfinite import _compare as compare_nonfinite
    s_local = 4
    s = p * s_local
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = _inputs(g, s, 2, 2, torch.float32)
    k[0, 1, 0, 3] = float("nan")
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*x64, attn_mask=reference_mask(s, True, (1, 0), None, None))
    want = [ref, *_grads(ref, dout.double(), x64)]
    pos = global_positions(rank, p, s_local, "contiguous")
    ls = [t.index_select(2, pos).contiguous().requires_grad_() for t in (q, k, v)]
    out = ring_attn.ring_attention(*ls, is_causal=True, group=group, layout="contiguous",
                                   window=(1, 0))
    got = [out, *_grads(out, dout.index_select(2, pos), ls)]
    failures += compare_nonfinite(got, [t.index_select(2, pos) for t in want],
                                  f"nonfinite P={p} rank {rank}")


def _dropout_case(rank: int, p: int, group, failures: list[str]) -> None:
    s_local, window = 6, (4, 0)
    s = p * s_local
    g = torch.Generator().manual_seed(9)
    q, k, v, dout = _inputs(g, s, 4, 2, torch.float32)
    cu = torch.tensor([0, 5, 5, 6, s])
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(77)
    one = ops.attn_fwd(*xs, None, is_causal=True, scale=1 / math.sqrt(8), dropout_p=0.25,
                       seed=draw_seed(), cu_seqlens_q=cu, cu_seqlens_k=cu,
                       window_left=window[0], window_right=0)[0]
    pos = global_positions(rank, p, s_local, "contiguous")

    def local(x):
        return x.index_select(2, pos).contiguous()
    ls = [local(t).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(77)
    out = ring_attn.ring_attention(*ls, is_causal=True, group=group, layout="contiguous",
                                   dropout_p=0.25, window=window, cu_seqlens=cu)
    got = [out, *_grads(out, local(dout), ls)]
    want = [local(t.detach()) for t in (one, *_grads(one, dout, xs))]
    _compare(f"dropout P={p} r{rank}", got, want, None, failures, atol_floor=2e-6)


def _window_in_group(r: int, p: int, group) -> tuple[int, list[str]]:
    failures: list[str] = []
    n = 0
    for layout in LAYOUTS + ("auto",):
        for w_i, window in enumerate(((2, 0), (8, 0), (40, 0), (3, -1), (2, 4))):
            causal = window[1] == 0 or w_i == 3
            hq, hk = ((4, 2), (2, 2), (4, 1))[w_i % 3]
            _gloo_case(r, p, group, layout, causal, window, hq, hk,
                       use_mask=w_i == 1, use_docs=w_i % 2 == 0, seed=n,
                       failures=failures)
            n += 1
    _dropout_case(r, p, group, failures)
    _nonfinite_case(r, p, group, failures)
    _traffic_case(r, p, group, failures)
    if p > 1:
        _mismatch_case(r, p, group, failures)
    return n, failures


def window_checks(rank: int, world_size: int) -> dict[int, tuple[int, list[str]]]:
    return on_subgroups(rank, world_size, _window_in_group)


def test_ring_window_on_gloo(tmp_path) -> None:
    results = assert_all_ok(run_ranks(window_checks, 4, tmp_path, pg_timeout_s=60,
                                      join_timeout_s=300))
    assert_subgroup_results(results, 4, min_cases=20)
