"""The ring_attn ops themselves: torch.library.opcheck (schema, fake kernel, autograd
registration, AOT dispatch with dynamic shapes) over representative inputs (attn_fwd /
attn_bwd, and sdpa, the SDPA entry both the Python and the C++ API call), and the op
contract's semantics (global positions by offsets or maps, GQA head mapping, masks, lse,
the dlse input of attn_bwd) against a float64 reference built from explicit masks."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ring_attn import ops
from helpers import assert_close_to_ref, randn

Tensor = torch.Tensor
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The contract's accumulation dtype (lse, float masks): float64 for float64, else
    float32."""
    return F64 if dtype == F64 else F32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fwd_case(device: str, name: str, dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
    """(q, k, v) and keyword args of attn_fwd for one named representative case."""
    g = _gen(1)
    B, Hq, Hk, Sq, Sk, D, Dv = 2, 4, 2, 13, 17, 16, 8
    q = randn((B, Hq, Sq, D), dtype, g, device)
    k = randn((B, Hk, Sk, D), dtype, g, device)
    v = randn((B, Hk, Sk, Dv), dtype, g, device)
    kw: dict[str, Any] = {"scale": 1.0 / math.sqrt(D)}
    if name == "causal_offsets":
        kw.update(is_causal=True, q_offset=17, k_offset=9)
    elif name == "pos_maps":
        # Zigzag-like, non-contiguous global positions.
        kw.update(is_causal=True,
                  q_pos=torch.tensor([0, 1, 2, 3, 4, 5, 26, 27, 28, 29, 30, 31, 32],
                                     device=device),
                  k_pos=torch.randperm(40, generator=g)[:Sk].to(device))
    elif name == "bool_mask":
        kw.update(attn_mask=torch.rand((B, 1, Sq, Sk), generator=g).gt(0.3).to(device))
    elif name == "float_mask":
        kw.update(attn_mask=randn((1, Hq, Sq, Sk), dtype, g, device))
    elif name == "out_fp32":
        kw.update(out_fp32=True, is_causal=True)
    elif name == "dropout":
        kw.update(dropout_p=0.3, seed=torch.tensor(1234567, dtype=torch.int64, device=device),
                  is_causal=True)
    elif name != "plain":
        raise ValueError(name)
    return (q, k, v), kw


FWD_CASES = ["plain", "causal_offsets", "pos_maps", "bool_mask", "float_mask", "out_fp32",
             "dropout"]


def _check_opcheck_fwd(device: str, name: str, dtype: torch.dtype) -> None:
    (q, k, v), kw = _fwd_case(device, name, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.ring_attn.attn_fwd.default, (q, k, v), kw)


def _check_opcheck_bwd(device: str, name: str, dtype: torch.dtype) -> None:
    (q, k, v), kw = _fwd_case(device, name, dtype)
    out, lse = ops.attn_fwd(q, k, v, **kw)
    g = _gen(2)
    dout = randn(out.shape, dtype, g, device)
    assert lse.dtype == F64  # every dtype (csrc/common/attn_params.h)
    dlse = randn(lse.shape, lse.dtype, g, device)
    bkw = {key: val for key, val in kw.items() if key != "out_fp32"}
    for grad_fp32 in (False, True):
        torch.library.opcheck(torch.ops.ring_attn.attn_bwd.default,
                              (dout, q, k, v, out.to(dtype), lse, dlse),
                              dict(bkw, grad_fp32=grad_fp32))


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", FWD_CASES)
def test_opcheck_attn_fwd_cpu(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_fwd("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", FWD_CASES)
def test_opcheck_attn_fwd_cuda(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_fwd("cuda", name, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", FWD_CASES)
def test_opcheck_attn_bwd_cpu(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_bwd("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", FWD_CASES)
def test_opcheck_attn_bwd_cuda(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_bwd("cuda", name, dtype)


def _sdpa_case(device: str, name: str, dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
    """(query, key, value) and keyword args of the op ring_attn::sdpa: the broadcasting
    it does (batch dims, one head, GQA, masks of lower rank) and the default scale."""
    g = _gen(4)
    shapes = {"gqa_causal": ((2, 4, 13, 16), (2, 2, 13, 16), (2, 2, 13, 8)),
              "batch_5d_mask_2d": ((3, 2, 4, 11, 16), (1, 2, 4, 9, 16), (1, 2, 4, 9, 16)),
              "query_3d_one_kv_head": ((4, 11, 16), (1, 9, 16), (1, 9, 16)),
              "dropout": ((2, 4, 13, 16), (2, 4, 13, 16), (2, 4, 13, 16))}[name]
    q, k, v = (randn(s, dtype, g, device) for s in shapes)
    kw: dict[str, Any] = {}
    if name == "gqa_causal":
        kw.update(is_causal=True, enable_gqa=True)
    elif name == "batch_5d_mask_2d":
        kw.update(attn_mask=torch.rand((11, 9), generator=g).gt(0.3).to(device), scale=0.3)
    elif name == "query_3d_one_kv_head":
        kw.update(attn_mask=randn((4, 1, 9), dtype, g, device))
    else:
        kw.update(dropout_p=0.3, seed=torch.tensor(1234567, dtype=torch.int64), softcap=5.0)
    return (q, k, v), kw


SDPA_CASES = ["gqa_causal", "batch_5d_mask_2d", "query_3d_one_kv_head", "dropout"]


def _check_opcheck_sdpa(device: str, name: str, dtype: torch.dtype) -> None:
    """ring_attn::sdpa is C++ (CompositeImplicitAutograd) written on SymInts: the AOT
    tests with dynamic shapes run it on fake tensors with symbolic sizes."""
    (q, k, v), kw = _sdpa_case(device, name, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.ring_attn.sdpa.default, (q, k, v), kw)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", SDPA_CASES)
def test_opcheck_sdpa_cpu(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_sdpa("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", SDPA_CASES)
def test_opcheck_sdpa_cuda(name: str, dtype: torch.dtype) -> None:
    _check_opcheck_sdpa("cuda", name, dtype)


# ---------------------------------------------------------------------------------------
# Semantics of the contract, float64 reference from an explicit mask.
def _reference_out_lse(q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any]
                       ) -> tuple[Tensor, Tensor]:
    """out, lse in float64 of q, k, v (float64 leaves) under kw's positions and masks."""
    Hq, Hk = q.shape[1], k.shape[1]
    Sq, Sk = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(Hq // Hk, dim=1)
    vv = v.repeat_interleave(Hq // Hk, dim=1)
    s = (q @ kk.transpose(-1, -2)) * kw["scale"]
    mask = kw.get("attn_mask")
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if kw.get("is_causal"):
        qp = kw.get("q_pos", torch.arange(Sq) + kw.get("q_offset", 0))
        kp = kw.get("k_pos", torch.arange(Sk) + kw.get("k_offset", 0))
        s = s.masked_fill(kp[None, :] > qp[:, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return p @ vv, lse


SEMANTIC_CASES = ["plain", "causal_offsets", "pos_maps", "bool_mask", "float_mask"]


def _check_semantics(device: str, name: str, dtype: torch.dtype) -> None:
    """attn_fwd's (out, lse) and attn_bwd's gradients of <dout, out> + <dlse, lse> against
    the float64 reference; the same formulas evaluated by torch in `dtype` set the error
    scale."""
    (q, k, v), kw = _fwd_case(device, name, dtype)
    out, lse = ops.attn_fwd(q, k, v, **kw)
    g = _gen(3)
    dout = randn(out.shape, dtype, g, device)
    dlse = randn(lse.shape, _acc(dtype), g, device)
    dq, dk, dv = ops.attn_bwd(dout, q, k, v, out, lse, dlse, **kw)
    ref_kw = {key: (val.cpu() if isinstance(val, Tensor) else val) for key, val in kw.items()}

    def run(cast: torch.dtype) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        leaves = [t.detach().cpu().to(cast).requires_grad_() for t in (q, k, v)]
        o, l = _reference_out_lse(*leaves, ref_kw)
        fin = torch.isfinite(l)
        loss = (o * dout.cpu().to(cast)).sum() + (l[fin] * dlse.cpu().to(l.dtype)[fin]).sum()
        return o, l, torch.autograd.grad(loss, leaves)

    ref_out, ref_lse, refs = run(F64)
    t_out, t_lse, theirs = run(dtype)
    assert out.dtype == dtype and lse.dtype == F64
    assert_close_to_ref(out.cpu(), t_out, ref_out, what="out")
    # lse is float64 for every dtype: float64 inputs get the 1e-12 floor, the others a
    # float32 floor (their scores are float32).
    assert_close_to_ref(lse.cpu(), t_lse.to(lse.dtype), ref_lse, what="lse",
                        atol_floor=None if dtype == F64 else 1e-6)
    for nm, a, b, r in zip(("dq", "dk", "dv"), (dq, dk, dv), theirs, refs):
        assert_close_to_ref(a.cpu(), b, r, factor=5.0, what=nm)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", SEMANTIC_CASES)
def test_op_semantics_cpu(name: str, dtype: torch.dtype) -> None:
    _check_semantics("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("name", SEMANTIC_CASES)
def test_op_semantics_cuda(name: str, dtype: torch.dtype) -> None:
    _check_semantics("cuda", name, dtype)


def _check_dlse_validated(device: str) -> None:
    """attn_bwd checks dlse like every other argument: shape [B, Hq, Sq] (a wrong one was
    once silently sliced), floating dtype, q's device; RuntimeError (TORCH_CHECK, as torch
    raises) naming it, the expected and the actual value."""
    g = _gen(2)
    q, k, v = (randn((2, 4, 13, 16), F32, g, device) for _ in range(3))
    out, lse = ops.attn_fwd(q, k, v)
    dout = randn(out.shape, F32, g, device)
    for bad, expect in [(torch.zeros(2, 4, 14, device=device), "dlse must have shape"),
                        (torch.zeros(2, 4, 13, 1, device=device), "dlse must have shape"),
                        (torch.zeros(8, 13, device=device), "dlse must have shape"),
                        (torch.zeros(2, 4, 13, dtype=torch.int64, device=device),
                         "dlse must be a floating tensor")]:
        with pytest.raises(RuntimeError, match=expect) as info:
            ops.attn_bwd(dout, q, k, v, out, lse, bad)
        assert "[2, 4, 13]" in str(info.value) or "Long" in str(info.value)
    # The right shape still works and enters delta (dq changes with dlse).
    dq0 = ops.attn_bwd(dout, q, k, v, out, lse, None)[0]
    dq1 = ops.attn_bwd(dout, q, k, v, out, lse, torch.ones_like(lse))[0]
    assert not torch.allclose(dq0, dq1)


def test_dlse_validated_cpu() -> None:
    _check_dlse_validated("cpu")


@pytest.mark.cuda
def test_dlse_validated_cuda() -> None:
    _check_dlse_validated("cuda")
