"""Additive masks at torch.finfo(dtype).min, Hugging Face's padding value, on every backend.

finfo(float32).min = -3.40e38 and finfo(bfloat16).min = -3.39e38 lie below
-FLT_MAX / log2(e) = -2.36e38, so a kernel that scales the mask into log2 units before
adding it overflows to -inf; a fully padded row then gave out = 0 and lse = -inf on the
CUDA tensor-core kernels, while torch (and the CPU kernels) give the mean of V with
lse = finfo.min. Checked against torch's math SDPA in float64: out for every row, lse of
the op for the fully padded row, and gradients (dout = 0 on the fully padded row, as a
loss over padded positions gives: its own backward recomputes P = exp(s - lse) and lse
= finfo.min + log(n) rounds to finfo.min in float32, so P = 1 instead of 1/n on every
backend; see the comment at _check).
"""
from __future__ import annotations

import pytest
import torch

import ring_attn
from helpers import assert_close_to_ref, randn, sdpa_reference, torch_sdpa

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _check(device: str, dtype: torch.dtype, mask_dtype: torch.dtype, head_dim: int) -> None:
    g = torch.Generator().manual_seed(5)
    b, h, sq, sk = 2, 3, 37, 70
    q, k, v = (randn((b, h, n, head_dim), dtype, g).to(device) for n in (sq, sk, sk))
    pad = torch.finfo(mask_dtype).min
    mask = torch.zeros((b, 1, sq, sk), dtype=mask_dtype)
    mask[0, ..., 50:] = pad          # right padding of batch 0's keys
    mask[1, ..., :9] = pad           # left padding of batch 1's keys
    mask[:, :, 4, :] = pad           # a fully padded query row
    mask = mask.to(device)
    scale = head_dim ** -0.5

    # Forward: out (public API, mask in the model dtype as HF passes it) and lse (op).
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_attn.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
    torch_in = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = torch_sdpa(*torch_in, attn_mask=mask, scale=scale)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*ref_in, attn_mask=mask, scale=scale)
    assert bool(torch.isfinite(out).all()), "finfo.min padding must not give inf/NaN"
    assert_close_to_ref(out, theirs, ref, factor=4.0, what="out")
    # The fully padded row is the mean of V (all its scores equal finfo.min).
    mean_v = v.double().mean(dim=2)
    assert_close_to_ref(out[:, :, 4], theirs[:, :, 4], mean_v, factor=4.0, what="padded row")

    _, lse = torch.ops.ring_attn.attn_fwd(q, k, v, mask, scale=scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + mask.double()
    lse_ref = torch.logsumexp(s, dim=-1)
    assert bool(torch.isfinite(lse).all()), "lse of a finfo.min-padded row must be finite"
    rel = ((lse.double() - lse_ref).abs() / lse_ref.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-5, f"lse relative error {rel:.2e}"

    # Backward, with no gradient flowing into the fully padded row (see the docstring).
    dout = randn(tuple(out.shape), dtype, g).to(device)
    dout[:, :, 4] = 0
    out.backward(dout)
    theirs.backward(dout)
    ref.backward(dout.double())
    for name, ours_t, torch_t, ref_t in zip("qkv", leaves, torch_in, ref_in):
        assert_close_to_ref(ours_t.grad, torch_t.grad, ref_t.grad, factor=5.0,
                            what=f"d{name}")


@pytest.mark.parametrize("dtype,mask_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)], ids=str)
def test_finfo_min_mask_cpu(dtype: torch.dtype, mask_dtype: torch.dtype) -> None:
    _check("cpu", dtype, mask_dtype, 64)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype,mask_dtype", [(F32, F32), (BF16, BF16), (BF16, F32),
                                              (F16, F32)], ids=str)
def test_finfo_min_mask_cuda(dtype: torch.dtype, mask_dtype: torch.dtype, head_dim: int) -> None:
    _check("cuda", dtype, mask_dtype, head_dim)
