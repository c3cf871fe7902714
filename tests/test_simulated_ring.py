"""The ring's numerics without a process group: ring_attn.simulated drives the real
schedule, per-step kernel calls and merge for P virtual ranks. Checked against torch's
SDPA on the full sequence in float64 for every layout, causal or not, GQA, bool / additive
masks (with fully masked rows), dropout, P = 1, 2, 3, 4, 8; and bf16 error stays flat
as P grows."""
from __future__ import annotations

import pytest
import torch

import ring_attn
from helpers import (assert_close_to_ref, dropout_keep_mask, random_bool_mask,
                     random_float_mask, randn, sdpa_reference)
from ring_attn.functional import draw_seed
from ring_attn.layout import LAYOUTS
from ring_attn.simulated import simulated_ring_attention

WORLDS = [1, 2, 3, 4, 8]
# The kernels return lse in the accumulation dtype (float64 for float64 inputs), so a
# float64 ring merges with float64 weights and is float64-accurate: errors relative to
# max(1, max|ref|) stay near 1e-15; a wrong layout, position or merge shows up at O(1e-1).
F64_FLOOR = 1e-12


def _inputs(p: int, hq: int, hk: int, dtype: torch.dtype, device: str, seed: int = 0,
            s_local: int = 6, d: int = 12, dv: int = 10):
    g = torch.Generator().manual_seed(seed)
    s = p * s_local
    q = randn((2, hq, s, d), dtype, g, device).requires_grad_()
    k = randn((2, hk, s, d), dtype, g, device).requires_grad_()
    v = randn((2, hk, s, dv), dtype, g, device).requires_grad_()
    dout = randn((2, hq, s, dv), dtype, g, device)
    return q, k, v, dout, g


def _mask(kind: str, s: int, hq: int, dtype: torch.dtype, g: torch.Generator, device: str):
    if kind == "none":
        return None
    if kind == "bool":
        m = random_bool_mask((2, 1, s, s), g, device=device)
        m[1, 0, 1, :] = False  # a fully masked row: out 0, lse -inf, no NaN anywhere
        return m
    return random_float_mask((1, hq, s, s), dtype, g, device)


def _with_causal(mask, s: int, device: str):
    tri = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    if mask is None:
        return tri
    if mask.dtype == torch.bool:
        return mask & tri
    return mask.masked_fill(~tri, float("-inf"))


def _grads(out, dout, inputs):
    return torch.autograd.grad(out, inputs, dout)


def _check_matches_sdpa(device: str, layout: str, p: int) -> None:
    for causal in (False, True):
        for hq, hk in ((2, 2), (4, 2)):
            for kind in ("none", "bool", "float"):
                q, k, v, dout, g = _inputs(p, hq, hk, torch.float64, device)
                s = q.size(2)
                mask = _mask(kind, s, hq, torch.float64, g, device)
                ref_mask = _with_causal(mask, s, device) if causal else mask
                out = simulated_ring_attention(q, k, v, world_size=p, layout=layout,
                                               is_causal=causal, attn_mask=mask)
                ref = sdpa_reference(q, k, v, attn_mask=ref_mask, enable_gqa=hq != hk)
                what = f"{layout} P={p} causal={causal} hq={hq} hk={hk} mask={kind}"
                assert_close_to_ref(out, None, ref, atol_floor=F64_FLOOR, what=what + " out")
                for name, ours, theirs in zip("qkv", _grads(out, dout, (q, k, v)),
                                              _grads(ref, dout, (q, k, v))):
                    assert_close_to_ref(ours, None, theirs, atol_floor=F64_FLOOR,
                                        what=f"{what} d{name}")


@pytest.mark.parametrize("p", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_matches_sdpa_cpu(layout: str, p: int) -> None:
    _check_matches_sdpa("cpu", layout, p)


@pytest.mark.cuda
@pytest.mark.parametrize("p", [1, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_matches_sdpa_cuda(layout: str, p: int) -> None:
    _check_matches_sdpa("cuda", layout, p)


def _check_dropout(device: str, layout: str, p: int) -> None:
    drop = 0.3
    for causal in (False, True):
        q, k, v, dout, _ = _inputs(p, 4, 2, torch.float32, device, seed=p)
        s = q.size(2)
        torch.manual_seed(123)
        out = simulated_ring_attention(q, k, v, world_size=p, layout=layout,
                                       is_causal=causal, dropout_p=drop)
        torch.manual_seed(123)
        one = ring_attn.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                     dropout_p=drop, enable_gqa=True)
        torch.manual_seed(123)
        seed = int(draw_seed())
        keep = dropout_keep_mask(seed, 2, 4, range(s), range(s), drop).to(device)
        ref = sdpa_reference(q, k, v, dropout_p=drop, is_causal=causal, enable_gqa=True,
                             dropout_mask=keep)
        what = f"dropout {layout} P={p} causal={causal}"
        # Same seed: the sharded run drops exactly the elements one device drops.
        assert_close_to_ref(out, one, ref, what=what + " out")
        for name, ours, single, theirs in zip("qkv", _grads(out, dout, (q, k, v)),
                                              _grads(one, dout, (q, k, v)),
                                              _grads(ref, dout, (q, k, v))):
            assert_close_to_ref(ours, single, theirs, what=f"{what} d{name}")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_dropout_equals_single_device_cpu(layout: str, p: int) -> None:
    _check_dropout("cpu", layout, p)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_dropout_equals_single_device_cuda(layout: str) -> None:
    _check_dropout("cuda", layout, 4)


def bf16_errors(p: int, layout: str = "zigzag", causal: bool = True, device: str = "cpu",
                s: int = 256, seed: int = 0) -> dict[str, float]:
    """Max abs error of the bf16 ring (out, dq, dk, dv) on a sequence of s tokens against
    the float64 attention of the same (bf16-rounded) inputs; p = 0 measures torch's own
    one-device bf16 SDPA instead."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (randn((1, 4, s, 32), torch.bfloat16, g, device) for _ in range(4))
    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    if p == 0:
        out = torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, is_causal=causal)
    else:
        out = simulated_ring_attention(q16, k16, v16, world_size=p, layout=layout,
                                       is_causal=causal)
    grads = _grads(out, dout, (q16, k16, v16))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = sdpa_reference(qr, kr, vr, is_causal=causal)
    ref_grads = _grads(ref, dout.double(), (qr, kr, vr))
    errs = {"out": (out.double() - ref).abs().max().item()}
    for name, a, b in zip("qkv", grads, ref_grads):
        errs["d" + name] = (a.double() - b).abs().max().item()
    return errs


def test_bf16_error_flat_in_world_size() -> None:
    """Partials merge in float32 and round once, so bf16 error does not grow with P."""
    torch_errs = bf16_errors(0)
    for p in (1, 2, 4, 8):
        errs = bf16_errors(p)
        for name, e in errs.items():
            assert e <= 2.0 * torch_errs[name] + 1e-4, (
                f"P={p} {name}: {e:.3e} vs torch one-device bf16 {torch_errs[name]:.3e}")
