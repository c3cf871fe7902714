"""Soft-capped scores (Gemma 2) at the op level: s = softcap * tanh(scale * q k^T / softcap)
before the mask (csrc/common/attn_params.h). torch's SDPA has no soft-capping, so the
reference is that formula written here with torch ops in float64 (out, lse, and dq/dk/dv by
autograd, whose tanh derivative is independent of the kernels' 1 - tanh^2). torch's own
error is that of the same formula run by torch in the inputs' dtype with the softmax in
float32 (bfloat16: Hugging Face's eager Gemma 2 attention does exactly this). Scores are drawn large (std ~40)
so the cap changes the result, which each case asserts against the uncapped reference.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from ring_attn.functional import attention
from helpers import assert_close_to_ref, dropout_keep_mask, randn
from test_visibility import LSE_FLOOR, combined_mask, run_ours, visibility

Tensor = torch.Tensor


def softcap_attention(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, add_mask: Tensor,
                      scale: float, softcap: Optional[float], dtype: torch.dtype,
                      keep: Optional[Tensor] = None, dropout_p: float = 0.0):
    """The contract's formula on CPU, products and tanh in dtype, the softmax in float32
    (float64 for float64): (out, lse, (dq, dk, dv)). Rows whose every score is -inf give
    out 0 and lse -inf (no gradient). keep: the dropout keep mask (probabilities scaled
    by keep / (1 - dropout_p); lse stays the un-dropped one)."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (q, k, v)]
    qq, kk, vv = leaves
    group = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
    s = scale * qq @ kk.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.to(torch.float64 if dtype == torch.float64 else torch.float32)
    s = s + add_mask.to(s.dtype)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0).detach())
    total = p.sum(-1, keepdim=True)
    p = p / torch.where(total > 0, total, 1)  # an empty row: 0 / 1, and no 0 * inf grads
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = p.to(dtype) @ vv
    grads = torch.autograd.grad(out, leaves, dout.cpu().to(dtype))
    return out.detach(), lse.detach().squeeze(-1), grads


def _check_softcap(device: str) -> None:
    Sq, Sk, D = 150, 700, 16
    scale = 1.0 / math.sqrt(D)
    qp, kp = torch.arange(Sq) + 550, torch.arange(Sk)
    bmask = torch.rand((1, 1, Sq, Sk), generator=torch.Generator().manual_seed(9)) < 0.9
    cases = [  # (softcap, causal, window, cu, mask, Hq, Hk)
        (30.0, False, (-1, -1), None, None, 2, 2),
        (50.0, True, (-1, -1), None, None, 4, 2),
        (30.0, True, (200, -1), None, bmask, 2, 1),
        (50.0, False, (64, 64), ([0, 300, 301, 650], [0, 300, 301, 650]), None, 2, 2),
    ]
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for seed, (cap, causal, window, cu, mask, hq, hk) in enumerate(cases):
            if dtype == torch.bfloat16 and seed % 2:
                continue  # bfloat16: the products' rounding, two cases suffice
            g = torch.Generator().manual_seed(seed)
            # q, k ~ N(0, 6^2): scores scale * q.k with std 36, well past both caps.
            q = randn((1, hq, Sq, D), dtype, g, device, mul=6.0)
            k = randn((1, hk, Sk, D), dtype, g, device, mul=6.0)
            v = randn((1, hk, Sk, D), dtype, g, device)
            dout = randn((1, hq, Sq, D), dtype, g, device)
            add64 = combined_mask(visibility(qp, kp, causal, window, *(cu or (None, None))),
                                  mask, torch.float64)
            out, lse, grads = run_ours(q, k, v, dout, mask=None if mask is None else
                                       mask.to(device), q_offset=550, causal=causal,
                                       scale=scale, window=window, cu=cu, softcap=cap)
            r_out, r_lse, r_grads = softcap_attention(q, k, v, dout, add64, scale, cap,
                                                      torch.float64)
            u_out, _, _ = softcap_attention(q, k, v, dout, add64, scale, None, torch.float64)
            assert all(torch.isfinite(t).all() for t in (r_out, *r_grads))
            assert (u_out - r_out).abs().max() > 0.1, "the cap must matter in this case"
            if dtype == torch.float64:
                t_out, t_grads = None, (None,) * 3  # float64-exact: the floor alone
            else:
                t_out, _, t_grads = softcap_attention(q, k, v, dout, add64.float(), scale,
                                                      cap, dtype)
            tag = f"softcap {cap} {dtype} causal={causal} window={window} docs={cu is not None}"
            assert_close_to_ref(out.cpu(), t_out, r_out, factor=4.0, what=f"{tag} out")
            for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
                assert_close_to_ref(ours.cpu(), theirs, ref, factor=5.0, what=f"{tag} {name}")
            assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse)), tag
            assert_close_to_ref(lse.cpu(), None, r_lse, atol_floor=LSE_FLOOR[dtype],
                                what=f"{tag} lse")


def test_softcap_cpu():
    _check_softcap("cpu")


@pytest.mark.cuda
def test_softcap_cuda():
    _check_softcap("cuda")


def _check_softcap_dropout(device: str) -> None:
    """Dropout drops the capped probabilities: against the formula with the keep mask of
    helpers.dropout_keep_mask (an independent model of the kernels' Philox RNG)."""
    g = torch.Generator().manual_seed(11)
    B, H, S, D, p = 1, 2, 200, 16, 0.25
    q, k, v, dout = (randn((B, H, S, D), torch.float64, g, device, mul=m)
                     for m in (6.0, 6.0, 1.0, 1.0))
    seed = 99
    pos = torch.arange(S)
    add64 = combined_mask(visibility(pos, pos, True, (-1, -1), None, None), None, torch.float64)
    out, lse, grads = run_ours(q, k, v, dout, causal=True, softcap=30.0, dropout_p=p,
                               seed=torch.tensor(seed, dtype=torch.int64))
    keep = dropout_keep_mask(seed, B, H, pos.tolist(), pos.tolist(), p)
    r_out, r_lse, r_grads = softcap_attention(q, k, v, dout, add64, 0.25, 30.0, torch.float64,
                                              keep=keep, dropout_p=p)
    for name, ours, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                               (r_out, r_lse, *r_grads)):
        assert_close_to_ref(ours.cpu(), None, ref, atol_floor=1e-12, what=f"dropout {name}")


def test_softcap_dropout_cpu():
    _check_softcap_dropout("cpu")


@pytest.mark.cuda
def test_softcap_dropout_cuda():
    _check_softcap_dropout("cuda")


def _check_softcap_api(device: str) -> None:
    """ring_attn's attention(softcap=..., window=...) through autograd against the formula
    (3-D inputs, GQA, top-left aligned window with L != S)."""
    g = torch.Generator().manual_seed(13)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for L, S, causal, window, cap in ((150, 150, True, (-1, -1), 30.0),
                                          (80, 200, False, (40, 10), 50.0)):
            q = randn((4, L, 16), dtype, g, device, mul=6.0)
            k = randn((2, S, 16), dtype, g, device, mul=6.0)
            v = randn((2, S, 16), dtype, g, device)
            dout = randn((4, L, 16), dtype, g, device)
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, is_causal=causal, window=window, softcap=cap,
                            enable_gqa=True)
            grads = torch.autograd.grad(out, leaves, dout)
            add = combined_mask(visibility(torch.arange(L), torch.arange(S), causal, window,
                                           None, None), None, torch.float64)[0]
            b4 = [t[None] for t in (q, k, v, dout)]  # the formula takes [B, H, S, D]
            r_out, _, r_grads = softcap_attention(*b4, add, 0.25, cap, torch.float64)
            r_out, r_grads = r_out[0], [t[0] for t in r_grads]
            t_out, t_grads = None, (None,) * 3
            if dtype != torch.float64:
                t_out, _, t_grads = softcap_attention(*b4, add.float(), 0.25, cap, dtype)
                t_out, t_grads = t_out[0], [t[0] for t in t_grads]
            tag = f"attention softcap={cap} {dtype} window={window}"
            assert_close_to_ref(out.detach().cpu(), t_out, r_out, factor=4.0, what=f"{tag} out")
            for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
                assert_close_to_ref(ours.cpu(), theirs, ref, factor=5.0, what=f"{tag} {name}")


def test_softcap_api_cpu():
    _check_softcap_api("cpu")


@pytest.mark.cuda
def test_softcap_api_cuda():
    _check_softcap_api("cuda")
