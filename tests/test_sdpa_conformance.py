"""ring_attn.scaled_dot_product_attention against torch's SDPA, forward and backward.

Each case runs three computations from the same inputs: ours and torch's SDPA in the test
dtype, and torch's math SDPA in float64 (the reference). Ours must stay within a small
multiple of torch's own error (helpers.assert_close_to_ref). Gradients of query, key and
value are taken with torch.autograd.grad against one random dout. The sweep covers odd
lengths both ways (causal is top-left aligned when L != S), odd head dims, every mask
broadcast shape, GQA/MQA, scales, input ranks 2-5, broadcast batch dims, strided and
stride-0 views, zero-size dims, fully masked rows and large logits in half precision.
"""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_attn
from helpers import (assert_close_to_ref, random_bool_mask, random_float_mask, randn,
                     sdpa_reference, torch_sdpa)

Tensor = torch.Tensor

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
ALL_DTYPES = [F64, F32, BF16, F16]
# Multiples of torch's own error allowed: outputs, and gradients (which compound the
# rounding of P, dP and dS). float64 is held to the same rule (lse and float masks are
# float64 in the op contract for float64 inputs), with helpers' 1e-12 relative floor.
FWD_FACTOR = 4.0
BWD_FACTOR = 5.0


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False, scale: Optional[float] = None,
                enable_gqa: bool = False, backward: bool = True, seed: int = 0) -> None:
    """Compare ours with torch (same dtype) and the float64 reference, forward and, when
    `backward`, the gradients of query, key and value. Inputs are used with their own
    strides (views stay views)."""
    kw = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def leaves(dtype: Optional[torch.dtype] = None) -> list[Tensor]:
        ts = [t.detach() if dtype is None else t.detach().to(dtype) for t in (query, key, value)]
        return [t.requires_grad_(backward) for t in ts]

    ours_in, torch_in, ref_in = leaves(), leaves(), leaves(torch.float64)
    ours = ring_attn.scaled_dot_product_attention(*ours_in, **kw)
    theirs = torch_sdpa(*torch_in, **kw)
    ref = sdpa_reference(*ref_in, **kw)
    if not bool(torch.isfinite(theirs).all()):
        # torch's fused CPU kernel returns NaN for scale=0 with causal (0 * -inf); its
        # error is then undefined, so measure torch's math backend in the same dtype.
        torch_in = leaves()
        with sdpa_kernel(SDPBackend.MATH):
            theirs = F.scaled_dot_product_attention(*torch_in, **kw)
    assert ours.dtype == query.dtype and ours.device == query.device
    assert_close_to_ref(ours, theirs, ref, factor=FWD_FACTOR, what="output")
    if backward:
        dout = randn(ref.shape, query.dtype, _gen(seed + 1), device=str(query.device))
        g_ours = torch.autograd.grad(ours, ours_in, dout)
        g_theirs = torch.autograd.grad(theirs, torch_in, dout)
        g_ref = torch.autograd.grad(ref, ref_in, dout.to(torch.float64))
        for name, a, b, r in zip(("query", "key", "value"), g_ours, g_theirs, g_ref):
            assert a.dtype == query.dtype, f"grad {name} dtype {a.dtype}"
            assert_close_to_ref(a, b, r, factor=BWD_FACTOR, what=f"grad {name}")


def _qkv(device: str, dtype: torch.dtype, q_shape: tuple[int, ...],
         k_shape: tuple[int, ...], v_shape: Optional[tuple[int, ...]] = None,
         seed: int = 0, mul: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    v_shape = v_shape if v_shape is not None else k_shape
    return (randn(q_shape, dtype, g, device, mul), randn(k_shape, dtype, g, device, mul),
            randn(v_shape, dtype, g, device))


# ---------------------------------------------------------------------------------------
# Lengths, causal alignment, dtypes.
LENGTHS = [(1, 1), (1, 37), (37, 1), (37, 53), (53, 37), (64, 64), (129, 67), (67, 129),
           (300, 257)]


def _check_lengths(device: str, lq: int, lk: int, is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, (2, 3, lq, 24), (2, 3, lk, 24))
    _check_sdpa(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_lengths_cpu(lq: int, lk: int, is_causal: bool, dtype: torch.dtype) -> None:
    _check_lengths("cpu", lq, lk, is_causal, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk", LENGTHS)
def test_lengths_cuda(lq: int, lk: int, is_causal: bool, dtype: torch.dtype) -> None:
    _check_lengths("cuda", lq, lk, is_causal, dtype)


# ---------------------------------------------------------------------------------------
# Head dims, including Dv != D.
HEAD_DIMS = [(1, 1), (3, 3), (17, 17), (65, 65), (129, 129), (256, 256), (17, 5), (8, 40),
             (64, 1)]


def _check_head_dims(device: str, e: int, ev: int, dtype: torch.dtype) -> None:
    for is_causal in (False, True):
        q, k, v = _qkv(device, dtype, (1, 2, 33, e), (1, 2, 47, e), (1, 2, 47, ev), seed=e)
        _check_sdpa(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("e,ev", HEAD_DIMS)
def test_head_dims_cpu(e: int, ev: int, dtype: torch.dtype) -> None:
    _check_head_dims("cpu", e, ev, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("e,ev", HEAD_DIMS)
def test_head_dims_cuda(e: int, ev: int, dtype: torch.dtype) -> None:
    _check_head_dims("cuda", e, ev, dtype)


# ---------------------------------------------------------------------------------------
# Every mask broadcast shape, bool and additive. B=2, H=3, L=19, S=29.
B, H, L, S = 2, 3, 19, 29
MASK_SHAPES: dict[str, Callable[[], tuple[tuple[int, ...], Optional[tuple[int, ...]]]]] = {
    # name -> (stored shape, shape it is expanded to with stride 0, or None)
    "LS": lambda: ((L, S), None),
    "11LS": lambda: ((1, 1, L, S), None),
    "B1LS": lambda: ((B, 1, L, S), None),
    "1HLS": lambda: ((1, H, L, S), None),
    "BHLS": lambda: ((B, H, L, S), None),
    "L1": lambda: ((L, 1), None),
    "1S": lambda: ((1, S), None),
    "expanded_LS_to_BHLS": lambda: ((L, S), (B, H, L, S)),
    "expanded_1S_to_BHLS": lambda: ((1, S), (B, H, L, S)),
}


def _make_mask(name: str, kind: str, dtype: torch.dtype, device: str, g: torch.Generator) -> Tensor:
    shape, expand_to = MASK_SHAPES[name]()
    if kind == "bool":
        m = random_bool_mask(shape, g, device=device)
    else:
        m = random_float_mask(shape, dtype if kind == "float" else F32, g, device=device)
    return m.expand(expand_to) if expand_to is not None else m


def _check_mask(device: str, name: str, kind: str, dtype: torch.dtype) -> None:
    g = _gen(7)
    q, k, v = _qkv(device, dtype, (B, H, L, 40), (B, H, S, 40))
    mask = _make_mask(name, kind, dtype, device, g)
    _check_sdpa(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "float32"])
@pytest.mark.parametrize("name", list(MASK_SHAPES))
def test_mask_shapes_cpu(name: str, kind: str, dtype: torch.dtype) -> None:
    _check_mask("cpu", name, kind, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "float32"])
@pytest.mark.parametrize("name", list(MASK_SHAPES))
def test_mask_shapes_cuda(name: str, kind: str, dtype: torch.dtype) -> None:
    _check_mask("cuda", name, kind, dtype)


def _check_mask_views(device: str, dtype: torch.dtype) -> None:
    """Masks that are non-contiguous views: transposed, sliced, and a 3-D [H, L, S]."""
    g = _gen(3)
    q, k, v = _qkv(device, dtype, (B, H, L, 16), (B, H, S, 16))
    transposed = random_bool_mask((S, L), g, device=device).t()
    sliced = random_float_mask((B, H, L, 2 * S), dtype, g, device=device)[..., ::2]
    three_d = random_bool_mask((H, L, S), g, device=device)
    for m in (transposed, sliced, three_d):
        _check_sdpa(q, k, v, attn_mask=m)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_mask_views_cpu(dtype: torch.dtype) -> None:
    _check_mask_views("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_mask_views_cuda(dtype: torch.dtype) -> None:
    _check_mask_views("cuda", dtype)


# ---------------------------------------------------------------------------------------
# GQA / MQA, alone and with causal or a per-head mask; heads of size 1 broadcast.
GQA = [(6, 2, True), (4, 1, True), (8, 8, True), (4, 1, False), (1, 4, False)]


def _check_gqa(device: str, hq: int, hk: int, enable_gqa: bool, dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, (2, hq, 23, 32), (2, hk, 31, 32), (2, hk, 31, 24))
    _check_sdpa(q, k, v, enable_gqa=enable_gqa)
    _check_sdpa(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    mask = random_bool_mask((1, max(hq, hk), 23, 31), _gen(5), device=device)
    _check_sdpa(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("hq,hk,enable_gqa", GQA)
def test_gqa_cpu(hq: int, hk: int, enable_gqa: bool, dtype: torch.dtype) -> None:
    _check_gqa("cpu", hq, hk, enable_gqa, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("hq,hk,enable_gqa", GQA)
def test_gqa_cuda(hq: int, hk: int, enable_gqa: bool, dtype: torch.dtype) -> None:
    _check_gqa("cuda", hq, hk, enable_gqa, dtype)


# ---------------------------------------------------------------------------------------
# Scales.
SCALES = [None, 0.3, 0.0, -0.7, 2.5]


def _check_scale(device: str, scale: Optional[float], dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, (2, 2, 21, 16), (2, 2, 26, 16))
    _check_sdpa(q, k, v, scale=scale)
    _check_sdpa(q, k, v, scale=scale, is_causal=True)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_scale_cpu(scale: Optional[float], dtype: torch.dtype) -> None:
    _check_scale("cpu", scale, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_scale_cuda(scale: Optional[float], dtype: torch.dtype) -> None:
    _check_scale("cuda", scale, dtype)


# ---------------------------------------------------------------------------------------
# Input ranks 2-5 and broadcast batch dims (torch broadcasts them like matmul does).
RANKS = {
    "2d": ((17, 8), (23, 8), (23, 5)),
    "3d": ((3, 17, 8), (3, 23, 8), (3, 23, 8)),
    "5d": ((2, 2, 3, 17, 8), (2, 2, 3, 23, 8), (2, 2, 3, 23, 8)),
    "key_batch_1": ((3, 2, 17, 8), (1, 2, 23, 8), (1, 2, 23, 8)),
    "query_batch_1": ((1, 2, 17, 8), (3, 2, 23, 8), (3, 2, 23, 8)),
    "5d_broadcast": ((2, 1, 3, 17, 8), (1, 2, 3, 23, 8), (1, 2, 3, 23, 8)),
    "3d_query_4d_kv": ((2, 17, 8), (3, 2, 23, 8), (3, 2, 23, 8)),
    "2d_query_4d_kv": ((17, 8), (2, 3, 23, 8), (2, 3, 23, 8)),
    "one_value_head": ((2, 3, 17, 8), (2, 3, 23, 8), (2, 1, 23, 6)),
    "one_key_head_2d_value": ((2, 3, 17, 8), (1, 1, 23, 8), (23, 8)),
}


def _check_ranks(device: str, name: str, dtype: torch.dtype) -> None:
    qs, ks, vs = RANKS[name]
    q, k, v = _qkv(device, dtype, qs, ks, vs)
    _check_sdpa(q, k, v)
    _check_sdpa(q, k, v, is_causal=True)
    mask = random_bool_mask((17, 23), _gen(2), device=device)
    _check_sdpa(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(RANKS))
def test_ranks_cpu(name: str, dtype: torch.dtype) -> None:
    _check_ranks("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(RANKS))
def test_ranks_cuda(name: str, dtype: torch.dtype) -> None:
    _check_ranks("cuda", name, dtype)


# ---------------------------------------------------------------------------------------
# Views: [B, S, H, D] transposed to [B, H, S, D], sliced last dims, stride-0 expansions.
def _layouts(device: str, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    g = _gen(11)
    bshd = [randn((2, n, 3, 16), dtype, g, device).transpose(1, 2) for n in (19, 27, 27)]
    sliced = [randn((2, 3, n, 32), dtype, g, device)[..., ::2] for n in (19, 27, 27)]
    wide = [randn((2, 3, n, 40), dtype, g, device)[..., 3:19] for n in (19, 27, 27)]
    q = randn((2, 3, 19, 16), dtype, g, device)
    kv_heads = [randn((2, 1, 27, 16), dtype, g, device).expand(2, 3, 27, 16) for _ in range(2)]
    kv_batch = [randn((1, 3, 27, 16), dtype, g, device).expand(2, 3, 27, 16) for _ in range(2)]
    q_rows = randn((2, 3, 1, 16), dtype, g, device).expand(2, 3, 19, 16)
    return {
        "bshd_transposed": tuple(bshd),
        "last_dim_stride_2": tuple(sliced),
        "last_dim_offset": tuple(wide),
        "kv_heads_stride_0": (q, *kv_heads),
        "kv_batch_stride_0": (q, *kv_batch),
        "query_rows_stride_0": (q_rows, *kv_heads),
    }


def _check_layout(device: str, name: str, dtype: torch.dtype) -> None:
    q, k, v = _layouts(device, dtype)[name]
    _check_sdpa(q, k, v)
    _check_sdpa(q, k, v, is_causal=True)


LAYOUTS = ["bshd_transposed", "last_dim_stride_2", "last_dim_offset", "kv_heads_stride_0",
           "kv_batch_stride_0", "query_rows_stride_0"]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_cpu(name: str, dtype: torch.dtype) -> None:
    _check_layout("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_cuda(name: str, dtype: torch.dtype) -> None:
    _check_layout("cuda", name, dtype)


# ---------------------------------------------------------------------------------------
# Zero-size dims: same shapes (and values: zeros or uniform averages) as torch.
ZERO = {
    "B0": ((0, 2, 5, 8), (0, 2, 7, 8), (0, 2, 7, 8)),
    "B0_5d": ((2, 0, 2, 5, 8), (2, 0, 2, 7, 8), (1, 1, 2, 7, 8)),
    "L0": ((2, 2, 0, 8), (2, 2, 7, 8), (2, 2, 7, 8)),
    "S0": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8)),
    "E0": ((2, 2, 5, 0), (2, 2, 7, 0), (2, 2, 7, 6)),
    "Ev0": ((2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 0)),
    "E0_Ev0": ((2, 2, 5, 0), (2, 2, 7, 0), (2, 2, 7, 0)),
}


def _check_zero_size(device: str, name: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, *ZERO[name])
    _check_sdpa(q, k, v)
    _check_sdpa(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(ZERO))
def test_zero_size_cpu(name: str, dtype: torch.dtype) -> None:
    _check_zero_size("cpu", name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", list(ZERO))
def test_zero_size_cuda(name: str, dtype: torch.dtype) -> None:
    _check_zero_size("cuda", name, dtype)


# ---------------------------------------------------------------------------------------
# Fully masked rows: output 0 (as torch's public SDPA), gradients finite and equal to the
# reference's (no NaN leaking from exp(-inf - -inf)).
def _check_fully_masked(device: str, dtype: torch.dtype) -> None:
    g = _gen(13)
    q, k, v = _qkv(device, dtype, (2, 2, 9, 16), (2, 2, 70, 16))
    bool_mask = random_bool_mask((2, 2, 9, 70), g, device=device)
    bool_mask[:, :, 3] = False       # every head, row 3
    bool_mask[1, 0, 5] = False       # one head, row 5
    float_mask = random_float_mask((9, 70), dtype, g, device=device)
    float_mask[0] = -float("inf")    # row 0 of every head
    float_mask[7] = -float("inf")
    all_masked = torch.zeros((9, 70), dtype=torch.bool, device=device)
    for mask in (bool_mask, float_mask, all_masked):
        _check_sdpa(q, k, v, attn_mask=mask)
        out = ring_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        rows = ~(mask if mask.dtype == torch.bool else mask > -float("inf")).any(-1)
        assert bool((out[rows.expand(2, 2, 9)] == 0).all()), "fully masked rows must be 0"


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
def test_fully_masked_rows_cpu(dtype: torch.dtype) -> None:
    _check_fully_masked("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
def test_fully_masked_rows_cuda(dtype: torch.dtype) -> None:
    _check_fully_masked("cuda", dtype)


# ---------------------------------------------------------------------------------------
# Large logits in half precision: q, k scaled by 30 push scores to ~1e3 (a one-hot
# softmax); the output must stay finite and as accurate as torch's.
def _check_large_magnitudes(device: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, (1, 2, 45, 64), (1, 2, 77, 64), mul=30.0)
    for is_causal in (False, True):
        out = ring_attn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        assert bool(torch.isfinite(out).all())
        _check_sdpa(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_large_magnitudes_cpu(dtype: torch.dtype) -> None:
    _check_large_magnitudes("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_large_magnitudes_cuda(dtype: torch.dtype) -> None:
    _check_large_magnitudes("cuda", dtype)


# ---------------------------------------------------------------------------------------
# Longer sequences: several kernel blocks in both directions, ragged tails.
def _check_long(device: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv(device, dtype, (1, 2, 777, 64), (1, 2, 1029, 64))
    _check_sdpa(q, k, v, is_causal=True)
    mask = random_bool_mask((777, 1029), _gen(17), keep=0.9, device=device)
    _check_sdpa(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_long_cpu(dtype: torch.dtype) -> None:
    _check_long("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_long_cuda(dtype: torch.dtype) -> None:
    _check_long("cuda", dtype)


# ---------------------------------------------------------------------------------------
def test_meta_tensors_give_torch_shapes() -> None:
    """Shape propagation without data (device='meta'), as torch's SDPA offers."""
    for qs, ks, vs in RANKS.values():
        q, k, v = (torch.empty(s, device="meta") for s in (qs, ks, vs))
        ours = ring_attn.scaled_dot_product_attention(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v)
        assert ours.shape == theirs.shape and ours.device.type == "meta"
