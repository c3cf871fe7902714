"""Every input torch's SDPA rejects (and dropout_p outside [0, 1)) raises before any
kernel runs, with a message naming the offending argument. Device mismatches use meta
tensors, so no GPU is needed."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import ring_attn
from ring_attn import ops

Tensor = torch.Tensor


def _t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.randn(shape).to(device=device, dtype=dtype) if dtype.is_floating_point \
        else torch.zeros(shape, dtype=dtype, device=device)


def _qkv(**over: Tensor) -> dict[str, Tensor]:
    args = {"query": _t(2, 4, 5, 8), "key": _t(2, 4, 6, 8), "value": _t(2, 4, 6, 8)}
    args.update(over)
    return args


# name -> (kwargs for scaled_dot_product_attention, exception type, regex on the message)
BAD: dict[str, Callable[[], tuple[dict[str, Any], type, str]]] = {
    "key_dtype": lambda: (_qkv(key=_t(2, 4, 6, 8, dtype=torch.float64)), ValueError,
                          r"same dtype.*key torch.float64"),
    "value_dtype": lambda: (_qkv(value=_t(2, 4, 6, 8, dtype=torch.bfloat16)), ValueError,
                            r"same dtype.*value torch.bfloat16"),
    "integer_inputs": lambda: (_qkv(query=_t(2, 4, 5, 8, dtype=torch.int32),
                                    key=_t(2, 4, 6, 8, dtype=torch.int32),
                                    value=_t(2, 4, 6, 8, dtype=torch.int32)),
                               ValueError, r"query dtype.*torch.int32"),
    "key_device": lambda: (_qkv(key=_t(2, 4, 6, 8, device="meta")), ValueError,
                           r"same device.*key meta"),
    "value_device": lambda: (_qkv(value=_t(2, 4, 6, 8, device="meta")), ValueError,
                             r"same device.*value meta"),
    "mask_device": lambda: ({**_qkv(), "attn_mask": _t(5, 6, device="meta")}, ValueError,
                            r"attn_mask must be on query's device"),
    "mask_with_is_causal": lambda: ({**_qkv(), "attn_mask": _t(5, 6), "is_causal": True},
                                    ValueError, r"attn_mask must be None when is_causal"),
    "mask_int_dtype": lambda: ({**_qkv(), "attn_mask": _t(5, 6, dtype=torch.int64)},
                               ValueError, r"attn_mask dtype.*torch.int64"),
    "mask_f64_with_f32_query": lambda: ({**_qkv(), "attn_mask": _t(5, 6, dtype=torch.float64)},
                                        ValueError, r"attn_mask dtype.*torch.float64"),
    "mask_f16_with_bf16_query": lambda: (
        {**_qkv(query=_t(2, 4, 5, 8, dtype=torch.bfloat16),
                key=_t(2, 4, 6, 8, dtype=torch.bfloat16),
                value=_t(2, 4, 6, 8, dtype=torch.bfloat16)),
         "attn_mask": _t(5, 6, dtype=torch.float16)},
        ValueError, r"attn_mask dtype.*torch.float16"),
    "mask_not_broadcast_rows": lambda: ({**_qkv(), "attn_mask": _t(4, 6)}, ValueError,
                                        r"attn_mask shape.*does not broadcast"),
    "mask_not_broadcast_cols": lambda: ({**_qkv(), "attn_mask": _t(5, 7, dtype=torch.bool)},
                                        ValueError, r"attn_mask shape.*does not broadcast"),
    "mask_not_broadcast_heads": lambda: ({**_qkv(), "attn_mask": _t(1, 3, 5, 6)}, ValueError,
                                         r"attn_mask shape.*does not broadcast"),
    "mask_too_many_dims": lambda: ({**_qkv(), "attn_mask": _t(1, 1, 1, 1, 5, 6)}, ValueError,
                                   r"attn_mask shape.*does not broadcast"),
    "gqa_not_divisible": lambda: ({**_qkv(key=_t(2, 3, 6, 8), value=_t(2, 3, 6, 8)),
                                   "enable_gqa": True}, ValueError,
                                  r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    "heads_differ_without_gqa": lambda: (_qkv(key=_t(2, 2, 6, 8), value=_t(2, 2, 6, 8)),
                                         ValueError, r"query has 4 heads.*enable_gqa=True"),
    "key_value_heads_differ": lambda: (_qkv(key=_t(2, 4, 6, 8), value=_t(2, 2, 6, 8)),
                                       ValueError, r"key and value head counts differ"),
    "dropout_p_one": lambda: ({**_qkv(), "dropout_p": 1.0}, ValueError,
                              r"dropout_p must be in \[0, 1\), got 1.0"),
    "dropout_p_negative": lambda: ({**_qkv(), "dropout_p": -0.1}, ValueError,
                                   r"dropout_p must be in \[0, 1\), got -0.1"),
    "dropout_p_above_one": lambda: ({**_qkv(), "dropout_p": 1.5}, ValueError, r"dropout_p"),
    "query_1d": lambda: (_qkv(query=_t(8)), ValueError, r"query must be at least 2-D"),
    "key_1d": lambda: (_qkv(key=_t(8)), ValueError, r"key must be at least 2-D"),
    "value_1d": lambda: (_qkv(value=_t(8)), ValueError, r"value must be at least 2-D"),
    "query_0d": lambda: (_qkv(query=_t()), ValueError, r"query must be at least 2-D"),
    "key_head_dim": lambda: (_qkv(key=_t(2, 4, 6, 7)), ValueError, r"key head dim.*8.*7"),
    "value_length": lambda: (_qkv(value=_t(2, 4, 7, 8)), ValueError, r"value length.*6.*7"),
    "batch_not_broadcast": lambda: (_qkv(key=_t(3, 4, 6, 8), value=_t(3, 4, 6, 8)),
                                    ValueError, r"batch dims of query.*key"),
    "query_not_tensor": lambda: (_qkv(query=[[1.0]]), TypeError, r"query must be a Tensor"),
    "scale_nan": lambda: ({**_qkv(), "scale": float("nan")}, ValueError, r"scale must be finite"),
    "scale_inf": lambda: ({**_qkv(), "scale": float("inf")}, ValueError, r"scale must be finite"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name: str) -> None:
    kwargs, exc, match = BAD[name]()
    with pytest.raises(exc, match=match):
        ring_attn.scaled_dot_product_attention(**kwargs)


def test_mask_gradient_is_refused() -> None:
    """A float mask that requires grad: the forward works, backward says it is not
    supported (rather than silently returning no gradient)."""
    q, k, v = (_t(1, 2, 5, 8).requires_grad_() for _ in range(3))
    mask = _t(5, 5).requires_grad_()
    out = ring_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match=r"attn_mask"):
        out.sum().backward()


# The ops check their own arguments too (the ring calls them directly).
def _op_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"q": _t(1, 2, 5, 8), "k": _t(1, 2, 6, 8), "v": _t(1, 2, 6, 8)}
    args.update(over)
    return args


OP_BAD: dict[str, Callable[[], tuple[dict[str, Any], str]]] = {
    "q_3d": lambda: (_op_args(q=_t(2, 5, 8)), r"q must be 4-D"),
    "k_dtype": lambda: (_op_args(k=_t(1, 2, 6, 8, dtype=torch.float64)), r"k dtype"),
    "heads_not_divisible": lambda: (_op_args(q=_t(1, 3, 5, 8)), r"q heads \(3\)"),
    "q_pos_length": lambda: (_op_args(q_pos=torch.arange(4)), r"q_pos must have shape \[5\]"),
    "k_pos_float": lambda: (_op_args(k_pos=torch.arange(6.0)), r"k_pos must be an integer"),
    "dropout_without_seed": lambda: (_op_args(dropout_p=0.5), r"seed is required"),
    "seed_float": lambda: (_op_args(dropout_p=0.5, seed=torch.tensor(1.0)), r"seed must be"),
    "dropout_p_one": lambda: (_op_args(dropout_p=1.0, seed=torch.tensor(1)), r"dropout_p"),
    "mask_3d": lambda: (_op_args(attn_mask=_t(2, 5, 6)), r"attn_mask must be 4-D"),
    "mask_shape": lambda: (_op_args(attn_mask=_t(1, 1, 5, 7)), r"attn_mask shape"),
}


@pytest.mark.parametrize("name", list(OP_BAD))
def test_op_bad_input_raises(name: str) -> None:
    kwargs, match = OP_BAD[name]()
    with pytest.raises(RuntimeError, match=match):
        ops.attn_fwd(**kwargs)
