"""The CUDA kernels of ring_attn at the op level (attn_fwd / attn_bwd), against a float64
reference of the op contract (csrc/common/attn_params.h).

Every case runs the op on CUDA, the same reference in float64 (the truth) and in the
test dtype (torch's own error in that dtype, math path), and requires ours to stay within
a small multiple of torch's error (helpers.assert_close_to_ref). Gradients come from
attn_bwd with the forward's out/lse against autograd through the reference, with random
dout and, where named, dlse. Cases aim at each kernel family and its edges: every
instantiated head dim and odd ones padded up (D in 32..256, Dv != D), lengths around the
64/128-row tiles, causal on global positions (offsets and non-contiguous maps that make
whole tiles skippable), GQA/MQA, bool and additive masks with broadcast strides, fully
masked rows, out_fp32 / grad_fp32, dlse, dropout (the exact elements of dropout_rng.h,
and parity with the CPU kernels for the same seed), float64, and unaligned views.

All tests carry the `cuda` mark: conftest skips them without a GPU or without the CUDA
kernels; nothing here touches CUDA at import time.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

import ring_attn  # noqa: F401  (loads the library that registers torch.ops.ring_attn)
from helpers import (ATOL_FLOOR, assert_close_to_ref, dropout_keep_mask, random_bool_mask,
                     random_float_mask, randn)

Tensor = torch.Tensor
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
FWD_FACTOR = 4.0   # multiples of torch's own error, as in test_sdpa_conformance.py
BWD_FACTOR = 5.0
# float64 floor for lse and gradients (times max(1, max|ref|)): the float64 "torch" run
# is the reference itself (error 0), and lse is float64 for float64 inputs, so only the
# GPU's own float64 rounding (fma, summation order over up to ~1300 keys) remains; 1e-10
# leaves room for it while a float32 rounding anywhere (~1e-7) would fail.
F64_FLOOR = 1e-10
# Gradient floors (times max(1, max|ref|)) where torch's own error can be exactly 0 while
# ours is not: float64 as above; float32 dS = P (dP - delta) cancels to exactly 0 in
# torch's autograd for a single key but keeps ~10 ulp of rounding when delta comes from
# rowsum(dout * out) as in FlashAttention.
GRAD_FLOOR = {F64: F64_FLOOR, F32: 1e-5}

pytestmark = pytest.mark.cuda


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positions(n: int, pos: Optional[Tensor], offset: int) -> Tensor:
    return pos.cpu().long() if pos is not None else torch.arange(n) + offset


def reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None,
              q_offset: int = 0, k_offset: int = 0, is_causal: bool = False,
              scale: float = 1.0, keep: Optional[Tensor] = None, dropout_p: float = 0.0,
              dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """The op contract in plain torch, computed in `dtype`, differentiable: GQA by head
    mapping, causal kpos <= qpos on global positions, bool / additive mask, rows with no
    key -> out 0 and lse -inf, `keep` (bool [B, Hq, Sq, Sk]) drops and rescales P."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if is_causal:
        qp = _positions(q.shape[2], q_pos, q_offset).to(s.device)
        kp = _positions(k.shape[2], k_pos, k_offset).to(s.device)
        allowed = allowed & (kp[None, :] <= qp[:, None])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(dtype)
    s = s.masked_fill(~allowed, -math.inf)
    row_ok = torch.isfinite(s).any(-1, keepdim=True)
    s_safe = torch.where(row_ok, s, torch.zeros((), dtype=dtype, device=s.device))
    lse = torch.logsumexp(s_safe, -1, keepdim=True)
    p = torch.exp(s_safe - lse) * row_ok
    if keep is not None:
        p = p * keep.to(p.device) / (1.0 - dropout_p)
    out = p @ v
    lse = torch.where(row_ok, lse, torch.full((), -math.inf, dtype=dtype, device=s.device))
    return out, lse.squeeze(-1).float() if dtype != F64 else lse.squeeze(-1)


def _check(q: Tensor, k: Tensor, v: Tensor, *, backward: bool = True, dlse: bool = False,
           out_fp32: bool = False, grad_fp32: bool = False, dropout_p: float = 0.0,
           seed: int = 0, factor: float = 1.0, **kw) -> tuple[Tensor, Tensor]:
    """Run attn_fwd (and attn_bwd) on CUDA and compare with the reference. `kw` are the
    op's mask/position/causal/scale arguments. Returns (out, lse)."""
    ops = torch.ops.ring_attn
    kw.setdefault("scale", 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0)
    args = dict(attn_mask=None, q_pos=None, k_pos=None, q_offset=0, k_offset=0,
                is_causal=False)
    args.update(kw)
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None
    keep = None
    if dropout_p > 0:
        qp = _positions(q.shape[2], args["q_pos"], args["q_offset"])
        kp = _positions(k.shape[2], args["k_pos"], args["k_offset"])
        keep = dropout_keep_mask(seed, q.shape[0], q.shape[1], qp.tolist(), kp.tolist(),
                                 dropout_p).to(q.device)
    out, lse = ops.attn_fwd(q, k, v, args["attn_mask"], args["q_pos"], args["k_pos"],
                            args["q_offset"], args["k_offset"], args["is_causal"],
                            args["scale"], dropout_p, seed_t, out_fp32)
    # lse is float64 for every dtype (csrc/common/attn_params.h).
    assert out.dtype == (F32 if out_fp32 else q.dtype)
    assert lse.dtype == F64
    assert out.device == q.device and lse.device == q.device

    def leaves(dtype: Optional[torch.dtype]) -> list[Tensor]:
        return [t.detach().to(dtype or t.dtype).requires_grad_(backward) for t in (q, k, v)]

    ref_in, low_in = leaves(F64), leaves(None)
    ref_kw = {key: args[key] for key in ("attn_mask", "q_pos", "k_pos", "q_offset",
                                         "k_offset", "is_causal", "scale")}
    # DropoutParams.p is a double: the float64 SIMT kernel rescales by the exact 1/(1-p);
    # the float32 / tensor-core kernels compute it in float from float32(p).
    p_k = dropout_p if q.dtype == F64 else float(torch.tensor(dropout_p, dtype=F32))
    ref_out, ref_lse = reference(*ref_in, keep=keep, dropout_p=p_k, **ref_kw)
    low_out, low_lse = reference(*low_in, keep=keep, dropout_p=p_k, dtype=q.dtype, **ref_kw)
    f = FWD_FACTOR * max(factor, 1.0)
    f64 = q.dtype == F64
    assert_close_to_ref(out, low_out, ref_out, factor=f, what="out")
    # lse is float64 for every dtype; its floor follows the inputs' (float32 scores).
    assert_close_to_ref(lse, low_lse, ref_lse, factor=f, what="lse",
                        atol_floor=F64_FLOOR if f64 else ATOL_FLOOR[F32])
    # -inf lse exactly where the reference row has no key, out 0 there.
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse).cpu()), "lse -inf rows"
    assert bool((out[torch.isneginf(lse)] == 0).all()), "rows with no key must give 0"
    if not backward:
        return out, lse
    g = _gen(seed + 101)
    dout = randn(ref_out.shape, q.dtype, g, str(q.device))
    dl = randn(ref_lse.shape, lse.dtype, g, str(q.device)) if dlse else None
    dq, dk, dv = ops.attn_bwd(dout, q, k, v, out, lse, dl, args["attn_mask"], args["q_pos"],
                              args["k_pos"], args["q_offset"], args["k_offset"],
                              args["is_causal"], args["scale"], dropout_p, seed_t, grad_fp32)
    gd = F32 if grad_fp32 else q.dtype
    assert dq.dtype == dk.dtype == dv.dtype == gd

    def grads(outs: tuple[Tensor, Tensor], ins: list[Tensor]) -> tuple[Tensor, ...]:
        o, l = outs
        go = dout.to(o.dtype)
        if dl is None:
            return torch.autograd.grad(o, ins, go)
        # lse of rows with no key is a constant -inf: its gradient is ignored.
        l_fin = torch.where(torch.isneginf(l), torch.zeros_like(l), l)
        return torch.autograd.grad((o, l_fin), ins, (go, dl.to(l.dtype)))

    g_ref = grads((ref_out, ref_lse), ref_in)
    g_low = grads((low_out, low_lse), low_in)
    for name, ours, low, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), g_low, g_ref):
        assert bool(torch.isfinite(ours).all()), f"{name} has non-finite values"
        assert_close_to_ref(ours, low, ref, factor=BWD_FACTOR * max(factor, 1.0), what=name,
                            atol_floor=GRAD_FLOOR.get(q.dtype))
    return out, lse


def _qkv(dtype: torch.dtype, b: int, hq: int, hk: int, sq: int, sk: int, d: int,
         dv: Optional[int] = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    dv = d if dv is None else dv
    return (randn((b, hq, sq, d), dtype, g, "cuda"), randn((b, hk, sk, d), dtype, g, "cuda"),
            randn((b, hk, sk, dv), dtype, g, "cuda"))


# ---------------------------------------------------------------------------------------
# Head dims: every instantiation (64, 96, 128, 192, 256), odd dims padded up, Dv != D.
# D % 8 != 0 takes load_tile's narrow copies (utils.cuh): 36 (row stride 72 B: rows on 16-
# and 8-byte boundaries), 34 and 50 (4-byte rows between them), 3 and 33 (odd: rows at odd
# elements, the element loads).
HEAD_DIMS = [(32, 32), (64, 64), (72, 72), (80, 80), (96, 96), (128, 128), (160, 160),
             (192, 192), (192, 128), (256, 256), (8, 40), (64, 128), (128, 64), (200, 33),
             (3, 3), (36, 36), (34, 50)]


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("d,dv", HEAD_DIMS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dims(d: int, dv: int, is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, 2, 2, 133, 70, d, dv, seed=d + dv)
    _check(q, k, v, is_causal=is_causal)


# ---------------------------------------------------------------------------------------
# The 99 KB tiles (tile_config.h variant 1: fwd hd128 128 x 32, hd192/256 128 x 16; bwd
# hd192 64 x 32, hd256 32 x 32 with 4 warps) that sm_86/89/120 GPUs launch, forced on any
# GPU by RING_ATTN_SMEM_LIMIT; lengths cross their tile edges, with a mask and causal.
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("d", [128, 192, 256])
def test_small_smem_tiles(d: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_ATTN_SMEM_LIMIT", "101376")
    assert torch.ops.ring_attn._cuda_tile_config(d, dtype, False, 101376)[4] == 1
    q, k, v = _qkv(dtype, 2, 4, 2, 150, 211, d, seed=d)
    _check(q, k, v)
    _check(q, k, v, is_causal=True, q_offset=40, dlse=True)
    mask = random_float_mask((2, 1, 150, 211), F32, _gen(3), device="cuda")
    _check(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------
# Lengths around the tiles (fwd 128 x {64, 32}, bwd 64 x 64), offsets (bottom-right causal).
LENGTHS = [(1, 1), (1, 300), (300, 1), (17, 300), (128, 64), (129, 65), (64, 128),
           (257, 513), (513, 257)]


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_lengths(sq: int, sk: int, dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 1, 2, 1, sq, sk, 64, seed=sq * 7 + sk)
    _check(q, k, v)
    _check(q, k, v, is_causal=True)
    _check(q, k, v, is_causal=True, q_offset=sk - sq, k_offset=0)  # bottom-right aligned
    _check(q, k, v, is_causal=True, q_offset=1000, k_offset=1000 + sk // 2)


# ---------------------------------------------------------------------------------------
# Global position maps: zigzag and striped shards (non-contiguous), a permutation, and a
# map whose key tiles are entirely after some query blocks (tile skipping).
def _maps(sq: int, sk: int) -> dict[str, tuple[Tensor, Tensor]]:
    g = _gen(5)
    half_q, half_k = sq // 2, sk // 2
    zig_q = torch.cat([torch.arange(half_q), 4 * sq - half_q + torch.arange(sq - half_q)])
    zig_k = torch.cat([torch.arange(half_k), 4 * sq - half_k + torch.arange(sk - half_k)])
    return {
        "zigzag": (zig_q, zig_k),
        "striped": (torch.arange(sq) * 4 + 1, torch.arange(sk) * 3),
        "permuted": (torch.randperm(sq, generator=g) * 2, torch.randperm(sk, generator=g) * 2),
        "late_keys": (torch.arange(sq), torch.cat([torch.arange(64), 10_000 + torch.arange(sk - 64)])),
    }


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("name", ["zigzag", "striped", "permuted", "late_keys"])
def test_position_maps(name: str, dtype: torch.dtype) -> None:
    sq, sk = 200, 260
    qp, kp = _maps(sq, sk)[name]
    q, k, v = _qkv(dtype, 2, 4, 2, sq, sk, 64, seed=3)
    # Maps may live on the CPU or the GPU; the op moves them.
    _check(q, k, v, is_causal=True, q_pos=qp.cuda(), k_pos=kp)
    _check(q, k, v, is_causal=True, q_pos=qp, k_pos=kp.cuda(), attn_mask=random_bool_mask(
        (1, 1, sq, sk), _gen(1), keep=0.8, device="cuda"))


# ---------------------------------------------------------------------------------------
# The backward's query-block stages (tile_config.h), each variant forced by
# RING_ATTN_SMEM_LIMIT at the GPU class that takes it: 227 KB two stages (the next query
# block's Q, dO, lse and delta copied during this block's compute) at every head dim;
# 163 KB one stage at hd192/256; 99 KB one stage at hd128, the small tiles at hd192/256,
# two stages at hd64/96 (hd96's 100,352 B is the tightest fit). On a GPU with less smem
# than the forced limit the launcher takes the GPU's own (the case still runs). GQA, so
# the prefetch crosses into the next head; causal with Sq > Sk so the last key blocks
# skip the leading query blocks and the prefetch wraps to the next head's first active
# block; a ragged last query block (200 = 3 x 64 + 8); dlse; a zigzag map; and a map whose
# second 64 queries (positions 0..63) precede every key (500..649), so a skipped block
# sits between active ones and the prefetch jumps over it.
BWD_SMEM_LIMITS = {"227KB": 232_448, "163KB": 166_912, "99KB": 101_376}


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("limit", list(BWD_SMEM_LIMITS))
def test_bwd_stages(limit: str, d: int, dtype: torch.dtype,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RING_ATTN_SMEM_LIMIT", str(BWD_SMEM_LIMITS[limit]))
    q, k, v = _qkv(dtype, 1, 4, 2, 200, 150, d, seed=d + 1)
    _check(q, k, v, is_causal=True, dlse=True)
    qp, kp = _maps(200, 150)["zigzag"]
    _check(q, k, v, is_causal=True, q_pos=qp.cuda(), k_pos=kp.cuda())
    qp = torch.cat([1000 + torch.arange(64), torch.arange(64), 2000 + torch.arange(72)])
    _check(q, k, v, is_causal=True, q_pos=qp.cuda(), k_pos=500 + torch.arange(150).cuda())


# ---------------------------------------------------------------------------------------
# GQA / MQA with causal and per-head masks.
@pytest.mark.parametrize("dtype", [BF16, F32, F64], ids=str)
@pytest.mark.parametrize("hq,hk", [(8, 2), (4, 1), (3, 3)])
def test_gqa(hq: int, hk: int, dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, hq, hk, 77, 140, 64, dv=32, seed=hq)
    _check(q, k, v)
    _check(q, k, v, is_causal=True, q_offset=140 - 77)
    mask = random_bool_mask((1, hq, 77, 140), _gen(2), device="cuda")
    _check(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------
# Masks: bool and additive float32, broadcast shapes (stride 0), combined with causal.
MASK_SHAPES = [(1, 1, 90, 150), (2, 1, 90, 150), (1, 3, 1, 150), (2, 3, 90, 150), (1, 1, 90, 1)]


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_masks(shape: tuple[int, ...], kind: str, dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, 3, 3, 90, 150, 64, seed=11)
    g = _gen(4)
    mask = (random_bool_mask(shape, g, device="cuda") if kind == "bool"
            else random_float_mask(shape, F32, g, device="cuda"))
    _check(q, k, v, attn_mask=mask)
    _check(q, k, v, attn_mask=mask, is_causal=True, q_offset=60)


# ---------------------------------------------------------------------------------------
# Rows with no key: out 0, lse -inf, finite grads (with dlse too).
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=str)
def test_fully_masked_rows(dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, 2, 1, 150, 90, 64, seed=13)
    mask = random_bool_mask((2, 2, 150, 90), _gen(6), device="cuda")
    mask[:, :, 3] = False
    mask[1, 0, 100:140] = False     # spans a 64-row backward tile boundary
    out, lse = _check(q, k, v, attn_mask=mask, dlse=True)
    assert bool(torch.isneginf(lse[:, :, 3]).all()) and bool((out[:, :, 3] == 0).all())
    fmask = torch.zeros((1, 1, 150, 90), device="cuda")
    fmask[..., 7, :] = -math.inf
    _check(q, k, v, attn_mask=fmask, dlse=True)
    # Causal with every key after the first 40 queries: rows 0..39 see nothing.
    _check(q, k, v, is_causal=True, q_offset=0, k_offset=40, dlse=True)
    # No key at all (Sk = 0) and no query (Sq = 0).
    _check(*_qkv(dtype, 1, 2, 2, 5, 0, 64), backward=True)
    _check(*_qkv(dtype, 1, 2, 2, 0, 5, 64), backward=True)


# ---------------------------------------------------------------------------------------
# out_fp32 / grad_fp32 and dlse.
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_fp32_outputs_and_dlse(is_causal: bool, dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, 4, 2, 150, 211, 128, seed=17)
    _check(q, k, v, is_causal=is_causal, out_fp32=True, grad_fp32=True, dlse=True)
    _check(q, k, v, is_causal=is_causal, dlse=True)
    # The float32 output is not rounded to the input dtype: it is closer to the reference.
    ops = torch.ops.ring_attn
    o32, _ = ops.attn_fwd(q, k, v, None, None, None, 0, 0, is_causal, 0.1, 0.0, None, True)
    o16, _ = ops.attn_fwd(q, k, v, None, None, None, 0, 0, is_causal, 0.1, 0.0, None, False)
    ref, _ = reference(q, k, v, is_causal=is_causal, scale=0.1)
    assert (o32.double() - ref).abs().max() < (o16.double() - ref).abs().max()


# ---------------------------------------------------------------------------------------
# Dropout: the elements dropped are dropout_rng.h's (independent numpy model in helpers),
# forward and backward, with causal, GQA and a position map; and CUDA == CPU for a seed.
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=str)
def test_dropout_exact_elements(dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 2, 4, 2, 131, 97, 64, seed=19)
    _check(q, k, v, dropout_p=0.3, seed=1234, factor=2.0)
    _check(q, k, v, dropout_p=0.5, seed=2**40 + 7, is_causal=True, q_offset=97 - 131 + 40,
           factor=2.0)
    kp = torch.arange(97) * 3 + 2  # positions not multiples of 4: pairs straddle groups
    _check(q, k, v, dropout_p=0.2, seed=99, k_pos=kp, q_pos=torch.arange(131) * 2,
           is_causal=True, factor=2.0)
    # Contiguous keys at k_offset % 4 == 0 share one Philox call per lane pair
    # (dropout_keep_pair); other offsets draw per lane (dropout_keep2). Both exact.
    for k_offset in (8, 3):
        _check(q, k, v, dropout_p=0.3, seed=5, k_offset=k_offset, q_offset=200,
               is_causal=True, factor=2.0)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_dropout_matches_cpu(dtype: torch.dtype) -> None:
    """Same seed, same elements on both backends: CUDA vs CPU op outputs and grads. The
    CPU run is in float64 so the only difference is the CUDA dtype's rounding."""
    ops = torch.ops.ring_attn
    q, k, v = _qkv(dtype, 1, 2, 1, 70, 90, 40, seed=23)
    seed = torch.tensor(777, dtype=torch.int64)
    args = (None, None, None, 5, 0, True, 0.15, 0.4, seed)
    out, lse = ops.attn_fwd(q, k, v, *args, False)
    qc, kc, vc = (t.cpu().double() for t in (q, k, v))
    out_c, lse_c = ops.attn_fwd(qc, kc, vc, *args, False)
    tol = {F32: 1e-5, F64: 1e-10, BF16: 2e-2}[dtype]
    torch.testing.assert_close(out.cpu().double(), out_c, atol=tol, rtol=tol)
    # lse: float64 on both sides; formed from float32 scores for float32 / bf16 inputs.
    lse_atol, lse_rtol = (tol, tol) if dtype == F64 else (1e-4, 1e-5)
    torch.testing.assert_close(lse.cpu().double(), lse_c, atol=lse_atol, rtol=lse_rtol)
    dout = randn(out.shape, dtype, _gen(3), "cuda")
    grads = ops.attn_bwd(dout, q, k, v, out, lse, None, *args, False)
    grads_c = ops.attn_bwd(dout.cpu().double(), qc, kc, vc, out_c, lse_c, None, *args, False)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a.cpu().double(), b, atol=5 * tol, rtol=5 * tol)


# ---------------------------------------------------------------------------------------
# Strided and unaligned views (the element-wise, non-cp.async load path).
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_views(dtype: torch.dtype) -> None:
    g = _gen(29)
    bshd = [randn((2, n, 3, 64), dtype, g, "cuda").transpose(1, 2) for n in (100, 80, 80)]
    _check(*bshd, is_causal=True, q_offset=-20)
    # Offset by one element: rows no longer 16-byte aligned.
    odd = [randn((2, 3, n, 66), dtype, g, "cuda")[..., 1:65] for n in (100, 80, 80)]
    _check(*odd, is_causal=True)
    # Stride-0 KV heads and batch.
    kv = [randn((1, 1, 80, 64), dtype, g, "cuda").expand(2, 3, 80, 64) for _ in range(2)]
    _check(bshd[0], *kv)


# ---------------------------------------------------------------------------------------
# float64 (SIMT path) is exact to float64 rounding, lse included (float64 by contract).
def test_float64_forward_tight() -> None:
    q, k, v = _qkv(F64, 2, 4, 2, 70, 90, 48, seed=31)
    ops = torch.ops.ring_attn
    out, lse = ops.attn_fwd(q, k, v, None, None, None, 0, 0, True, 0.2, 0.0, None, False)
    ref, ref_lse = reference(q, k, v, is_causal=True, scale=0.2)
    assert lse.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_rejects_head_dim_over_256() -> None:
    q, k, v = _qkv(BF16, 1, 1, 1, 8, 8, 264)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        torch.ops.ring_attn.attn_fwd(q, k, v, None, None, None, 0, 0, False, 1.0, 0.0, None,
                                     False)


# ---------------------------------------------------------------------------------------
# A longer causal case: many tiles in both directions, ragged tails, skipped tiles.
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_long_causal(dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype, 1, 4, 2, 1100, 1300, 128, seed=37)
    _check(q, k, v, is_causal=True, q_offset=200)


# ---------------------------------------------------------------------------------------
# float32 with very large logits (std 300, |s| up to ~1500) and few keys (issue 8 §5): the
# SIMT path computes in double, so out stays within 3x torch's own float32 error (a float32
# s - m alone loses ulp(1500) = 1.2e-4 in the exponent); gradients as everywhere else.
@pytest.mark.parametrize("sk", [3, 15, 300])
def test_float32_extreme_logits(sk: int) -> None:
    q, k, v = _qkv(F32, 1, 2, 2, 64, sk, 64, seed=sk)
    q = q * 300.0
    out, _ = torch.ops.ring_attn.attn_fwd(q, k, v, None, None, None, 0, 0, False, 0.125, 0.0,
                                          None, False)
    ref_out, _ = reference(q, k, v, scale=0.125)
    low_out, _ = reference(q, k, v, scale=0.125, dtype=F32)
    assert_close_to_ref(out, low_out, ref_out, factor=3.0, what="out")
    _check(q, k, v, scale=0.125)
