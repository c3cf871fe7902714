"""torch.autograd.gradcheck in float64 through the public function: the analytical
gradients of ring_attn.scaled_dot_product_attention (attn_bwd) against finite differences
of its own forward, over causal (L != S both ways), GQA, bool and float masks (the float
mask without grad), Dv != D, explicit scales, fully masked rows and broadcast batch dims.
Small shapes: gradcheck evaluates the forward twice per input element."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import ring_attn

Tensor = torch.Tensor


def _inputs(device: str, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
            v_shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_()
                 for s in (q_shape, k_shape, v_shape))  # type: ignore[return-value]


def _case(name: str, device: str) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    base = ((1, 2, 5, 3), (1, 2, 7, 3), (1, 2, 7, 3))
    if name == "plain":
        return _inputs(device, *base), {}
    if name == "causal_l_lt_s":
        return _inputs(device, *base), {"is_causal": True}
    if name == "causal_l_gt_s":
        return _inputs(device, (1, 2, 7, 3), (1, 2, 4, 3), (1, 2, 4, 3)), {"is_causal": True}
    if name == "gqa_causal":
        return (_inputs(device, (1, 4, 5, 3), (1, 2, 6, 3), (1, 2, 6, 3)),
                {"is_causal": True, "enable_gqa": True})
    if name == "mqa":
        return _inputs(device, (1, 3, 4, 3), (1, 1, 6, 3), (1, 1, 6, 2)), {"enable_gqa": True}
    if name == "bool_mask":
        mask = torch.rand((1, 2, 5, 7), generator=g).gt(0.4).to(device)
        return _inputs(device, *base), {"attn_mask": mask}
    if name == "float_mask":
        mask = torch.randn((5, 7), generator=g, dtype=torch.float64).to(device)
        return _inputs(device, *base), {"attn_mask": mask}
    if name == "fully_masked_rows":
        mask = torch.rand((5, 7), generator=g).gt(0.4)
        mask[2] = False
        return _inputs(device, *base), {"attn_mask": mask.to(device)}
    if name == "dv_ne_d_scale":
        return _inputs(device, (1, 2, 5, 3), (1, 2, 7, 3), (1, 2, 7, 6)), {"scale": 0.7}
    if name == "negative_scale_causal":
        return _inputs(device, *base), {"scale": -1.3, "is_causal": True}
    if name == "broadcast_batch_3d":
        return _inputs(device, (2, 1, 4, 3), (1, 2, 6, 3), (6, 3)), {}
    raise ValueError(name)


CASES = ["plain", "causal_l_lt_s", "causal_l_gt_s", "gqa_causal", "mqa", "bool_mask",
         "float_mask", "fully_masked_rows", "dv_ne_d_scale", "negative_scale_causal",
         "broadcast_batch_3d"]


def _check_gradcheck(device: str, name: str) -> None:
    (q, k, v), kw = _case(name, device)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ring_attn.scaled_dot_product_attention(q, k, v, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_cpu(name: str) -> None:
    _check_gradcheck("cpu", name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", CASES)
def test_gradcheck_cuda(name: str) -> None:
    _check_gradcheck("cuda", name)



def _check_gradcheck_op_lse(device: str) -> None:
    """The op's own autograd (attn_fwd's C++ kernel, csrc/api/autograd.cpp) through BOTH
    outputs: gradcheck differentiates out and lse, so the dlse it passes to attn_bwd is
    checked too, with a causal offset, GQA and a window."""
    q, k, v = _inputs("cpu", (1, 4, 5, 3), (1, 2, 7, 3), (1, 2, 7, 2), seed=2)
    q, k, v = (t.detach().to(device).requires_grad_() for t in (q, k, v))

    def fn(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return ring_attn.ops.attn_fwd(q, k, v, is_causal=True, q_offset=2, scale=0.6,
                                      window_left=3)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_op_lse_cpu() -> None:
    _check_gradcheck_op_lse("cpu")


@pytest.mark.cuda
def test_gradcheck_op_lse_cuda() -> None:
    _check_gradcheck_op_lse("cuda")
