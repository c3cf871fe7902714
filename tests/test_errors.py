"""Every input torch's SDPA rejects raises before any kernel runs, with the exception type
torch raises for it (measured here against torch's public SDPA, case by case) and a
message naming the offending argument, the expected and the actual value. Inputs torch
lets through but we cannot make exact (dropout_p = 1, a non-finite scale) raise a
RingAttnError; odd inputs torch accepts (0-D tensor dropout_p / scale) work as in torch.
Device mismatches use meta tensors, so no GPU is needed."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_attn
from ring_attn import ops
from ring_attn.errors import RingAttnError, RingAttnException

Tensor = torch.Tensor


def _t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.randn(shape).to(device=device, dtype=dtype) if dtype.is_floating_point \
        else torch.zeros(shape, dtype=dtype, device=device)


def _qkv(**over: Tensor) -> dict[str, Tensor]:
    args = {"query": _t(2, 4, 5, 8), "key": _t(2, 4, 6, 8), "value": _t(2, 4, 6, 8)}
    args.update(over)
    return args


def _q16(**over: Any) -> dict[str, Tensor]:
    dt = over.pop("dtype", torch.float16)
    return _qkv(query=_t(2, 4, 5, 8, dtype=dt), key=_t(2, 4, 6, 8, dtype=dt),
                value=_t(2, 4, 6, 8, dtype=dt), **over)


def _all(dtype: torch.dtype) -> dict[str, Tensor]:
    return _qkv(query=_t(2, 4, 5, 8, dtype=dtype), key=_t(2, 4, 6, 8, dtype=dtype),
                value=_t(2, 4, 6, 8, dtype=dtype))


def _m(mask: Any, **over: Any) -> dict[str, Any]:
    return {**_qkv(), "attn_mask": mask, **over}


# Inputs torch's public SDPA rejects: name -> (kwargs, the exception type torch 2.15
# raises, regex on OUR message). The test asserts torch still raises that type (so the
# table stays measured, not remembered) and that ours is an instance of it.
BAD: dict[str, Callable[[], tuple[dict[str, Any], type, str]]] = {
    # dtypes
    "key_f64": lambda: (_qkv(key=_t(2, 4, 6, 8, dtype=torch.float64)), RuntimeError,
                        r"same dtype.*key torch.float64"),
    "value_bf16": lambda: (_qkv(value=_t(2, 4, 6, 8, dtype=torch.bfloat16)), RuntimeError,
                           r"same dtype.*value torch.bfloat16"),
    "query_f16": lambda: (_qkv(query=_t(2, 4, 5, 8, dtype=torch.float16)), RuntimeError,
                          r"same dtype.*query torch.float16"),
    "int32": lambda: (_all(torch.int32), RuntimeError, r"query dtype.*torch.int32"),
    "int64": lambda: (_all(torch.int64), RuntimeError, r"query dtype.*torch.int64"),
    "uint8": lambda: (_all(torch.uint8), RuntimeError, r"query dtype.*torch.uint8"),
    "bool": lambda: (_all(torch.bool), RuntimeError, r"query dtype.*torch.bool"),
    "complex64": lambda: (_all(torch.complex64), NotImplementedError,
                          r"query dtype.*torch.complex64"),
    "float8": lambda: (_all(torch.float8_e4m3fn), NotImplementedError,
                       r"query dtype.*float8_e4m3fn"),
    # devices (meta stands in for a second device)
    "query_meta": lambda: (_qkv(query=_t(2, 4, 5, 8, device="meta")), RuntimeError,
                           r"same device.*query meta"),
    "key_meta": lambda: (_qkv(key=_t(2, 4, 6, 8, device="meta")), RuntimeError,
                         r"same device.*key meta"),
    "value_meta": lambda: (_qkv(value=_t(2, 4, 6, 8, device="meta")), RuntimeError,
                           r"same device.*value meta"),
    "key_value_meta": lambda: (_qkv(key=_t(2, 4, 6, 8, device="meta"),
                                    value=_t(2, 4, 6, 8, device="meta")), RuntimeError,
                               r"same device.*key meta"),
    # dims and shapes
    "query_1d": lambda: (_qkv(query=_t(8)), RuntimeError, r"query must be at least 2-D"),
    "key_1d": lambda: (_qkv(key=_t(8)), RuntimeError, r"key must be at least 2-D"),
    "value_1d": lambda: (_qkv(value=_t(8)), RuntimeError, r"value must be at least 2-D"),
    "query_0d": lambda: (_qkv(query=_t()), RuntimeError, r"query must be at least 2-D"),
    "value_0d": lambda: (_qkv(value=_t()), RuntimeError, r"value must be at least 2-D"),
    "key_head_dim": lambda: (_qkv(key=_t(2, 4, 6, 7)), RuntimeError, r"key head dim.*8.*7"),
    "batch_not_broadcast": lambda: (_qkv(key=_t(3, 4, 6, 8), value=_t(3, 4, 6, 8)),
                                    RuntimeError, r"batch dims of query.*key"),
    "batch_not_broadcast_5d": lambda: (_qkv(query=_t(3, 2, 4, 5, 8), key=_t(2, 2, 4, 6, 8),
                                            value=_t(2, 2, 4, 6, 8)), RuntimeError,
                                       r"batch dims of query"),
    # heads / GQA
    "gqa_not_divisible": lambda: ({**_qkv(key=_t(2, 3, 6, 8), value=_t(2, 3, 6, 8)),
                                   "enable_gqa": True}, RuntimeError,
                                  r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    "gqa_more_kv_heads": lambda: ({**_qkv(key=_t(2, 8, 6, 8), value=_t(2, 8, 6, 8)),
                                   "enable_gqa": True}, RuntimeError,
                                  r"query heads \(4\) must be a multiple of key/value heads \(8\)"),
    "heads_differ_without_gqa": lambda: (_qkv(key=_t(2, 2, 6, 8), value=_t(2, 2, 6, 8)),
                                         RuntimeError, r"query has 4 heads.*enable_gqa=True"),
    "key_value_heads_differ": lambda: (_qkv(key=_t(2, 4, 6, 8), value=_t(2, 2, 6, 8)),
                                       RuntimeError, r"key and value head counts differ"),
    # attn_mask
    "mask_device": None,  # torch 2.15 accepts a meta mask with CPU inputs: see BEYOND
    "mask_with_is_causal": lambda: (_m(_t(5, 6), is_causal=True), RuntimeError,
                                    r"attn_mask must be None when is_causal"),
    "mask_bool_with_is_causal": lambda: (_m(_t(5, 6, dtype=torch.bool), is_causal=True),
                                         RuntimeError, r"attn_mask must be None when is_causal"),
    "mask_int64": lambda: (_m(_t(5, 6, dtype=torch.int64)), RuntimeError,
                           r"attn_mask dtype.*torch.int64"),
    "mask_uint8": lambda: (_m(_t(5, 6, dtype=torch.uint8)), RuntimeError,
                           r"attn_mask dtype.*torch.uint8"),
    "mask_f64_with_f32_query": lambda: (_m(_t(5, 6, dtype=torch.float64)), RuntimeError,
                                        r"attn_mask dtype.*torch.float64"),
    "mask_f16_with_f32_query": lambda: (_m(_t(5, 6, dtype=torch.float16)), RuntimeError,
                                        r"attn_mask dtype.*torch.float16"),
    "mask_f16_with_bf16_query": lambda: (
        {**_q16(dtype=torch.bfloat16), "attn_mask": _t(5, 6, dtype=torch.float16)},
        RuntimeError, r"attn_mask dtype.*torch.float16"),
    "mask_bf16_with_f16_query": lambda: (
        {**_q16(), "attn_mask": _t(5, 6, dtype=torch.bfloat16)}, RuntimeError,
        r"attn_mask dtype.*torch.bfloat16"),
    "mask_not_broadcast_rows": lambda: (_m(_t(4, 6)), RuntimeError,
                                        r"attn_mask shape \(4, 6\) does not broadcast"),
    "mask_not_broadcast_cols": lambda: (_m(_t(5, 7, dtype=torch.bool)), RuntimeError,
                                        r"attn_mask shape \(5, 7\) does not broadcast"),
    "mask_not_broadcast_heads": lambda: (_m(_t(1, 3, 5, 6)), RuntimeError,
                                         r"attn_mask shape.*does not broadcast"),
    "mask_3d_not_broadcast": lambda: (_m(_t(3, 5, 6)), RuntimeError,
                                      r"attn_mask shape.*does not broadcast"),
    "mask_5d": lambda: (_m(_t(1, 2, 4, 5, 6)), RuntimeError,
                        r"attn_mask shape.*does not broadcast"),
    "mask_too_many_dims": lambda: (_m(_t(1, 1, 1, 1, 5, 6)), RuntimeError,
                                   r"attn_mask shape.*does not broadcast"),
    "mask_1d": lambda: (_m(_t(6, dtype=torch.bool)), IndexError,
                        r"attn_mask must be at least 2-D.*1-D"),
    "mask_0d": lambda: (_m(torch.tensor(True)), IndexError,
                        r"attn_mask must be at least 2-D.*0-D"),
    "mask_list": lambda: (_m([[True] * 6] * 5), TypeError, r"attn_mask must be a Tensor, got list"),
    "mask_str": lambda: (_m("causal"), TypeError, r"attn_mask must be a Tensor, got str"),
    "mask_numpy": lambda: (_m(np.ones((5, 6), bool)), TypeError,
                           r"attn_mask must be a Tensor, got ndarray"),
    # dropout_p
    "dropout_p_negative": lambda: ({**_qkv(), "dropout_p": -0.1}, RuntimeError,
                                   r"dropout_p must be in \[0, 1\), got -0.1"),
    "dropout_p_above_one": lambda: ({**_qkv(), "dropout_p": 1.5}, RuntimeError,
                                    r"dropout_p must be in \[0, 1\), got 1.5"),
    "dropout_p_nan": lambda: ({**_qkv(), "dropout_p": float("nan")}, RuntimeError,
                             r"dropout_p must be in \[0, 1\), got nan"),
    "dropout_p_str": lambda: ({**_qkv(), "dropout_p": "0.1"}, TypeError,
                              r"dropout_p must be a float.*got str"),
    "dropout_p_none": lambda: ({**_qkv(), "dropout_p": None}, TypeError,
                               r"dropout_p must be a float.*got NoneType"),
    "dropout_p_1d_tensor": lambda: ({**_qkv(), "dropout_p": torch.tensor([0.1])}, TypeError,
                                    r"dropout_p must be a float.*got Tensor"),
    "dropout_p_complex": lambda: ({**_qkv(), "dropout_p": 0.1j}, TypeError,
                                  r"dropout_p must be a float.*got complex"),
    # scale
    "scale_str": lambda: ({**_qkv(), "scale": "1"}, TypeError, r"scale must be a float.*str"),
    "scale_list": lambda: ({**_qkv(), "scale": [0.5]}, TypeError,
                           r"scale must be a float.*list"),
    "scale_1d_tensor": lambda: ({**_qkv(), "scale": torch.tensor([0.5])}, TypeError,
                                r"scale must be a float.*Tensor"),
    "scale_complex": lambda: ({**_qkv(), "scale": 1j}, TypeError,
                              r"scale must be a float.*complex"),
    # is_causal / enable_gqa: torch's parser takes only a Python bool
    "is_causal_int": lambda: ({**_qkv(), "is_causal": 1}, TypeError,
                              r"is_causal must be bool, got int"),
    "is_causal_float": lambda: ({**_qkv(), "is_causal": 1.0}, TypeError,
                                r"is_causal must be bool, got float"),
    "is_causal_str": lambda: ({**_qkv(), "is_causal": "yes"}, TypeError,
                              r"is_causal must be bool, got str"),
    "is_causal_none": lambda: ({**_qkv(), "is_causal": None}, TypeError,
                               r"is_causal must be bool, got NoneType"),
    "is_causal_tensor": lambda: ({**_qkv(), "is_causal": torch.tensor(True)}, TypeError,
                                 r"is_causal must be bool, got Tensor"),
    "is_causal_numpy": lambda: ({**_qkv(), "is_causal": np.bool_(True)}, TypeError,
                                r"is_causal must be bool, got bool_? np.True_"),
    "enable_gqa_int": lambda: ({**_qkv(), "enable_gqa": 1}, TypeError,
                               r"enable_gqa must be bool, got int"),
    "enable_gqa_str": lambda: ({**_qkv(), "enable_gqa": "yes"}, TypeError,
                               r"enable_gqa must be bool, got str"),
    "enable_gqa_none": lambda: ({**_qkv(), "enable_gqa": None}, TypeError,
                                r"enable_gqa must be bool, got NoneType"),
    # not tensors
    "query_list": lambda: (_qkv(query=[[1.0]]), TypeError, r"query must be a Tensor, got list"),
    "query_none": lambda: (_qkv(query=None), TypeError, r"query must be a Tensor, got NoneType"),
    "key_numpy": lambda: (_qkv(key=np.ones((2, 4, 6, 8), np.float32)), TypeError,
                          r"key must be a Tensor, got ndarray"),
    "value_float": lambda: (_qkv(value=1.0), TypeError, r"value must be a Tensor, got float"),
}
BAD = {k: f for k, f in BAD.items() if f is not None}

# Inputs torch lets through that we refuse with a clear RuntimeError (RingAttnError)
# rather than compute something we cannot make exact: name -> (kwargs, regex).
BEYOND: dict[str, Callable[[], tuple[dict[str, Any], str]]] = {
    "dropout_p_one": lambda: ({**_qkv(), "dropout_p": 1.0},
                              r"dropout_p must be in \[0, 1\), got 1.0"),
    "dropout_p_true": lambda: ({**_qkv(), "dropout_p": True}, r"dropout_p must be in \[0, 1\)"),
    "scale_nan": lambda: ({**_qkv(), "scale": float("nan")}, r"scale must be finite"),
    "scale_inf": lambda: ({**_qkv(), "scale": float("inf")}, r"scale must be finite"),
    # torch 2.15 reads a value longer than key without complaint (its kernels use key's S)
    "value_length": lambda: (_qkv(value=_t(2, 4, 7, 8)), r"value length.*6.*7"),
    # torch 2.15 accepts a meta mask with CPU inputs (the mask is never read on CPU)
    "mask_device": lambda: (_m(_t(5, 6, device="meta")), r"attn_mask must be on query's device"),
}

# Unusual inputs torch accepts and so must we, with torch's result.
ACCEPTED: dict[str, Callable[[], dict[str, Any]]] = {
    "dropout_p_0d_tensor": lambda: {**_qkv(), "dropout_p": torch.tensor(0.0)},
    "dropout_p_0d_int_tensor": lambda: {**_qkv(), "dropout_p": torch.tensor(0)},
    "dropout_p_int": lambda: {**_qkv(), "dropout_p": 0},
    "scale_0d_tensor": lambda: {**_qkv(), "scale": torch.tensor(0.25)},
    "scale_int": lambda: {**_qkv(), "scale": 1},
    "scale_negative": lambda: {**_qkv(), "scale": -0.5},
    "mask_3d": lambda: _m(_t(4, 5, 6)),
    "mask_col_broadcast": lambda: _m(_t(5, 1)),
    "query_2d": lambda: _qkv(query=_t(5, 8), key=_t(6, 8), value=_t(6, 8)),
    "key_3d": lambda: _qkv(key=_t(4, 6, 8), value=_t(4, 6, 8)),
    "value_head_dim_differs": lambda: _qkv(value=_t(2, 4, 6, 3)),
    "one_query_head": lambda: _qkv(query=_t(2, 1, 5, 8)),
    "one_kv_head": lambda: _qkv(key=_t(2, 1, 6, 8), value=_t(2, 1, 6, 8)),
    "f32_mask_bf16_query": lambda: {**_q16(dtype=torch.bfloat16), "attn_mask": _t(5, 6)},
    "causal_more_queries_than_keys": lambda: {**_qkv(query=_t(2, 4, 7, 8)), "is_causal": True},
}


def _torch_raises(kwargs: dict[str, Any], math_too: bool = False) -> BaseException | None:
    """What torch's public SDPA raises for kwargs (None: it accepts them); with math_too,
    what its math backend raises when the public function accepts. torch 2.11's CPU flash
    path lets an attn_mask through with is_causal=True while its math backend (and torch
    2.15's public function) raise RuntimeError; we refuse it on every version."""
    for backends in (None, [SDPBackend.MATH]) if math_too else (None,):
        try:
            if backends is None:
                F.scaled_dot_product_attention(**kwargs)
            else:
                with sdpa_kernel(backends):
                    F.scaled_dot_product_attention(**kwargs)
        except Exception as e:  # noqa: BLE001 - the type is what the test compares
            return e
    return None


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_torchs_type(name: str) -> None:
    kwargs, exc, match = BAD[name]()
    theirs = _torch_raises(kwargs, math_too=True)
    assert isinstance(theirs, exc), f"torch now raises {type(theirs).__name__}: {theirs}"
    with pytest.raises(exc, match=match) as ours:
        ring_attn.scaled_dot_product_attention(**kwargs)
    assert isinstance(ours.value, RingAttnException)
    assert isinstance(ours.value, type(theirs)), (type(ours.value), type(theirs))


@pytest.mark.parametrize("name", list(BEYOND))
def test_refused_beyond_torch(name: str) -> None:
    kwargs, match = BEYOND[name]()
    assert _torch_raises(kwargs) is None, "torch rejects this now: move it to BAD"
    with pytest.raises(RingAttnError, match=match):
        ring_attn.scaled_dot_product_attention(**kwargs)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_like_torch(name: str) -> None:
    kwargs = ACCEPTED[name]()
    ours = ring_attn.scaled_dot_product_attention(**kwargs)
    wide = {k: (v.double() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0
                else v) for k, v in kwargs.items()}
    ref = F.scaled_dot_product_attention(**wide)
    assert ours.shape == ref.shape and ours.dtype == kwargs["query"].dtype
    tol = 1e-5 if ours.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)


def test_mask_gradient_is_refused() -> None:
    """A float mask that requires grad: the forward works, backward says it is not
    supported (rather than silently returning no gradient)."""
    q, k, v = (_t(1, 2, 5, 8).requires_grad_() for _ in range(3))
    mask = _t(5, 5).requires_grad_()
    out = ring_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # RingAttnError (a RuntimeError) although raised in C++ inside the autograd engine:
    # the Python module's refusal handler (csrc/api/refusal.h).
    with pytest.raises(RingAttnError, match=r"attn_mask"):
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


def _double_backward_cases():
    from ring_attn.simulated import simulated_ring_attention
    return {
        "scaled_dot_product_attention": lambda q, k, v: ring_attn.scaled_dot_product_attention(
            q, k, v, is_causal=True),
        "ops.attn_fwd": lambda q, k, v: ops.attn_fwd(q, k, v, scale=0.5)[0],
        "simulated_ring": lambda q, k, v: simulated_ring_attention(q, k, v, world_size=2,
                                                                   is_causal=True),
    }


@pytest.mark.parametrize("name", ["scaled_dot_product_attention", "ops.attn_fwd",
                                  "simulated_ring"])
def test_double_backward_is_refused(name: str) -> None:
    """create_graph=True raises at the first backward (never zeros or a graph-less
    gradient); the plain backward of the same call still works."""
    fn = _double_backward_cases()[name]
    q, k, v = (_t(1, 2, 8, 4).requires_grad_() for _ in range(3))
    with pytest.raises(RingAttnError, match=r"^ring_attn: double backward \(create_graph=True\) "
                       r"is not supported$"):
        torch.autograd.grad(fn(q, k, v).sum(), (q, k, v), create_graph=True)
    grads = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))
    assert all(g is not None and g.grad_fn is None for g in grads)


# The simulated ring checks its inputs with the single-device entry's rules: the C++ op
# ring_attn::_sdpa_check runs the function ring_attn::sdpa runs (csrc/api/attention.cpp).
SIMULATED_SAME = ["key_f64", "int32", "complex64", "query_meta", "query_1d", "key_head_dim",
                  "gqa_not_divisible", "key_value_heads_differ", "mask_int64", "mask_1d",
                  "mask_list", "dropout_p_negative", "scale_str"]


@pytest.mark.parametrize("name", SIMULATED_SAME)
def test_simulated_ring_applies_the_same_rules(name: str) -> None:
    from ring_attn.simulated import simulated_ring_attention
    kwargs, exc, match = BAD[name]()
    kwargs = {**kwargs, "enable_gqa": True}  # the simulated ring always allows GQA
    with pytest.raises(exc, match=match) as ours:
        ring_attn.scaled_dot_product_attention(**kwargs)
    kwargs.pop("enable_gqa")
    with pytest.raises(exc) as sim:
        simulated_ring_attention(**kwargs, world_size=1)
    assert type(sim.value) is type(ours.value) and str(sim.value) == str(ours.value)
