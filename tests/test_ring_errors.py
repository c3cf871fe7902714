"""Errors of the ring: inputs one rank can tell are wrong, ranks that disagree (every rank
raises, naming the rank that differs, and the group stays usable), and ranks that die or
stall (the survivors raise within the process group's timeout instead of hanging)."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import ring_attn
from dist_utils import assert_all_ok, run_ranks
from ring_attn.comm import GroupInfo
from ring_attn.errors import DOUBLE_BACKWARD, RingAttnError
from ring_attn.validate import agree_on_inputs


def _qkv(s_local: int = 4, dtype: torch.dtype = torch.float32, hq: int = 2, hk: int = 2,
         d: int = 8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, hq, s_local, d, generator=g).to(dtype),
            torch.randn(1, hk, s_local, d, generator=g).to(dtype),
            torch.randn(1, hk, s_local, d, generator=g).to(dtype))


def _agree(q, k, v, mask=None, *, backend: str = "gloo", world_size: int = 1, **kw):
    args = dict(is_causal=False, scale=0.5, dropout_p=0.0, layout="zigzag")
    args.update(kw)
    return agree_on_inputs(q, k, v, mask, info=GroupInfo(None, 0, world_size, backend), **args)


def test_without_process_group_is_a_clear_error() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        ring_attn.ring_attention(*_qkv())


def test_local_input_errors() -> None:
    q, k, v = _qkv()
    with pytest.raises(RingAttnError, match="even"):
        _agree(*_qkv(s_local=5))
    with pytest.raises(RingAttnError, match="multiple of key/value heads"):
        _agree(*_qkv(hq=3, hk=2))
    with pytest.raises(RingAttnError, match="4-D"):
        _agree(q[0], k, v)
    with pytest.raises(RingAttnError, match="same length"):
        _agree(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(RingAttnError, match=r"dim 3 \(keys"):
        _agree(q, k, v, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(RingAttnError, match="dtype must be bool or the query's"):
        _agree(q, k, v, torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(RingAttnError, match="dropout_p"):
        _agree(q, k, v, dropout_p=1.0)
    # Argument types as ring_attn.scaled_dot_product_attention (torch's exception types).
    with pytest.raises(TypeError, match="is_causal must be bool, got int"):
        _agree(q, k, v, is_causal=1)
    with pytest.raises(TypeError, match="dropout_p must be a float.*str"):
        _agree(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError, match="scale must be a float.*str"):
        _agree(q, k, v, scale="1")
    with pytest.raises(TypeError, match="attn_mask must be a Tensor, got list"):
        _agree(q, k, v, [[True] * 4] * 4)
    with pytest.raises(IndexError, match="attn_mask must be at least 2-D"):
        _agree(q, k, v, torch.ones(4, dtype=torch.bool))
    assert _agree(q, k, v, dropout_p=torch.tensor(0.0)).dropout_p == 0.0  # as torch
    # A [1, 1, 1, S] key-padding mask broadcasts over queries: accepted, made 4-D.
    agreed = _agree(q, k, v, torch.ones(4, dtype=torch.bool).view(1, 1, 1, 4))
    assert agreed.mask.shape == (1, 1, 1, 4)


def test_cpu_tensors_on_nccl_group_raise_before_communicating() -> None:
    with pytest.raises(RingAttnError, match="nccl.*CUDA tensors"):
        _agree(*_qkv(), backend="nccl")


# --- ranks that disagree ------------------------------------------------------------------

def _call(rank: int, *, causal=False, s_local=4, dtype=torch.float32, mask=False,
          layout="zigzag", bad_rank_dims=False, world_size=3):
    q, k, v = _qkv(s_local, dtype)
    if bad_rank_dims:
        q = q[0]
    m = torch.ones(1, 1, s_local, s_local * world_size, dtype=torch.bool) if mask else None
    return ring_attn.ring_attention(q, k, v, is_causal=causal, attn_mask=m, layout=layout)


def disagreement_checks(rank: int, world_size: int) -> list[tuple[str, str, str, float]]:
    cases = {
        "causal": dict(causal=rank == 1),
        "shard length": dict(s_local=6 if rank == 2 else 4),
        "dtype": dict(dtype=torch.float64 if rank == 0 else torch.float32),
        "mask": dict(mask=rank == 1),
        "layout": dict(layout="zigzag" if rank == 0 else "striped"),
        "local error": dict(bad_rank_dims=rank == 2),
    }
    seen = []
    for name, kw in cases.items():
        t0 = time.monotonic()
        try:
            _call(rank, world_size=world_size, **kw)
            seen.append((name, "no error", "", time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 - the parent asserts on type and message
            seen.append((name, type(e).__name__, str(e), time.monotonic() - t0))
    out = _call(rank, world_size=world_size)  # the group still works after all that
    seen.append(("valid", "ok", str(tuple(out.shape)), 0.0))
    return seen


def test_disagreeing_ranks_all_raise(tmp_path) -> None:
    results = assert_all_ok(run_ranks(disagreement_checks, 3, tmp_path, pg_timeout_s=30,
                                      join_timeout_s=120))
    expect = {"causal": ("is_causal", "rank 1 has True"),
              "shard length": ("query shard length", "rank 2 has 6"),
              "dtype": ("dtype", "rank 1 has torch.float32"),
              "mask": ("attn_mask presence", "rank 1 has True"),
              "layout": ("layout", "rank 1 has 'striped'")}
    for rank, seen in enumerate(results):
        by_name = {name: (kind, msg, dt) for name, kind, msg, dt in seen}
        for name, words in expect.items():
            kind, msg, dt = by_name[name]
            assert kind == "RingInputError", f"rank {rank} {name}: {kind} {msg}"
            assert all(w in msg for w in words), f"rank {rank} {name}: {msg}"
            assert dt < 10, f"rank {rank} {name}: took {dt:.1f} s"
        kind, msg, _ = by_name["local error"]
        assert kind == "RingInputError", f"rank {rank}: {kind} {msg}"
        assert ("4-D" in msg) if rank == 2 else ("rank(s) [2] rejected" in msg), msg
        assert by_name["valid"][0] == "ok"


# --- ranks that die or stall --------------------------------------------------------------

def dead_rank_checks(rank: int, world_size: int, mode: str,
                     pg_timeout: float) -> tuple[bool, str, float]:
    if rank == world_size - 1:
        if mode == "exit":
            os._exit(0)  # dies before the ring without a word
        if mode == "exit_mid_ring":
            # Passes the agreement collective, then dies at its first transfer.
            from ring_attn.comm import RingComm
            RingComm.exchange = lambda *a, **k: os._exit(0)
            _call(rank, world_size=world_size, causal=True)
        time.sleep(1.5 * pg_timeout)  # stalls past the others' timeout, then leaves
        os._exit(0)
    t0 = time.monotonic()
    try:
        _call(rank, world_size=world_size, causal=True)
        return False, "no error", time.monotonic() - t0
    except Exception as e:  # noqa: BLE001
        return True, f"{type(e).__name__}: {e}", time.monotonic() - t0


dead_rank_checks.keep_group = True  # the group is broken: do not tear it down


@pytest.mark.parametrize("mode", ["exit", "exit_mid_ring", "stall"])
def test_dead_or_stalled_rank_makes_survivors_raise(tmp_path, mode: str) -> None:
    pg_timeout = 8.0
    results = run_ranks(dead_rank_checks, 3, tmp_path, mode, pg_timeout,
                        pg_timeout_s=pg_timeout, join_timeout_s=90)
    survivors = assert_all_ok(results[:2])
    for rank, (raised, msg, dt) in enumerate(survivors):
        assert raised, f"rank {rank} did not raise"
        assert dt < 4 * pg_timeout, f"rank {rank} raised only after {dt:.1f} s: {msg}"


# --- the backward agrees across ranks; double backward is refused everywhere ---------------

def _ring_call(rank: int, p: int, group, seed: int):
    """A causal zigzag ring call on this rank's shards of full inputs drawn from seed;
    returns (out, local inputs, local dout, float64 reference out and grads, local pos)."""
    from helpers import sdpa_reference
    from ring_attn.layout import global_positions
    s_local = 4
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, 2, p * s_local, 8, generator=g) for _ in range(4))
    pos = global_positions(rank, p, s_local, "zigzag")
    local = [t.index_select(2, pos).contiguous().requires_grad_() for t in (q, k, v)]
    out = ring_attn.ring_attention(*local, is_causal=True, group=group)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*xs, is_causal=True)
    ref_g = torch.autograd.grad(ref, xs, dout.double())
    return out, local, dout.index_select(2, pos), [ref, *ref_g], pos


def _outcome(fn) -> tuple[str, str, float]:
    t0 = time.monotonic()
    try:
        fn()
        return "no error", "", time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - the parent asserts on type and message
        return type(e).__name__, str(e), time.monotonic() - t0


def backward_agreement_checks(rank: int, world_size: int) -> dict[int, dict[str, tuple]]:
    from helpers import assert_close_to_ref
    results = {}
    for p in (2, world_size):
        group = dist.new_group(list(range(p)))  # collective over the world
        if rank >= p:
            dist.barrier()
            continue
        seen: dict[str, tuple] = {}
        # Two calls of equal shape, backpropagated in opposite orders on even / odd ranks.
        out1, x1, d1, _, _ = _ring_call(rank, p, group, 1)
        out2, x2, d2, _, _ = _ring_call(rank, p, group, 2)
        order = [(out1, x1, d1), (out2, x2, d2)][:: 1 if rank % 2 == 0 else -1]
        for i, (o, x, d) in enumerate(order):
            seen[f"swapped {i}"] = _outcome(lambda: torch.autograd.grad(o, x, d))
        # The same order everywhere: exact gradients.
        calls = [_ring_call(rank, p, group, 3), _ring_call(rank, p, group, 4)]
        for j, (o, x, d, want, pos) in enumerate(calls):
            got = [o, *torch.autograd.grad(o, x, d)]
            for name, ours, r in zip(("out", "dq", "dk", "dv"), got, want):
                r = r.detach().index_select(2, pos)
                try:
                    assert_close_to_ref(ours, None, r, atol_floor=2e-6, what=f"{name}")
                    seen[f"ordered {j} {name}"] = ("ok", "", 0.0)
                except AssertionError as e:
                    seen[f"ordered {j} {name}"] = ("wrong", str(e), 0.0)
        # Double backward: asked on every rank, then on rank 0 only.
        o, x, d, _, _ = _ring_call(rank, p, group, 5)
        seen["double all"] = _outcome(lambda: torch.autograd.grad(o, x, d, create_graph=True))
        o, x, d, _, _ = _ring_call(rank, p, group, 6)
        seen["double rank 0"] = _outcome(
            lambda: torch.autograd.grad(o, x, d, create_graph=rank == 0))
        # Rank 0 backpropagates while the others start a new forward.
        o, x, d, _, _ = _ring_call(rank, p, group, 7)
        if rank == 0:
            seen["phase"] = _outcome(lambda: torch.autograd.grad(o, x, d))
        else:
            seen["phase"] = _outcome(lambda: _ring_call(rank, p, group, 8))
        # The group still works, and the call numbers are still in step.
        o, x, d, want, pos = _ring_call(rank, p, group, 9)
        seen["after"] = _outcome(lambda: torch.autograd.grad(o, x, d))
        results[p] = seen
        dist.barrier()
    return results


def test_backward_order_and_double_backward_raise_on_every_rank(tmp_path) -> None:
    """P = 2 and 4 (one spawn): a backward order that differs across ranks, a double
    backward (on all ranks or one), and a backward meeting a forward all raise a clear
    RuntimeError on every rank within seconds; the same order gives exact gradients."""
    results = assert_all_ok(run_ranks(backward_agreement_checks, 4, tmp_path,
                                      pg_timeout_s=30, join_timeout_s=180))
    for rank, per_p in enumerate(results):
        assert sorted(per_p) == ([2, 4] if rank < 2 else [4]), sorted(per_p)
        for p, seen in per_p.items():
            where = f"P={p} rank {rank}"
            for i in (0, 1):
                kind, msg, dt = seen[f"swapped {i}"]
                assert kind == "RingInputError", f"{where} swapped {i}: {kind} {msg}"
                assert "in the same order" in msg and f"rank 0 has {i + 1}" in msg, msg
                assert dt < 5, f"{where}: took {dt:.1f} s"
            for key, (kind, msg, _) in seen.items():
                if key.startswith("ordered"):
                    assert kind == "ok", f"{where} {key}: {msg}"
            kind, msg, dt = seen["double all"]
            assert kind == "RingAttnError" and msg == DOUBLE_BACKWARD, f"{where}: {msg}"
            kind, msg, dt = seen["double rank 0"]
            assert kind == "RingAttnError" and msg.startswith(DOUBLE_BACKWARD), msg
            assert rank == 0 or "rank(s) [0] asked for it" in msg, msg
            kind, msg, dt = seen["phase"]
            assert kind == "RingInputError" and "same order" in msg, f"{where}: {msg}"
            assert ("runs a ring backward" if rank == 0 else "runs a ring forward") in msg
            assert dt < 5, f"{where}: took {dt:.1f} s"
            assert seen["after"][0] == "no error", f"{where}: {seen['after']}"
