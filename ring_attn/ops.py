"""Typed bindings of the ring_attn ops: the C++ kernels and their fake (shape) kernels for
torch.compile. attn_fwd's autograd (backward calls attn_bwd) is the op's own C++ kernel
(csrc/api/autograd.cpp), shared with the C++ API."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.ring_attn)
from .merge import LSE_DTYPE

Tensor = torch.Tensor


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
             q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None,
             q_offset: int = 0, k_offset: int = 0, is_causal: bool = False,
             scale: float = 1.0, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
             out_fp32: bool = False, cu_seqlens_q: Optional[Tensor] = None,
             cu_seqlens_k: Optional[Tensor] = None, window_left: int = -1,
             window_right: int = -1, softcap: float = 0.0,
             dropout_head_offset: int = 0) -> tuple[Tensor, Tensor]:
    """Local attention of one (query block, key block) pair; returns (out, lse).

    Visibility (csrc/common/attn_params.h): the mask, the band qpos - window_left <=
    kpos <= qpos + window_right (-1 unbounded; is_causal is window_right = 0) and, with
    cu_seqlens_q/k, the same document on both sides. softcap > 0 caps the scores."""
    return torch.ops.ring_attn.attn_fwd.default(
        q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset, is_causal, scale,
        dropout_p, seed, out_fp32, cu_seqlens_q, cu_seqlens_k, window_left, window_right,
        softcap, dropout_head_offset)


def attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             dlse: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
             q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None,
             q_offset: int = 0, k_offset: int = 0, is_causal: bool = False,
             scale: float = 1.0, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
             grad_fp32: bool = False, cu_seqlens_q: Optional[Tensor] = None,
             cu_seqlens_k: Optional[Tensor] = None, window_left: int = -1,
             window_right: int = -1, softcap: float = 0.0,
             dropout_head_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of attn_fwd given the out and lse to use."""
    return torch.ops.ring_attn.attn_bwd.default(
        dout, q, k, v, out, lse, dlse, attn_mask, q_pos, k_pos, q_offset, k_offset,
        is_causal, scale, dropout_p, seed, grad_fp32, cu_seqlens_q, cu_seqlens_k,
        window_left, window_right, softcap, dropout_head_offset)


@torch.library.register_fake("ring_attn::attn_fwd")
def _attn_fwd_fake(q, k, v, attn_mask=None, q_pos=None, k_pos=None, q_offset=0, k_offset=0,
                   is_causal=False, scale=1.0, dropout_p=0.0, seed=None, out_fp32=False,
                   cu_seqlens_q=None, cu_seqlens_k=None, window_left=-1, window_right=-1,
                   softcap=0.0, dropout_head_offset=0):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "ring_attn: q, k, v must be 4-D")
    B, Hq, Sq, _ = q.shape
    out_dtype = torch.float32 if out_fp32 else q.dtype
    out = q.new_empty((B, Hq, Sq, v.shape[-1]), dtype=out_dtype)
    # lse is float64 for every input dtype (csrc/common/attn_params.h).
    lse = q.new_empty((B, Hq, Sq), dtype=LSE_DTYPE)
    return out, lse


@torch.library.register_fake("ring_attn::attn_bwd")
def _attn_bwd_fake(dout, q, k, v, out, lse, dlse=None, attn_mask=None, q_pos=None, k_pos=None,
                   q_offset=0, k_offset=0, is_causal=False, scale=1.0, dropout_p=0.0,
                   seed=None, grad_fp32=False, cu_seqlens_q=None, cu_seqlens_k=None,
                   window_left=-1, window_right=-1, softcap=0.0, dropout_head_offset=0):
    g = torch.float32 if grad_fp32 else q.dtype
    return (torch.empty(q.shape, dtype=g, device=q.device),
            torch.empty(k.shape, dtype=g, device=k.device),
            torch.empty(v.shape, dtype=g, device=v.device))


@torch.library.register_fake("ring_attn::merge_")
def _merge_fake(acc_out, acc_lse, out, lse):
    return None


@torch.library.register_fake("ring_attn::_saturated_rows")
def _saturated_rows_fake(lse, dout):
    return lse.new_empty((), dtype=torch.bool)
