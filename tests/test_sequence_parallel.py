"""ring_attn.sequence_parallel: the patch of F.scaled_dot_product_attention (identity,
nesting, disabling, exception safety, argument routing, torch's MultiheadAttention) and,
on 2 gloo processes, an unmodified attention module under the context against the same
module on the full sequence."""
from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import assert_all_ok, run_ranks

import ring_attn

spmod = importlib.import_module("ring_attn.sequence_parallel")
TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the ring with a recorder that computes local attention (no process group)."""
    log: list[dict[str, Any]] = []

    def fake_ring(q, k, v, *, is_causal, scale, attn_mask, dropout_p, group, layout,
                  strategy, mesh):
        assert (strategy, mesh) == ("ring", None)
        log.append(dict(shape=tuple(q.shape), is_causal=is_causal, scale=scale,
                        attn_mask=attn_mask, dropout_p=dropout_p, group=group, layout=layout))
        return TORCH_SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1])

    monkeypatch.setattr(spmod, "strategy_attention", fake_ring)
    return log


def _qkv(*lead: int, s: int = 5, e: int = 4, hk: int | None = None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*lead, s, e, generator=g, dtype=torch.float64)
    kv_lead = lead if hk is None else (*lead[:-1], hk)
    k = torch.randn(*kv_lead, s, e, generator=g, dtype=torch.float64)
    v = torch.randn(*kv_lead, s, e, generator=g, dtype=torch.float64)
    return q, k, v


def test_patches_and_restores(calls):
    with ring_attn.sequence_parallel() as ctx:
        assert F.scaled_dot_product_attention is spmod._ring_sdpa
        assert torch.nn.functional.scaled_dot_product_attention is spmod._ring_sdpa
        assert ctx.layout == "zigzag" and ctx.group is None
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert spmod._stack == []


def test_routes_arguments(calls):
    q, k, v = _qkv(2, 3)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    sentinel = object()
    with ring_attn.sequence_parallel(group=sentinel, layout="striped"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)
    ref = TORCH_SDPA(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert [c["is_causal"] for c in calls] == [False, True]
    assert calls[0]["scale"] == 0.3 and calls[0]["attn_mask"] is mask
    assert all(c["group"] is sentinel and c["layout"] == "striped" for c in calls)


@pytest.mark.parametrize("lead", [(3,), (2, 2, 3)], ids=["unbatched", "5d"])
def test_reshapes_to_4d(calls, lead):
    q, k, v = _qkv(*lead)
    with ring_attn.sequence_parallel():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls[0]["shape"] == (int(torch.tensor(lead[:-1]).prod()), lead[-1], 5, 4)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), rtol=0, atol=1e-12)


def test_patches_torch_multihead_attention(calls):
    # torch's own nn.MultiheadAttention looks the function up in torch.nn.functional.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    ref, _ = mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    with ring_attn.sequence_parallel():
        out, _ = mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    assert len(calls) == 1 and calls[0]["shape"] == (2, 2, 6, 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_gqa_needs_enable_gqa(calls):
    q, k, v = _qkv(1, 4, hk=2)
    with ring_attn.sequence_parallel():
        with pytest.raises(ValueError, match="enable_gqa"):
            F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, enable_gqa=True), rtol=0, atol=1e-12)


def test_nesting_inner_wins_outer_restored(calls):
    q, k, v = _qkv(1, 2)
    with ring_attn.sequence_parallel(layout="zigzag"):
        F.scaled_dot_product_attention(q, k, v)
        with ring_attn.sequence_parallel(layout="striped"):
            F.scaled_dot_product_attention(q, k, v)
        assert F.scaled_dot_product_attention is spmod._ring_sdpa
        F.scaled_dot_product_attention(q, k, v)
    assert [c["layout"] for c in calls] == ["zigzag", "striped", "zigzag"]
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_disabled_calls_torch(calls):
    q, k, v = _qkv(1, 2)
    with ring_attn.sequence_parallel():
        patched = F.scaled_dot_product_attention
        with ring_attn.sequence_parallel(enabled=False):
            assert F.scaled_dot_product_attention is TORCH_SDPA
            F.scaled_dot_product_attention(q, k, v)
            patched(q, k, v)  # a reference taken earlier also honours the innermost context
            with ring_attn.sequence_parallel(layout="contiguous"):
                F.scaled_dot_product_attention(q, k, v)
            assert F.scaled_dot_product_attention is TORCH_SDPA
        assert F.scaled_dot_product_attention is spmod._ring_sdpa
    assert [c["layout"] for c in calls] == ["contiguous"]
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_exception_restores(calls):
    with pytest.raises(KeyError):
        with ring_attn.sequence_parallel():
            with ring_attn.sequence_parallel(layout="striped"):
                raise KeyError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert spmod._stack == []


def test_misuse_rejected(calls):
    with pytest.raises(ValueError, match="layout"):
        ring_attn.sequence_parallel(layout="ring")
    ctx = ring_attn.sequence_parallel()
    with ctx:
        with pytest.raises(RuntimeError, match="already active"):
            ctx.__enter__()
    outer, inner = ring_attn.sequence_parallel(), ring_attn.sequence_parallel()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_recompute_outside_context_uses_the_ring(calls, reentrant):
    # Backward after the context exits: the checkpoint's recompute must not meet torch's
    # SDPA on shards (it raised CheckpointError, or gave wrong gradients when reentrant).
    from torch.utils.checkpoint import checkpoint
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3))
    fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    with ring_attn.sequence_parallel(layout="striped"):
        out = checkpoint(fn, q, k, v, use_reentrant=reentrant)
    assert F.scaled_dot_product_attention is spmod._recompute_guard
    F.scaled_dot_product_attention(q, k, v)   # outside backward: torch's function
    assert len(calls) == 1
    out.sum().backward()   # (reentrant checkpoints refuse autograd.grad)
    grads = [t.grad for t in (q, k, v)]
    assert len(calls) == 2 and calls[1]["layout"] == "striped"  # the recompute ran the ring
    assert F.scaled_dot_product_attention is TORCH_SDPA and spmod._pending == []
    ref = torch.autograd.grad(TORCH_SDPA(q, k, v, is_causal=True).sum(), [q, k, v])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- 2 gloo processes

class _Attention(nn.Module):
    """An ordinary attention block that knows nothing of ring_attn."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = nn.Linear(heads * self.d, dim)

    def forward(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hk, self.d).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.h != self.hk)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


# The kernels' lse is float64 for float64 inputs, so the ring's float64 results are
# float64-accurate (only summation order differs from the full-sequence module); a wrong
# layout, position or merge shows up at O(1e-1).
TOL = 1e-10


def _worker_module_matches(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = _Attention(dim=24, heads=4, kv_heads=2).double()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    dout = torch.randn_like(x)
    keep = torch.rand(12, 12) > 0.3
    keep.fill_diagonal_(True)
    for t in (*model.parameters(), x, dout, keep):
        dist.broadcast(t.data, src=0)
    for layout in ("contiguous", "zigzag", "striped"):
        for causal, mask in ((True, None), (False, None), (False, keep)):
            x_ref = x.clone().requires_grad_()
            model.zero_grad()
            out_ref = model(x_ref, causal, mask)
            out_ref.backward(dout)
            grads_ref = [p.grad.clone() for p in model.parameters()]

            model.zero_grad()
            x_loc = ring_attn.shard(x, dim=1, layout=layout).requires_grad_()
            # The ring's mask: this rank's query rows, all key columns.
            mask_loc = None if mask is None else ring_attn.shard(mask, dim=0, layout=layout)
            with ring_attn.sequence_parallel(layout=layout):
                out_loc = model(x_loc, causal, mask_loc)
            assert F.scaled_dot_product_attention is TORCH_SDPA
            out_loc.backward(ring_attn.shard(dout, dim=1, layout=layout))
            what = f"layout={layout} causal={causal} mask={mask is not None}"
            torch.testing.assert_close(ring_attn.unshard(out_loc.detach(), dim=1, layout=layout),
                                       out_ref.detach(), rtol=TOL, atol=TOL, msg=what)
            torch.testing.assert_close(x_loc.grad, ring_attn.shard(x_ref.grad, dim=1,
                                                                   layout=layout),
                                       rtol=TOL, atol=TOL, msg=what)
            for p, g_ref in zip(model.parameters(), grads_ref):
                dist.all_reduce(p.grad)  # each rank saw part of the sequence
                torch.testing.assert_close(p.grad, g_ref, rtol=TOL, atol=TOL, msg=what)


def _worker_checkpoint_and_local_mask(rank: int, world: int) -> None:
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model = _Attention(dim=24, heads=4, kv_heads=2).double()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    for t in (*model.parameters(), x):
        dist.broadcast(t.data, src=0)
    x_ref = x.clone().requires_grad_()
    model(x_ref, True).square().sum().backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    for layout in ("zigzag", "contiguous"):
        for reentrant in (False, True):
            model.zero_grad()
            x_loc = ring_attn.shard(x, dim=1, layout=layout).requires_grad_()
            with ring_attn.sequence_parallel(layout=layout):
                out = checkpoint(model, x_loc, True, use_reentrant=reentrant)
            out.square().sum().backward()   # recompute outside the context
            what = f"layout={layout} reentrant={reentrant}"
            assert F.scaled_dot_product_attention is TORCH_SDPA, what
            torch.testing.assert_close(x_loc.grad, ring_attn.shard(x_ref.grad, dim=1,
                                                                   layout=layout),
                                       rtol=TOL, atol=TOL, msg=what)
            for p, g_ref in zip(model.parameters(), grads_ref):
                dist.all_reduce(p.grad)
                torch.testing.assert_close(p.grad, g_ref, rtol=TOL, atol=TOL, msg=what)
    # A mask over this rank's 6 keys only (built from the shard's length) is refused.
    local = torch.ones(6, 6, dtype=torch.bool).tril()
    with ring_attn.sequence_parallel():
        with pytest.raises(ValueError, match="local positions"):
            model(ring_attn.shard(x, dim=1), False, local)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_checkpoint_and_local_mask_on_the_ring(tmp_path):
    assert_all_ok(run_ranks(_worker_checkpoint_and_local_mask, 2, tmp_path, pg_timeout_s=60))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_unmodified_module_matches_full_sequence(tmp_path):
    assert_all_ok(run_ranks(_worker_module_matches, 2, tmp_path, pg_timeout_s=60))


def _worker_strategies(rank: int, world: int) -> None:
    """An unmodified module under strategy="ulysses" (4 ranks) and "hybrid" (2 x 2)."""
    from ring_attn.parallel.strategy import strategy_positions  # noqa: F401 (exported there)
    torch.manual_seed(0)
    model = _Attention(dim=32, heads=4, kv_heads=2).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    dout = torch.randn_like(x)
    for t in (*model.parameters(), x, dout):
        dist.broadcast(t.data, src=0)
    ranks = torch.arange(world).view(2, 2)  # rows: Ulysses groups; columns: ring groups
    rows = [dist.new_group(r.tolist()) for r in ranks]
    cols = [dist.new_group(c.tolist()) for c in ranks.t()]
    mesh = (rows[rank // 2], cols[rank % 2])
    for strategy, kw, layout in (("ulysses", dict(), "contiguous"),
                                 ("hybrid", dict(mesh=mesh), "zigzag")):
        for causal in (True, False):
            x_ref = x.clone().requires_grad_()
            model.zero_grad()
            out_ref = model(x_ref, causal, None)
            out_ref.backward(dout)
            grads_ref = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            if strategy == "hybrid":
                def shard(t):
                    return ring_attn.hybrid_shard(t, mesh=mesh, dim=1, layout=layout)
            else:
                def shard(t):
                    return ring_attn.shard(t, dim=1, layout=layout)
            x_loc = shard(x).detach().requires_grad_()
            with ring_attn.sequence_parallel(layout=layout, strategy=strategy, **kw):
                out_loc = model(x_loc, causal, None)
            out_loc.backward(shard(dout))
            what = f"strategy={strategy} causal={causal}"
            torch.testing.assert_close(out_loc.detach(), shard(out_ref.detach()), rtol=TOL,
                                       atol=TOL, msg=what)
            torch.testing.assert_close(x_loc.grad, shard(x_ref.grad), rtol=TOL, atol=TOL,
                                       msg=what)
            for p, g_ref in zip(model.parameters(), grads_ref):
                dist.all_reduce(p.grad)
                torch.testing.assert_close(p.grad, g_ref, rtol=TOL, atol=TOL, msg=what)


def test_unmodified_module_under_ulysses_and_hybrid(tmp_path):
    assert_all_ok(run_ranks(_worker_strategies, 4, tmp_path, pg_timeout_s=60))


def test_strategy_arguments_checked():
    with pytest.raises(ValueError, match="sequence_parallel: strategy must be one of"):
        ring_attn.sequence_parallel(strategy="tree")
    with pytest.raises(ValueError, match="layout='contiguous'"):
        ring_attn.sequence_parallel(strategy="ulysses", layout="zigzag")
    with pytest.raises(ValueError, match="needs mesh="):
        ring_attn.sequence_parallel(strategy="hybrid")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        ring_attn.sequence_parallel(layout="packed")
