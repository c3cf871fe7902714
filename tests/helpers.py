"""Shared test utilities: the float64 reference, the torch-style error-ratio check, input
builders, and an independent (numpy) model of the dropout mask.

Accuracy is judged the way torch's own SDPA tests judge fused kernels: the error of ours
against a float64 reference must stay within a small multiple of the error torch's SDPA
makes in the same dtype, plus a tiny absolute floor scaled by the output's magnitude.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

# Absolute floor per dtype, multiplied by max(1, max|ref|): it only matters when torch's
# own error is (near) zero, e.g. exact cases or float64.
ATOL_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
}


def float_mask(attn_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """An additive mask in `dtype`: bool False -> -inf, True -> 0; floats are cast."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.tensor(-math.inf, dtype=dtype,
                                                         device=attn_mask.device))
    return attn_mask.to(dtype)


def torch_sdpa(query: Tensor, key: Tensor, value: Tensor, **kw) -> Tensor:
    """torch's own SDPA in the inputs' dtype: the error ours is compared with. Where torch's
    fused CUDA kernels reject an input its math backend takes (the memory-efficient kernel
    wants a bias whose last dim is contiguous and whose dtype is the query's, seen on an
    H200 with a broadcast (L, 1) mask and a float32 mask on bf16 queries), torch's math
    backend in the same dtype gives that error instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kw)
    except RuntimeError:
        if not query.is_cuda:
            raise
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kw)


def sdpa_reference(query: Tensor, key: Tensor, value: Tensor,
                   attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: Optional[float] = None,
                   enable_gqa: bool = False, dropout_mask: Optional[Tensor] = None,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """torch's math SDPA computed in `dtype` (float64 by default), differentiable through
    the casts. Bool masks are turned into additive -inf masks first (torch's public entry
    does the same; the raw math op does not). With `dropout_mask` (bool, True = keep) the
    given mask is applied instead of a random one, so a kernel's dropout can be checked
    exactly. Fully masked rows give 0, like torch's public SDPA."""
    q, k, v = (t.to(dtype) for t in (query, key, value))
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, float_mask(attn_mask, dtype), dropout_p, is_causal,
        dropout_mask, scale=scale, enable_gqa=enable_gqa)
    return out


def max_abs_err(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| in float64 over the entries where both are finite (0 if none)."""
    d = (x.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    d = d[torch.isfinite(d)]
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_ref(ours: Tensor, theirs: Optional[Tensor], ref: Tensor,
                        factor: float = 4.0, atol_floor: Optional[float] = None,
                        what: str = "output") -> None:
    """Assert max|ours - ref| <= factor * max|theirs - ref| + floor * max(1, max|ref|).

    `ref` is the high-precision reference, `theirs` the same computation by torch in the
    same dtype as `ours` (None: only the floor counts). Shapes must match, and ours must
    be finite wherever the reference is. Reusable for any result (outputs, grads, lse)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if theirs is not None:
        assert theirs.shape == ref.shape, f"{what}: torch shape {tuple(theirs.shape)}"
    ref_finite = torch.isfinite(ref)
    bad = ref_finite & ~torch.isfinite(ours)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} non-finite values where the reference is finite, first at "
        f"{tuple(bad.nonzero()[0].tolist())}")
    if ours.numel() == 0:
        return
    if atol_floor is None:
        atol_floor = ATOL_FLOOR.get(ours.dtype, 1e-6)
    ref_fin = ref.detach().to(torch.float64)[ref_finite]
    mag = max(1.0, float(ref_fin.abs().max())) if ref_fin.numel() else 1.0
    err = max_abs_err(ours, ref)
    err_torch = max_abs_err(theirs, ref) if theirs is not None else 0.0
    bound = factor * err_torch + atol_floor * mag
    assert err <= bound, (
        f"{what}: max error {err:.3e} vs reference exceeds {factor} x torch's "
        f"{err_torch:.3e} + floor {atol_floor * mag:.1e} (dtype {ours.dtype}, max|ref| "
        f"{mag:.3g})")


def randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator,
          device: str = "cpu", mul: float = 1.0) -> Tensor:
    """Standard normal in float32 from `gen`, scaled, then cast (same values whatever the
    target dtype's own RNG would have done)."""
    return (torch.randn(tuple(shape), generator=gen) * mul).to(device=device, dtype=dtype)


def random_bool_mask(shape: Sequence[int], gen: torch.Generator, keep: float = 0.7,
                     device: str = "cpu") -> Tensor:
    return torch.rand(tuple(shape), generator=gen).lt(keep).to(device)


def random_float_mask(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator,
                      device: str = "cpu") -> Tensor:
    """Additive mask with finite values and some -inf (masked) entries; drawn in float64
    so a float64 mask carries more than float32's precision."""
    m = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    m = m.masked_fill(torch.rand(tuple(shape), generator=gen) > 0.8, -math.inf)
    return m.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Independent model of the dropout mask (csrc/common/dropout_rng.h), in numpy uint64:
# Philox-4x32-10 with counter {kpos >> 2, qpos, head, batch} and key = the 64-bit seed;
# element kept iff word[kpos & 3] >= floor(p * 2^32).
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def _philox4x32_10(c: list[np.ndarray], k0: np.uint64, k1: np.uint64) -> list[np.ndarray]:
    c0, c1, c2, c3 = (x.astype(np.uint64) & _LO for x in c)
    for _ in range(10):
        p0 = _M0 * c0  # < 2^64: exact in uint64
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _LO
        hi1, lo1 = p1 >> np.uint64(32), p1 & _LO
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _LO
        k1 = (k1 + _W1) & _LO
    return [c0, c1, c2, c3]


def dropout_threshold(p: float) -> int:
    if p <= 0.0:
        return 0
    return min(int(p * 4294967296.0), 4294967295)


def dropout_keep_mask(seed: int, batch: int, heads: int, q_pos: Sequence[int],
                      k_pos: Sequence[int], p: float) -> Tensor:
    """Bool [batch, heads, len(q_pos), len(k_pos)], True where the element is kept."""
    s = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    k0, k1 = s & _LO, s >> np.uint64(32)
    b, h, i, j = np.meshgrid(np.arange(batch, dtype=np.uint64), np.arange(heads, dtype=np.uint64),
                             np.asarray(q_pos, dtype=np.int64).astype(np.uint64),
                             np.asarray(k_pos, dtype=np.int64).astype(np.uint64), indexing="ij")
    words = _philox4x32_10([j >> np.uint64(2), i, h, b], k0, k1)
    lane = (j & np.uint64(3)).astype(np.int64)
    word = np.choose(lane, words)
    return torch.from_numpy(word >= np.uint64(dropout_threshold(p)))


def has_cuda_kernel() -> bool:
    """True when a CUDA device and this build's CUDA kernels are both present."""
    try:
        import ring_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ring_attn::attn_fwd", "CUDA")
