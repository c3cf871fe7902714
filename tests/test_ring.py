"""ring_attn.ring_attention over real gloo process groups of 1, 2, 3 and 4 ranks.

Every rank builds the same full inputs (same generator seed) and the float64 reference
(torch SDPA on the full sequence); it runs the ring on its shards and compares its shard
of out, dq, dk, dv with the reference's, for every layout x causal x GQA x mask (bool
with a fully masked row, additive, key padding), in float32 (error <= a small multiple
of torch's float32 SDPA error) and bf16 (<= a small multiple of torch's bf16 error), plus
dropout (same seed: equal to single-device ring_attn.scaled_dot_product_attention) and
the differentiable shard / unshard / pad_for_ring path. One spawn of 4 processes runs
every configuration for P = 1..4 on subgroups: process start and torch import cost
seconds, a configuration milliseconds.
"""
from __future__ import annotations

import torch

import ring_attn
from dist_utils import assert_all_ok, assert_subgroup_results, on_subgroups, run_ranks
from helpers import assert_close_to_ref, random_bool_mask, random_float_mask, sdpa_reference
from ring_attn.layout import LAYOUTS, global_positions


def _full_inputs(seed: int, s: int, hq: int, hk: int, dtype: torch.dtype, d: int = 12,
                 dv: int = 10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, s, d, generator=g)
    k = torch.randn(2, hk, s, d, generator=g)
    v = torch.randn(2, hk, s, dv, generator=g)
    dout = torch.randn(2, hq, s, dv, generator=g)
    return [t.to(dtype) for t in (q, k, v, dout)], g


def _mask(kind: str, s: int, hq: int, dtype: torch.dtype, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "bool":
        m = random_bool_mask((2, 1, s, s), g)
        m[1, 0, s - 1, :] = False  # a fully masked row
        return m
    if kind == "float":
        return random_float_mask((1, hq, s, s), dtype, g)
    return torch.arange(s).lt(s - 3).view(1, 1, 1, s)  # key padding, one row for all


def _ref_mask(mask, causal: bool, s: int):
    if not causal:
        return mask
    tri = torch.ones(s, s, dtype=torch.bool).tril()
    if mask is None:
        return tri
    return mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))


def _local(x: torch.Tensor, pos: torch.Tensor, dim: int = 2) -> torch.Tensor:
    return x.index_select(dim, pos).contiguous()


def _grads(out, dout, xs):
    return torch.autograd.grad(out, xs, dout)


def _run_case(rank: int, p: int, group, layout: str, causal: bool, hq: int, hk: int,
              kind: str, dtype: torch.dtype, seed: int, failures: list[str]) -> None:
    s_local = 6 if layout == "zigzag" else 5
    s = p * s_local
    (q, k, v, dout), g = _full_inputs(seed, s, hq, hk, dtype)
    mask = _mask(kind, s, hq, dtype, g)
    pos = global_positions(rank, p, s_local, layout)
    # Reference: float64 on the full sequence; torch in the same dtype for the tolerance.
    ref_mask = _ref_mask(mask, causal, s)
    xs64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*xs64, attn_mask=ref_mask, enable_gqa=hq != hk)
    ref_g = _grads(ref, dout.double(), xs64)
    xst = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = sdpa_reference(*xst, attn_mask=ref_mask, enable_gqa=hq != hk, dtype=dtype)
    theirs_g = _grads(theirs, dout, xst)
    # The ring on this rank's shards; the mask: this rank's query rows, all key columns.
    ql, kl, vl = (_local(t, pos).requires_grad_() for t in (q, k, v))
    local_mask = None if mask is None else (mask if mask.size(2) == 1 else _local(mask, pos))
    out = ring_attn.ring_attention(ql, kl, vl, is_causal=causal, attn_mask=local_mask,
                                   layout=layout, group=group)
    got = [out, *_grads(out, _local(dout, pos), (ql, kl, vl))]
    want = [ref, *ref_g]
    torch_ = [theirs, *theirs_g]
    what = f"P={p} rank {rank} {layout} causal={causal} hq={hq} hk={hk} mask={kind} {dtype}"
    for name, ours, r, t in zip(("out", "dq", "dk", "dv"), got, want, torch_):
        try:
            assert_close_to_ref(ours, _local(t.detach(), pos), _local(r.detach(), pos),
                                factor=4.0, what=f"{what} {name}")
        except AssertionError as e:
            failures.append(str(e))


def _run_dropout_case(rank: int, p: int, group, layout: str, causal: bool,
                      failures: list[str]) -> None:
    s_local = 6 if layout == "zigzag" else 5
    s = p * s_local
    (q, k, v, dout), _ = _full_inputs(99, s, 4, 2, torch.float32)
    pos = global_positions(rank, p, s_local, layout)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(2024)
    one = ring_attn.scaled_dot_product_attention(*xs, is_causal=causal, dropout_p=0.25,
                                                 enable_gqa=True)
    one_g = _grads(one, dout, xs)
    ql, kl, vl = (_local(t, pos).requires_grad_() for t in (q, k, v))
    torch.manual_seed(2024)
    out = ring_attn.ring_attention(ql, kl, vl, is_causal=causal, dropout_p=0.25, layout=layout,
                                   group=group)
    got = [out, *_grads(out, _local(dout, pos), (ql, kl, vl))]
    what = f"dropout P={p} rank {rank} {layout} causal={causal}"
    for name, ours, single in zip(("out", "dq", "dk", "dv"), got, [one, *one_g]):
        # Same elements dropped: only float32 summation order differs.
        try:
            assert_close_to_ref(ours, None, _local(single.detach(), pos), atol_floor=2e-6,
                                what=f"{what} {name}")
        except AssertionError as e:
            failures.append(str(e))


def _run_shard_unshard_case(rank: int, p: int, group, layout: str, causal: bool,
                            failures: list[str]) -> None:
    """Full tensors -> shard -> ring -> unshard -> loss: the full gradients on every rank
    equal the single-device ones; an uneven length goes through pad_for_ring."""
    s = 2 * p * 3 + 1 if p > 1 else 7  # not splittable for p > 1: needs padding
    (q, k, v, dout), _ = _full_inputs(7, s, 2, 2, torch.float64)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    padded = [ring_attn.pad_for_ring(t, dim=2, world_size=p, layout=layout) for t in xs]
    key_mask = padded[0].key_mask.view(1, 1, 1, -1)
    shards = [ring_attn.shard(x.tensor, layout=layout, group=group) for x in padded]
    out = ring_attn.ring_attention(*shards, is_causal=causal, layout=layout, group=group,
                                   attn_mask=None if causal else key_mask)
    full = ring_attn.unshard(out, layout=layout, group=group).narrow(2, 0, s)
    (full * dout).sum().backward()
    xr = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*xr, is_causal=causal)
    ref_g = _grads(ref, dout, xr)
    what = f"shard/unshard/pad P={p} rank {rank} {layout} causal={causal} S={s}"
    for name, ours, r in zip(("out", "dq", "dk", "dv"), [full, *(x.grad for x in xs)],
                             [ref, *ref_g]):
        try:
            # float64 end to end (float64 lse and merge): helpers' float64 floor, 1e-12.
            assert_close_to_ref(ours, None, r, what=f"{what} {name}")
        except AssertionError as e:
            failures.append(str(e))
    pos = ring_attn.positions(shards[0].size(2), layout=layout, group=group)
    if pos.tolist() != global_positions(rank, p, shards[0].size(2), layout).tolist():
        failures.append(f"{what}: positions() disagrees with global_positions()")


def _checks_in_group(rank: int, p: int, group, light: bool) -> tuple[int, list[str]]:
    failures: list[str] = []
    n = 0
    for layout in LAYOUTS:
        for causal in (False, True):
            for hq, hk in ((2, 2), (4, 2)):
                kinds = ("none", "bool", "float", "keypad")
                for kind in kinds[:2] if light else kinds:
                    _run_case(rank, p, group, layout, causal, hq, hk, kind, torch.float32,
                              seed=n, failures=failures)
                    n += 1
            _run_case(rank, p, group, layout, causal, 4, 1, "none", torch.bfloat16, seed=n,
                      failures=failures)
            _run_dropout_case(rank, p, group, layout, causal, failures)
            _run_shard_unshard_case(rank, p, group, layout, causal, failures)
            n += 3
    return n, failures


def ring_checks(rank: int, world_size: int) -> dict[int, tuple[int, list[str]]]:
    """On each subgroup of P = 1 .. world_size ranks, every configuration. The subgroup
    holds the LAST P ranks, so group ranks differ from global ranks (the ring must map
    its peers through the group)."""
    # P = 4 on 2 cores: fewer mask kinds (all of them run at P = 1, 2, 3).
    return on_subgroups(rank, world_size,
                        lambda r, p, group: _checks_in_group(r, p, group, light=p == 4))


def test_ring_matches_single_device(tmp_path) -> None:
    """World sizes 1, 2, 3, 4 in one spawn of 4 gloo processes (subgroups)."""
    results = assert_all_ok(run_ranks(ring_checks, 4, tmp_path, pg_timeout_s=60,
                                      join_timeout_s=300))
    assert_subgroup_results(results, 4, min_cases=30)
