"""The packed balanced layout through the ring (issue 10): documents split head-tail over
the ranks (ring_attn/packing.py), the ring run on those shards with the global cu_seqlens.

Reference: torch's math SDPA on the FULL packed sequence in float64 with the explicit
block-diagonal (and causal / windowed) bool mask, built from the definition. The simulated
ring covers P up to 8 and document mixes with empty, 1-token and long documents; a gloo
ring of P = 2..4 covers the real transfers, with shard / unshard through the process group.
Padding rows (positions >= T, in no document) must come out 0 with zero gradients.
"""
from __future__ import annotations

import random

import pytest
import torch

import ring_attn
from dist_utils import assert_all_ok, run_ranks
from helpers import assert_close_to_ref, sdpa_reference
from ring_attn.packing import packed_global_positions, packed_plan
from ring_attn.simulated import simulated_ring_attention
from test_ring_window import reference_mask


def _mix(total: int, rng: random.Random, long_doc: bool) -> torch.Tensor:
    """Boundaries over `total` tokens: empty and 1-token documents, and optionally one
    document of half the sequence (longer than S/P for P > 2)."""
    cu = [0]
    if long_doc:
        cu.append(total // 2)
    while cu[-1] < total:
        cu.append(min(total, cu[-1] + rng.choice([0, 1, 1, 2, 5, 9, 17, 30])))
    return torch.tensor(cu, dtype=rng.choice([torch.int32, torch.int64]))


def _inputs(g: torch.Generator, t: int, hq: int, hk: int, dtype=torch.float64):
    q = torch.randn(1, hq, t, 8, generator=g, dtype=dtype)
    k = torch.randn(1, hk, t, 8, generator=g, dtype=dtype)
    v = torch.randn(1, hk, t, 6, generator=g, dtype=dtype)
    dout = torch.randn(1, hq, t, 6, generator=g, dtype=dtype)
    return q, k, v, dout


@pytest.mark.parametrize("p", [1, 2, 3, 5, 8])
def test_simulated_packed_matches_sdpa(p: int) -> None:
    rng = random.Random(p)
    g = torch.Generator().manual_seed(p)
    for i, (causal, window) in enumerate([(True, None), (False, None), (True, (6, 0)),
                                          (False, (3, 2))]):
        t = 97 + 13 * i  # no divisibility rule
        cu = _mix(t, rng, long_doc=i % 2 == 0)
        hq, hk = (4, 2) if i % 2 else (2, 2)
        q, k, v, dout = _inputs(g, t, hq, hk)
        vis = reference_mask(t, causal, window, cu, None)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = sdpa_reference(*xs, attn_mask=vis, enable_gqa=True)
        want = [ref, *torch.autograd.grad(ref, xs, dout)]
        ys = [x.clone().requires_grad_() for x in (q, k, v)]
        out = simulated_ring_attention(*ys, world_size=p, layout="packed", is_causal=causal,
                                       window=window, cu_seqlens=cu)
        got = [out, *torch.autograd.grad(out, ys, dout)]
        for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close_to_ref(a, None, r, what=f"packed P={p} causal={causal} "
                                                 f"window={window} {name}")


def test_simulated_packed_refuses_what_it_cannot_do() -> None:
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(RuntimeError, match="needs cu_seqlens"):
        simulated_ring_attention(q, q, q, world_size=2, layout="packed")
    with pytest.raises(NotImplementedError, match="attn_mask with layout 'packed'"):
        simulated_ring_attention(q, q, q, world_size=2, layout="packed",
                                 cu_seqlens=torch.tensor([0, 4, 10]),
                                 attn_mask=torch.ones(10, 10, dtype=torch.bool))


def packed_checks(rank: int, world_size: int) -> dict[int, list[str]]:
    import torch.distributed as dist
    results = {}
    for p in range(2, world_size + 1):
        members = list(range(p))
        group = dist.new_group(members)
        if rank in members:
            failures: list[str] = []
            rng = random.Random(100 + p)
            g = torch.Generator().manual_seed(p)
            for causal in (True, False):
                t = 61 + 7 * p
                cu = _mix(t, rng, long_doc=causal)
                q, k, v, dout = _inputs(g, t, 4, 2, torch.float32)
                vis = reference_mask(t, causal, None, cu, None)
                x64 = [x.double().requires_grad_() for x in (q, k, v)]
                ref = sdpa_reference(*x64, attn_mask=vis, enable_gqa=True)
                want = [ref, *torch.autograd.grad(ref, x64, dout.double())]
                xt = [x.clone().requires_grad_() for x in (q, k, v)]
                theirs = sdpa_reference(*xt, attn_mask=vis, enable_gqa=True,
                                        dtype=torch.float32)
                theirs = [theirs, *torch.autograd.grad(theirs, xt, dout)]

                def local(x):
                    return ring_attn.shard(x, dim=2, group=group, layout="packed",
                                           cu_seqlens=cu)
                ql, kl, vl = (local(x).detach().requires_grad_() for x in (q, k, v))
                out = ring_attn.ring_attention(ql, kl, vl, is_causal=causal, group=group,
                                               layout="packed", cu_seqlens=cu)
                got = [out, *torch.autograd.grad(out, (ql, kl, vl), local(dout))]
                r = dist.get_rank(group)
                real = packed_plan(tuple(cu.tolist()), p).counts[r]
                for name, a, w, th in zip(("out", "dq", "dk", "dv"), got, want, theirs):
                    try:
                        assert_close_to_ref(a.narrow(2, 0, real), local(th).narrow(2, 0, real),
                                            local(w.detach()).narrow(2, 0, real),
                                            what=f"gloo P={p} r{r} causal={causal} {name}",
                                            factor=4.0)
                        pad = a.narrow(2, real, a.size(2) - real)
                        assert bool((pad == 0).all()), f"P={p} r{r} {name}: padding rows not 0"
                    except AssertionError as e:
                        failures.append(str(e))
                # The global kernel positions of this shard are the plan's.
                pos = packed_global_positions(r, p, cu)
                assert pos.numel() == ql.size(2)
            results[p] = failures
        dist.barrier()
    return results


def test_ring_packed_on_gloo(tmp_path) -> None:
    results = assert_all_ok(run_ranks(packed_checks, 4, tmp_path, pg_timeout_s=60,
                                      join_timeout_s=300))
    for rank, per_p in enumerate(results):
        for p, failures in per_p.items():
            assert not failures, "\n".join(failures)
        assert sorted(per_p) == [p for p in range(2, 5) if rank < p]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_simulated_packed_dropout_equals_varlen(p: int) -> None:
    """The RNG is keyed by global packed positions, so the packed ring drops exactly what
    varlen_attention drops on one device for the same torch seed (forward and grads)."""
    rng = random.Random(50 + p)
    g = torch.Generator().manual_seed(50 + p)
    t = 77
    cu = _mix(t, rng, long_doc=True)
    q, k, v, dout = _inputs(g, t, 4, 2)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.manual_seed(11)
    out = simulated_ring_attention(*xs, world_size=p, layout="packed", is_causal=True,
                                   dropout_p=0.3, cu_seqlens=cu)
    got = [out, *torch.autograd.grad(out, xs, dout)]
    ys = [x[0].transpose(0, 1).clone().requires_grad_() for x in (q, k, v)]  # [T, H, D]
    torch.manual_seed(11)
    one = ring_attn.varlen_attention(*ys, cu, cu, is_causal=True, dropout_p=0.3)
    want = [one, *torch.autograd.grad(one, ys, dout[0].transpose(0, 1))]
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a[0].transpose(0, 1), w, rtol=1e-12, atol=1e-12,
                                   msg=f"P={p} {name}")
