"""Property-based checks (hypothesis, derandomized and bounded so the file runs in about
a minute on 2 cores): drawn shapes, dtypes, masks (broadcast, stride-0, all-masked rows),
GQA, causal with Lq != S, non-contiguous inputs, NaN/inf injections and invalid
arguments, compared with torch.

- single device, the simulated ring (P = 1..4, every layout) and a small sample of gloo
  rings (P = 2, all in one spawn) against the float64 reference: our error <= a small
  multiple of torch's own error in the same dtype;
- NaN/inf injected into q, k, v or a float mask: NaN and +-inf exactly where torch's math
  backend has them, out and gradients;
- invalid arguments: ours raises an instance of the exception type torch raises, or, where
  torch accepts the input, either matches torch or refuses with a RingAttnError.

Tensors are generated from a drawn integer seed, so every case is a small dict of
parameters: a failure prints it (hypothesis prints the falsifying example), and
`_build(case)` rebuilds the exact tensors.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_attn
from dist_utils import assert_all_ok, run_ranks
from helpers import assert_close_to_ref, sdpa_reference
from ring_attn.errors import RingAttnError
from ring_attn.layout import LAYOUTS, global_positions
from ring_attn.simulated import simulated_ring_attention

Tensor = torch.Tensor
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
FWD_FACTOR, BWD_FACTOR = 4.0, 5.0  # as tests/test_sdpa_conformance.py


def _settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)


# --- drawing cases --------------------------------------------------------------------------

@st.composite
def sdpa_case(draw, nonfinite: bool = False) -> dict[str, Any]:
    """Parameters of one single-device call (see _build)."""
    dtype = draw(st.sampled_from(["float32", "float64", "bfloat16"] +
                                 ([] if nonfinite else ["float16"])))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    gqa = group > 1 and draw(st.booleans())
    # Without enable_gqa, heads still broadcast from one KV head (torch's math backend).
    hq = hkv * group if gqa else (hkv if group == 1 else group)
    hkv = hkv if gqa or group == 1 else 1
    lq, s = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    e = draw(st.integers(1, 24))
    ev = draw(st.sampled_from([e, draw(st.integers(1, 24))]))
    mask = draw(st.sampled_from(["none", "causal", "bool", "float", "keypad", "stride0"]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype, batch=draw(st.sampled_from(
            [(), (2,), (1, 2)])), hq=hq, hkv=hkv, gqa=gqa, lq=lq, s=s, e=e, ev=ev,
        mask=mask, mask_dtype=draw(st.sampled_from(["float32", "same"])),
        all_masked_rows=draw(st.booleans()), noncontig=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.3, 1.7])),
        inject=draw(st.lists(st.tuples(st.sampled_from(["q", "k", "v"] + (
            ["mask"] if mask == "float" else [])), st.floats(0, 1), st.floats(0, 1),
            st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=2))
        if nonfinite else [])


def _rand(shape, gen: torch.Generator, dtype: torch.dtype, noncontig: bool) -> Tensor:
    if noncontig and len(shape) >= 2:  # a transposed view: last dim not contiguous
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen,
                        dtype=torch.float64).transpose(-1, -2)
        return t.to(dtype)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _build(c: dict[str, Any]) -> tuple[list[Tensor], dict[str, Any], Tensor]:
    """(q, k, v), SDPA keyword arguments, dout for a drawn case."""
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    b, lq, s = tuple(c["batch"]), c["lq"], c["s"]
    q = _rand((*b, c["hq"], lq, c["e"]), g, dt, c["noncontig"])
    k = _rand((*b, c["hkv"], s, c["e"]), g, dt, c["noncontig"])
    v = _rand((*b, c["hkv"], s, c["ev"]), g, dt, False)
    mdt = torch.float32 if c["mask_dtype"] == "float32" else dt
    kind, mask = c["mask"], None
    if kind in ("bool", "float"):
        keep = torch.rand(*b[-1:], 1, lq, s, generator=g) < 0.7
        if c["all_masked_rows"]:
            keep[..., 0, :] = False
        mask = keep if kind == "bool" else torch.where(
            keep, torch.randn(keep.shape, generator=g), torch.tensor(-math.inf)).to(mdt)
    elif kind in ("keypad", "stride0"):
        keep = torch.arange(s) < max(1, s - 2)
        if c["all_masked_rows"]:
            keep[:] = False
        mask = keep.view(*(1,) * (len(b) + 2), s)
        if kind == "stride0":  # stride-0 broadcast view of the full mask shape
            mask = mask.expand(*b, c["hq"], lq, s)
    for name, fi, fj, val in c.get("inject", []):
        t = {"q": q, "k": k, "v": v, "mask": mask}[name]
        idx = tuple(min(int(f * n), n - 1) for f, n in zip((fi, fj), t.shape[-2:]))
        t[(..., *idx)] = val  # every batch and head at (row, column)
    kw = dict(attn_mask=mask, is_causal=kind == "causal", scale=c["scale"],
              enable_gqa=c["gqa"])
    out_shape = (*b, c["hq"], lq, c["ev"]) if b else (c["hq"], lq, c["ev"])
    dout = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dt)
    return [q, k, v], kw, dout


def _leaves(xs: list[Tensor], dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    return [(x.detach() if dtype is None else x.detach().to(dtype)).requires_grad_()
            for x in xs]


def _assert_same_nonfinite(ours: Tensor, ref: Tensor, what: str) -> None:
    for kind in ("isnan", "isposinf", "isneginf"):
        a, b = getattr(ours.detach(), kind)(), getattr(ref.detach(), kind)()
        assert torch.equal(a, b), (f"{what}: {kind} differs at {int((a != b).sum())} of "
                                   f"{a.numel()} (ours {int(a.sum())}, math {int(b.sum())})")


def _compare(ours: list[Tensor], theirs: list[Tensor], ref: list[Tensor],
             nonfinite: bool = False) -> None:
    for name, a, b, r, f in zip(("out", "dq", "dk", "dv"), ours, theirs, ref,
                                (FWD_FACTOR, BWD_FACTOR, BWD_FACTOR, BWD_FACTOR)):
        if nonfinite:
            _assert_same_nonfinite(a, r, name)
        assert_close_to_ref(a, b, r, factor=f, what=name)


# --- single device --------------------------------------------------------------------------

def _check_sdpa_case(c: dict[str, Any], nonfinite: bool) -> None:
    note(f"case = {c!r}")
    xs, kw, dout = _build(c)
    ref_mask = kw["attn_mask"]
    if ref_mask is not None and ref_mask.dtype != torch.bool:
        ref_mask = ref_mask.double()
    ours_in, torch_in, ref_in = _leaves(xs), _leaves(xs), _leaves(xs, torch.float64)
    ours = ring_attn.scaled_dot_product_attention(*ours_in, **kw)
    with sdpa_kernel(SDPBackend.MATH):  # math: NaN semantics and a defined error
        theirs = F.scaled_dot_product_attention(*torch_in, **kw)
    ref = sdpa_reference(*ref_in, **{**kw, "attn_mask": ref_mask})
    assert ours.shape == ref.shape and ours.dtype == xs[0].dtype
    g = [torch.autograd.grad(o, i, d) for o, i, d in
         ((ours, ours_in, dout), (theirs, torch_in, dout), (ref, ref_in, dout.double()))]
    _compare([ours, *g[0]], [theirs, *g[1]], [ref, *g[2]], nonfinite)


@_settings(40)
@given(c=sdpa_case())
def test_sdpa_matches_torch(c: dict[str, Any]) -> None:
    _check_sdpa_case(c, nonfinite=False)


@_settings(30)
@given(c=sdpa_case(nonfinite=True))
def test_sdpa_nonfinite_matches_math(c: dict[str, Any]) -> None:
    _check_sdpa_case(c, nonfinite=True)


# --- invalid arguments ------------------------------------------------------------------------

def _bad_values(name: str) -> st.SearchStrategy:
    t = lambda *s, **kw: torch.zeros(*s, **kw)  # noqa: E731
    tensor_bad = st.sampled_from([
        ("list", lambda x: x.tolist()), ("None", lambda x: None), ("float", lambda x: 1.0),
        ("str", lambda x: "q"), ("numpy", lambda x: x.numpy()),
        ("0-D", lambda x: x[(0,) * x.dim()]),
        ("1-D", lambda x: x.flatten()[:3]), ("int32", lambda x: x.int()),
        ("float64", lambda x: x.double()), ("bool", lambda x: x.bool()),
        ("complex", lambda x: x.to(torch.complex64)), ("meta", lambda x: x.to("meta")),
        ("last dim + 1", lambda x: t(*x.shape[:-1], x.shape[-1] + 1)),
        ("heads 3", lambda x: t(*x.shape[:-3], 3, *x.shape[-2:])),
        ("batch 3", lambda x: t(3, *x.shape[-3:]))])
    pools = {
        "query": tensor_bad, "key": tensor_bad, "value": tensor_bad,
        "attn_mask": st.sampled_from([
            ("int64", lambda x: t(5, 6, dtype=torch.int64)),
            ("float64", lambda x: t(5, 6).double()),
            ("float16", lambda x: t(5, 6).half()), ("rows", lambda x: t(4, 6)),
            ("cols", lambda x: t(5, 7, dtype=torch.bool)),
            ("1-D", lambda x: t(6, dtype=torch.bool)),
            ("0-D", lambda x: torch.tensor(True)), ("list", lambda x: [[True] * 6] * 5),
            ("str", lambda x: "causal"), ("5-D", lambda x: t(1, 2, 4, 5, 6)),
            ("with is_causal", lambda x: t(5, 6, dtype=torch.bool))]),
        "dropout_p": st.sampled_from([-0.5, 1.5, math.nan, 1.0, "0.1", None, 0.1j,
                                      torch.tensor([0.1]), torch.tensor(0.0), 0]),
        "is_causal": st.sampled_from([1, 0, 1.0, "yes", None, np.bool_(True),
                                      torch.tensor(True)]),
        "enable_gqa": st.sampled_from([1, 0, "yes", None, torch.tensor(False)]),
        "scale": st.sampled_from(["1", [0.5], 1j, torch.tensor([0.5]), math.nan, math.inf,
                                  torch.tensor(0.5), 2]),
    }
    return pools[name]


@_settings(80)
@given(name=st.sampled_from(["query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                             "enable_gqa", "scale"]), data=st.data())
def test_invalid_arguments_raise_like_torch(name: str, data) -> None:
    g = torch.Generator().manual_seed(0)
    kw: dict[str, Any] = {"query": torch.randn(2, 4, 5, 8, generator=g),
                          "key": torch.randn(2, 4, 6, 8, generator=g),
                          "value": torch.randn(2, 4, 6, 8, generator=g)}
    bad = data.draw(_bad_values(name), label="bad value")
    if isinstance(bad, tuple):
        label, make = bad
        kw[name] = make(kw.get(name, kw["query"]))
        if label == "with is_causal":
            kw["is_causal"] = True
    else:
        kw[name] = bad
    note(f"{name} = {kw[name]!r}")

    def run(fn) -> tuple[Optional[Tensor], Optional[BaseException]]:
        try:
            return fn(**kw), None
        except Exception as e:  # noqa: BLE001 - compared below
            return None, e
    theirs, t_exc = run(F.scaled_dot_product_attention)
    ours, o_exc = run(ring_attn.scaled_dot_product_attention)
    if t_exc is not None:
        assert o_exc is not None, f"torch raised {t_exc!r}, ours did not"
        assert isinstance(o_exc, type(t_exc)), f"ours {o_exc!r}, torch {t_exc!r}"
        assert "ring_attn:" in str(o_exc)
    elif o_exc is not None:  # torch accepts; we may refuse, clearly
        assert isinstance(o_exc, RingAttnError), f"torch accepts, ours {o_exc!r}"
    elif theirs.device.type == "cpu":
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, equal_nan=True)


# --- the simulated ring -----------------------------------------------------------------------

@st.composite
def ring_case(draw, nonfinite: bool = False, p: Optional[int] = None) -> dict[str, Any]:
    layout = draw(st.sampled_from(LAYOUTS))
    hk = draw(st.integers(1, 2))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        p=p or draw(st.integers(1, 4)), layout=layout,
        s_local=draw(st.sampled_from([2, 4, 6] if layout == "zigzag" else [1, 2, 3, 5])),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float64"])),
        b=draw(st.integers(1, 2)), hk=hk, hq=hk * draw(st.integers(1, 3)),
        d=draw(st.integers(1, 16)), dv=draw(st.integers(1, 16)), causal=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bool", "float", "keypad"])),
        inject=draw(st.lists(st.tuples(st.sampled_from(["q", "k", "v"]), st.floats(0, 1),
                                       st.floats(0, 1),
                                       st.sampled_from([math.nan, math.inf, -math.inf])),
                             min_size=1, max_size=2)) if nonfinite else [])


def _build_ring(c: dict[str, Any]):
    """Full (q, k, v), the ring's mask (full [.., S, S] or key padding), the reference's
    mask (causal folded in), dout."""
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    s = c["p"] * c["s_local"]
    q = torch.randn(c["b"], c["hq"], s, c["d"], generator=g, dtype=torch.float64)
    k = torch.randn(c["b"], c["hk"], s, c["d"], generator=g, dtype=torch.float64)
    v = torch.randn(c["b"], c["hk"], s, c["dv"], generator=g, dtype=torch.float64)
    for name, fi, fj, val in c["inject"]:
        t = {"q": q, "k": k, "v": v}[name]
        t[..., min(int(fi * s), s - 1), min(int(fj * t.size(-1)), t.size(-1) - 1)] = val
    dout = torch.randn(c["b"], c["hq"], s, c["dv"], generator=g, dtype=torch.float64)
    mask = None
    if c["mask"] == "bool":
        mask = torch.rand(c["b"], 1, s, s, generator=g) < 0.7
        mask[..., 0, :] = False  # an all-masked row
    elif c["mask"] == "float":
        keep = torch.rand(1, c["hq"], s, s, generator=g) < 0.8
        mask = torch.where(keep, torch.randn(keep.shape, generator=g, dtype=torch.float64),
                           torch.tensor(-math.inf, dtype=torch.float64)).to(dt)
    elif c["mask"] == "keypad":
        mask = (torch.arange(s) < max(1, s - 2)).view(1, 1, 1, s)
    ref_mask = mask
    if c["causal"]:
        tri = torch.ones(s, s, dtype=torch.bool).tril()
        ref_mask = tri if mask is None else (mask & tri if mask.dtype == torch.bool else
                                             mask.masked_fill(~tri, -math.inf))
    return [x.to(dt) for x in (q, k, v)], mask, ref_mask, dout.to(dt)


def _ring_reference(c, xs, ref_mask, dout):
    """(theirs in the dtype via math, float64 reference), each [out, dq, dk, dv]."""
    gqa = c["hq"] != c["hk"]
    results = []
    for dtype in (None, torch.float64):
        ins = _leaves(xs, dtype)
        m = ref_mask
        if m is not None and m.dtype != torch.bool:
            m = m.to(dtype or xs[0].dtype)
        out = sdpa_reference(*ins, attn_mask=m, enable_gqa=gqa,
                             dtype=dtype or xs[0].dtype)
        results.append([out, *torch.autograd.grad(out, ins, dout.to(out.dtype))])
    return results


def _check_simulated_case(c: dict[str, Any], nonfinite: bool) -> None:
    note(f"case = {c!r}")
    xs, mask, ref_mask, dout = _build_ring(c)
    theirs, ref = _ring_reference(c, xs, ref_mask, dout)
    ins = _leaves(xs)
    out = simulated_ring_attention(*ins, world_size=c["p"], layout=c["layout"],
                                   is_causal=c["causal"], attn_mask=mask)
    _compare([out, *torch.autograd.grad(out, ins, dout)], theirs, ref, nonfinite)


@_settings(30)
@given(c=ring_case())
def test_simulated_ring_matches_torch(c: dict[str, Any]) -> None:
    _check_simulated_case(c, nonfinite=False)


@_settings(25)
@given(c=ring_case(nonfinite=True))
def test_simulated_ring_nonfinite_matches_math(c: dict[str, Any]) -> None:
    _check_simulated_case(c, nonfinite=True)


# --- a sample of gloo rings, one spawn ----------------------------------------------------------

def _drawn(strategy: st.SearchStrategy, n: int) -> list:
    """n cases drawn by hypothesis (derandomized: the same every run)."""
    cases: list = []

    @_settings(n)
    @given(strategy)
    def collect(c) -> None:
        cases.append(c)
    collect()
    return cases


def gloo_case_checks(rank: int, world_size: int, cases: list[dict]) -> list[str]:
    failures = []
    for c in cases:
        xs, mask, ref_mask, dout = _build_ring(c)
        theirs, ref = _ring_reference(c, xs, ref_mask, dout)
        pos = global_positions(rank, world_size, c["s_local"], c["layout"])
        local = [x.index_select(2, pos).requires_grad_() for x in xs]
        lmask = None if mask is None or mask.size(2) == 1 else mask.index_select(2, pos)
        lmask = mask if mask is not None and mask.size(2) == 1 else lmask
        out = ring_attn.ring_attention(*local, is_causal=c["causal"], attn_mask=lmask,
                                       layout=c["layout"])
        got = [out, *torch.autograd.grad(out, local, dout.index_select(2, pos))]
        sel = [[t.detach().index_select(2, pos) for t in r] for r in (theirs, ref)]
        try:
            _compare(got, *sel, nonfinite=bool(c["inject"]))
        except AssertionError as e:
            failures.append(f"rank {rank} case {c!r}: {e}")
    return failures


def test_gloo_ring_sample_matches_torch(tmp_path) -> None:
    """8 drawn finite cases and 4 drawn NaN/inf cases on a real gloo ring of 2 ranks."""
    cases = _drawn(ring_case(p=2), 8) + _drawn(ring_case(nonfinite=True, p=2), 4)
    results = assert_all_ok(run_ranks(gloo_case_checks, 2, tmp_path, cases,
                                      pg_timeout_s=60, join_timeout_s=240))
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)
