"""The band (causal, sliding windows) and packed documents (cu_seqlens) at the op level,
ring_attn.ops.attn_fwd / attn_bwd, against torch's SDPA on the same global positions with
the equivalent explicit mask (csrc/common/attn_params.h, "Visibility"):

    vis[i, j] = (not causal or j <= i) and (left < 0 or j >= i - left)
                and (right < 0 or j <= i + right) and doc(i) == doc(j) >= 0

on global positions i, j (offsets or position maps), doc(p) = d with cu[d] <= p < cu[d+1]
(-1 outside every document), computed here by a plain loop over the documents. The
reference is torch's math SDPA in float64 with that mask (and the user's bool or additive
mask); ours must stay within a small multiple of torch's own error in the same dtype
(helpers.assert_close_to_ref). Shapes cross the CPU kernels' tiles (forward 64 x 512,
backward 64 x 128), so whole tiles are skipped, kept in full and masked element-wise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

import ring_attn
from ring_attn import ops
from ring_attn.errors import RingAttnException
from ring_attn.functional import attention
from ring_attn.layout import global_positions
from helpers import assert_close_to_ref, randn, sdpa_reference

Tensor = torch.Tensor
NEG_INF = -math.inf

# lse floors per input dtype (absolute, times max(1, |lse|)): lse has no torch
# counterpart, so it is held to the accumulation dtype's rounding of the scores
# (float32 for float32 and bfloat16 inputs, whose values both sides see rounded alike).
LSE_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5,
             torch.float16: 1e-5}


def documents(pos: Tensor, cu: Optional[Sequence[int]]) -> Tensor:
    """doc(p) = d with cu[d] <= p < cu[d+1], -1 outside every document (a plain loop,
    independent of the kernels' binary search)."""
    doc = torch.full(pos.shape, -1, dtype=torch.int64)
    if cu is not None:
        for d in range(len(cu) - 1):
            doc[(pos >= cu[d]) & (pos < cu[d + 1])] = d
    return doc


def visibility(qp: Tensor, kp: Tensor, causal: bool, window: tuple[int, int],
               cu_q: Optional[Sequence[int]], cu_k: Optional[Sequence[int]]) -> Tensor:
    """The contract's rule as an explicit bool [Sq, Sk] mask on global positions."""
    i, j = qp[:, None], kp[None, :]
    left, right = window
    vis = torch.ones(len(qp), len(kp), dtype=torch.bool)
    if causal:
        vis &= j <= i
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    if cu_q is not None:
        dq, dk = documents(qp, cu_q)[:, None], documents(kp, cu_k)[None, :]
        vis &= (dq == dk) & (dq >= 0)
    return vis


def combined_mask(vis: Tensor, user_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The additive mask in dtype that torch sees: -inf where invisible or where a bool
    user mask is False, plus a float user mask."""
    add = torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, NEG_INF)
    if user_mask is None:
        return add[None, None]
    if user_mask.dtype == torch.bool:
        return torch.where(user_mask.cpu(), add, NEG_INF)
    return add + user_mask.cpu().to(dtype)


def run_ours(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, *, mask=None, q_pos=None,
             k_pos=None, q_offset=0, k_offset=0, causal=False, scale=0.25,
             window=(-1, -1), cu=None, dropout_p=0.0, seed=None, softcap=0.0):
    """ops.attn_fwd + attn_bwd: (out, lse, (dq, dk, dv))."""
    dev = q.device
    cu_q = cu_k = None
    if cu is not None:
        cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=dev) for c in cu)
    q_pos = None if q_pos is None else q_pos.to(dev)
    k_pos = None if k_pos is None else k_pos.to(dev)
    args = (mask, q_pos, k_pos, q_offset, k_offset, causal, scale, dropout_p, seed)
    out, lse = ops.attn_fwd(q, k, v, *args, False, cu_q, cu_k, window[0], window[1], softcap)
    grads = ops.attn_bwd(dout, q, k, v, out, lse, None, *args, False, cu_q, cu_k,
                         window[0], window[1], softcap)
    return out, lse, grads


def torch_sdpa(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, add_mask: Tensor, scale: float,
               dtype: torch.dtype, math_only: bool = False):
    """torch's SDPA in dtype with the explicit additive mask: (out, (dq, dk, dv)), through
    autograd. dtype float64 on CPU is the reference (math backend)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    gqa = q.shape[1] != k.shape[1]
    mask = add_mask.to(device=leaves[0].device, dtype=dtype)
    if math_only:
        out = sdpa_reference(*leaves, attn_mask=mask, scale=scale, enable_gqa=gqa, dtype=dtype)
    else:
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return out.detach(), grads


def reference_lse(q: Tensor, k: Tensor, add_mask: Tensor, scale: float) -> Tensor:
    group = q.shape[1] // k.shape[1]
    s = scale * q.double().cpu() @ k.double().cpu().repeat_interleave(group, 1).transpose(-1, -2)
    return torch.logsumexp(s + add_mask.double(), -1)


def check_case(device: str, dtype: torch.dtype, *, B=1, Hq=2, Hk=2, Sq=700, Sk=700, D=16,
               causal=False, window=(-1, -1), q_offset=0, k_offset=0, q_pos=None, k_pos=None,
               cu=None, mask=None, seed=0, what=""):
    """Ours (out, lse, dq, dk, dv) vs torch's math SDPA in float64 with the explicit mask,
    bounded by torch's own error in dtype (4x for out, 5x for the gradients, as the
    conformance suite). Returns ours and the explicit visibility for extra checks."""
    g = torch.Generator().manual_seed(seed)
    q = randn((B, Hq, Sq, D), dtype, g, device)
    k = randn((B, Hk, Sk, D), dtype, g, device)
    v = randn((B, Hk, Sk, D), dtype, g, device)
    dout = randn((B, Hq, Sq, D), dtype, g, device)
    scale = 1.0 / math.sqrt(D)
    qp = q_pos if q_pos is not None else torch.arange(Sq) + q_offset
    kp = k_pos if k_pos is not None else torch.arange(Sk) + k_offset
    vis = visibility(qp, kp, causal, window, *(cu or (None, None)))
    add64 = combined_mask(vis, mask, torch.float64)
    out, lse, grads = run_ours(q, k, v, dout, mask=None if mask is None else mask.to(device),
                               q_pos=q_pos, k_pos=k_pos, q_offset=q_offset, k_offset=k_offset,
                               causal=causal, scale=scale, window=window, cu=cu)
    r_out, r_grads = torch_sdpa(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), add64, scale,
                                torch.float64, math_only=True)
    if dtype == torch.float64:
        t_out, t_grads = None, (None,) * 3  # the floor alone: float64-exact
    else:
        t_out, t_grads = torch_sdpa(q, k, v, dout, combined_mask(vis, mask, dtype).to(device),
                                    scale, dtype)
        t_out, t_grads = t_out.cpu(), [t.cpu() for t in t_grads]
    tag = f"{what} {dtype} window={window} causal={causal}"
    assert_close_to_ref(out.cpu(), t_out, r_out, factor=4.0, what=f"{tag} out")
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
        assert_close_to_ref(ours.cpu(), theirs, ref, factor=5.0, what=f"{tag} {name}")
    r_lse = reference_lse(q, k, add64, scale)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse)), f"{tag} lse: -inf rows"
    assert_close_to_ref(lse.cpu(), None, r_lse, atol_floor=LSE_FLOOR[dtype], what=f"{tag} lse")
    # Rows that see nothing: out 0, lse -inf, no gradient (ours exactly).
    empty = ~(add64 > NEG_INF).any(-1).expand(lse.shape)
    if empty.any():
        assert torch.all(out.cpu()[empty] == 0) and torch.all(grads[0].cpu()[empty] == 0), tag
    return out, lse, grads, vis


# (left, right, causal): window 0 and 1, shorter than a tile (37 < 64), longer than a
# 150-query shard (300), longer than the sequence (5000); left-only, both sides,
# right-only; with causal (whose right bound 0 the host intersects with window_right).
WINDOWS = [(0, -1, True), (1, -1, True), (0, 0, False), (1, 1, False), (37, -1, True),
           (37, 37, False), (-1, 20, False), (300, -1, True), (5000, 5000, False),
           (100, 3, True), (-1, -1, True), (600, 100, False)]


def _check_band(device: str) -> None:
    for left, right, causal in WINDOWS:
        # Self-attention over two forward key blocks, then a 150-query shard at the end
        # of a 1100-key sequence (queries see keys 512 positions back: skipped tiles).
        check_case(device, torch.float32, causal=causal, window=(left, right), Sq=700, Sk=700)
        check_case(device, torch.float32, causal=causal, window=(left, right), Sq=150,
                   Sk=1100, q_offset=950, Hq=4, Hk=2, seed=1)


def test_band_cpu():
    _check_band("cpu")


@pytest.mark.cuda
def test_band_cuda():
    _check_band("cuda")


def _check_band_dtypes(device: str) -> None:
    for dtype in (torch.bfloat16, torch.float64):
        for left, right, causal in [(0, -1, True), (37, 37, False), (300, -1, True),
                                    (-1, 20, False)]:
            check_case(device, dtype, causal=causal, window=(left, right), Sq=150, Sk=1100,
                       q_offset=950, Hq=4, Hk=2, seed=2)


def test_band_dtypes_cpu():
    _check_band_dtypes("cpu")


@pytest.mark.cuda
def test_band_dtypes_cuda():
    _check_band_dtypes("cuda")


def _check_band_with_masks(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    bmask = torch.rand((1, 2, 300, 600), generator=g) < 0.8
    bmask[:, :, 7] = False  # a row the mask empties
    fmask = torch.randn((1, 1, 1, 600), generator=g, dtype=torch.float64)
    fmask = fmask.masked_fill(torch.rand((1, 1, 1, 600), generator=g) > 0.8, NEG_INF)
    for dtype in (torch.float32, torch.float64):
        for mask in (bmask, fmask.to(dtype)):
            for causal, window in ((True, (90, -1)), (False, (40, 10))):
                check_case(device, dtype, Sq=300, Sk=600, q_offset=300, mask=mask,
                           causal=causal, window=window, seed=4, what="masked")
            check_case(device, dtype, Sq=300, Sk=600, q_offset=300, mask=mask, causal=True,
                       cu=([0, 250, 251, 600], [0, 250, 251, 600]), seed=5, what="masked docs")


def test_band_with_masks_cpu():
    _check_band_with_masks("cpu")


@pytest.mark.cuda
def test_band_with_masks_cuda():
    _check_band_with_masks("cuda")


def _check_position_maps(device: str) -> None:
    # A zigzag shard (rank 1 of 4: positions 140..279 and 980..1119 of S = 1120) against
    # the keys of another rank's shard and against every key; and an offset block.
    q_pos = global_positions(1, 4, 280, "zigzag")
    k_other = global_positions(3, 4, 280, "zigzag")
    k_all = torch.arange(1120)
    for window, causal in (((64, -1), True), ((200, 50), False), ((0, -1), True)):
        check_case(device, torch.float32, Sq=280, Sk=280, q_pos=q_pos, k_pos=k_other,
                   causal=causal, window=window, Hq=4, Hk=2, what="zigzag vs shard")
        check_case(device, torch.float32, Sq=280, Sk=1120, q_pos=q_pos, k_pos=k_all,
                   causal=causal, window=window, what="zigzag vs all")
        check_case(device, torch.float32, Sq=130, Sk=600, q_offset=1000, k_offset=500,
                   causal=causal, window=window, what="offsets")


def test_position_maps_cpu():
    _check_position_maps("cpu")


@pytest.mark.cuda
def test_position_maps_cuda():
    _check_position_maps("cuda")


# Documents of 700 packed tokens: an empty first document (0, 0), 1-token documents
# (0..1, 150..151 after an empty one), and tokens 650..699 in no document (doc -1).
DOCS = [0, 0, 1, 150, 150, 151, 400, 650]


def _check_documents(device: str) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (60, -1)),
                               (False, (30, 5))):
            out, lse, grads, vis = check_case(device, dtype, Sq=700, Sk=700, causal=causal,
                                              window=window, cu=(DOCS, DOCS), Hq=4, Hk=2,
                                              what="documents")
            # Positions in no document: out 0, lse -inf, dq 0; and no key there gets a
            # gradient (it is seen by nothing).
            assert torch.all(out[:, :, 650:] == 0) and torch.all(torch.isneginf(lse[:, :, 650:]))
            assert torch.all(grads[1][:, :, 650:] == 0) and torch.all(grads[2][:, :, 650:] == 0)
            assert torch.all(torch.isfinite(lse[:, :, :650])), "every other row sees itself"
    # Queries and keys with their own boundaries (a query block at offset 200 against
    # all keys; document d of the queries meets document d of the keys), and documents
    # with a position map.
    check_case(device, torch.float32, Sq=300, Sk=700, q_offset=200,
               cu=([0, 150, 420, 500, 700], [0, 300, 310, 650, 700]), what="cu_q != cu_k")
    q_pos = global_positions(0, 2, 350, "zigzag")
    check_case(device, torch.float32, Sq=350, Sk=700, q_pos=q_pos, causal=True,
               window=(100, -1), cu=(DOCS, DOCS), what="documents zigzag")


def test_documents_cpu():
    _check_documents("cpu")


@pytest.mark.cuda
def test_documents_cuda():
    _check_documents("cuda")


def _check_dropout_keyed_by_positions(device: str) -> None:
    """The dropout RNG is keyed by global positions, so a window or documents must drop
    exactly the elements the explicit band, given as a bool mask, drops with the same
    seed: same out, lse and gradients up to float rounding."""
    g = torch.Generator().manual_seed(6)
    B, H, Sq, Sk, D = 1, 2, 200, 700, 16
    q, k, v, dout = (randn(s, torch.float32, g, device) for s in
                     ((B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D), (B, H, Sq, D)))
    seed = torch.tensor(1234567, dtype=torch.int64)
    qp, kp = torch.arange(Sq) + 500, torch.arange(Sk)
    for causal, window, cu in ((True, (100, -1), None), (False, (50, 20), None),
                               (True, (-1, -1), (DOCS, DOCS)), (False, (300, 0), (DOCS, DOCS))):
        ours = run_ours(q, k, v, dout, q_offset=500, causal=causal, window=window, cu=cu,
                        dropout_p=0.3, seed=seed)
        vis = visibility(qp, kp, causal, window, *(cu or (None, None)))
        explicit = run_ours(q, k, v, dout, q_offset=500, mask=vis[None, None].to(device),
                            dropout_p=0.3, seed=seed)
        no_dropout = run_ours(q, k, v, dout, q_offset=500, mask=vis[None, None].to(device))
        tag = f"dropout causal={causal} window={window} docs={cu is not None}"
        for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"),
                                 (ours[0], ours[1], *ours[2]),
                                 (explicit[0], explicit[1], *explicit[2]),
                                 (no_dropout[0], no_dropout[1], *no_dropout[2])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{tag} {name}")
            if name != "lse":  # lse is that of the un-dropped softmax
                assert not torch.allclose(a, c), f"{tag} {name}: dropout had no effect"


def test_dropout_keyed_by_positions_cpu():
    _check_dropout_keyed_by_positions("cpu")


@pytest.mark.cuda
def test_dropout_keyed_by_positions_cuda():
    _check_dropout_keyed_by_positions("cuda")


def _assert_same_nonfinite(ours: Tensor, ref: Tensor, what: str, atol: float) -> None:
    """NaN and infinities exactly where the reference has them; finite values close."""
    ours, ref = ours.detach().cpu().double(), ref.detach().double()
    assert torch.equal(ours.isnan(), ref.isnan()), (
        f"{what}: NaN at {int((ours.isnan() & ~ref.isnan()).sum())} extra and "
        f"{int((ref.isnan() & ~ours.isnan()).sum())} missing positions")
    assert torch.equal(ours.isinf(), ref.isinf()), f"{what}: infinities differ"
    fin = torch.isfinite(ref)
    if fin.any():
        err = (ours[fin] - ref[fin]).abs().max().item()
        assert err <= atol, f"{what}: finite values differ by {err:.3g} > {atol}"


def _check_nonfinite_outside(device: str) -> None:
    """A NaN in a key, or an inf in a value, that no query may see (outside every window,
    or in no document) still reaches the result exactly as in torch's math backend with
    the explicit additive mask: NaN + -inf = NaN in the scores and 0 * inf = NaN in P V.
    The non-finite flag turns tile skipping off; without it the tiles holding that key
    would be skipped and the result would be finite."""
    Sq, Sk, D = 150, 1100, 16
    cases = [  # (what, window, causal, cu, tensor, index, value)
        ("NaN key before every window", (40, -1), True, None, "k", (0, 1, 100, 3), math.nan),
        ("inf value before every window", (40, 0), False, None, "v", (0, 0, 30, 5), math.inf),
        ("NaN key in no document", (-1, -1), False, ([0, 500, 1050], [0, 500, 1050]), "k",
         (0, 0, 1070, 0), math.nan),
        ("NaN value in another document", (-1, -1), True, ([0, 500, 1100], [0, 500, 1100]),
         "v", (0, 1, 20, 2), math.nan),
    ]
    for dtype in (torch.float32, torch.float64):
        for what, window, causal, cu, name, index, value in cases:
            g = torch.Generator().manual_seed(7)
            t = {"q": randn((1, 2, Sq, D), dtype, g), "k": randn((1, 2, Sk, D), dtype, g),
                 "v": randn((1, 2, Sk, D), dtype, g)}
            dout = randn((1, 2, Sq, D), dtype, g)
            t[name][index] = value
            qp, kp = torch.arange(Sq) + 950, torch.arange(Sk)
            add64 = combined_mask(visibility(qp, kp, causal, window, *(cu or (None, None))),
                                  None, torch.float64)
            out, lse, grads = run_ours(*(t[x].to(device) for x in "qkv"), dout.to(device),
                                       q_offset=950, causal=causal, window=window, cu=cu)
            r_out, r_grads = torch_sdpa(t["q"], t["k"], t["v"], dout, add64, 0.25,
                                        torch.float64, math_only=True)
            atol = 1e-10 if dtype == torch.float64 else 2e-4
            tag = f"{dtype} {what}"
            assert r_out.isnan().any(), f"{tag}: the case must reach the reference"
            _assert_same_nonfinite(out, r_out, f"{tag} out", atol)
            for n, ours, ref in zip(("dq", "dk", "dv"), grads, r_grads):
                _assert_same_nonfinite(ours, ref, f"{tag} {n}", atol)


def test_nonfinite_outside_cpu():
    _check_nonfinite_outside("cpu")


@pytest.mark.cuda
def test_nonfinite_outside_cuda():
    _check_nonfinite_outside("cuda")


# ---------------------------------------------------------------------------------------
# ring_attn.attention: the one-device entry with window= and softcap= (functional.py).
def _check_attention_api(device: str) -> None:
    """attention(..., window=...) through autograd against torch's SDPA with the explicit
    band mask (top-left aligned positions, as is_causal), in float64 and in dtype."""
    B, Hq, Hk, D = 2, 4, 2, 32
    g = torch.Generator().manual_seed(12)
    pad = torch.ones(B, 1, 1, 300, dtype=torch.bool)
    pad[1, ..., 250:] = False  # the second sequence's last 50 keys are padding
    cases = [  # (L, S, is_causal, window, mask)
        (300, 300, False, (64, 0), None), (300, 300, True, (100, -1), None),
        (300, 300, False, (30, 30), None), (300, 300, False, (50, 0), pad),
        (100, 300, False, (20, 20), None), (100, 300, True, (0, -1), None),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for L, S, causal, window, mask in cases if dtype == torch.float32 else cases[3:5]:
            q = randn((B, Hq, L, D), dtype, g, device)
            k, v = (randn((B, Hk, S, D), dtype, g, device) for _ in range(2))
            dout = randn((B, Hq, L, D), dtype, g, device)
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, is_causal=causal, window=window,
                                      attn_mask=None if mask is None else mask.to(device),
                                      enable_gqa=True)
            grads = torch.autograd.grad(out, leaves, dout)
            vis = visibility(torch.arange(L), torch.arange(S), causal, window, None, None)
            scale = 1.0 / math.sqrt(D)
            r_out, r_grads = torch_sdpa(q.cpu(), k.cpu(), v.cpu(), dout.cpu(),
                                        combined_mask(vis, mask, torch.float64), scale,
                                        torch.float64, math_only=True)
            t_out, t_grads = (None, (None,) * 3)
            if dtype != torch.float64:
                t_out, t_grads = torch_sdpa(q, k, v, dout,
                                            combined_mask(vis, mask, dtype).to(device), scale,
                                            dtype)
                t_out, t_grads = t_out.cpu(), [t.cpu() for t in t_grads]
            tag = f"attention {dtype} L={L} S={S} causal={causal} window={window}"
            assert out.dtype == dtype and out.shape == (B, Hq, L, D), tag
            assert_close_to_ref(out.detach().cpu(), t_out, r_out, factor=4.0, what=f"{tag} out")
            for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
                assert_close_to_ref(ours.cpu(), theirs, ref, factor=5.0, what=f"{tag} {name}")
    # No window is scaled_dot_product_attention, bit for bit; 3-D inputs broadcast as there.
    q, k, v = (randn((2, 70, 16), torch.float32, g, device) for _ in range(3))
    sdpa = ring_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    for window in (None, (-1, -1), (-1, 0), [-1, 5]):
        out = attention(q, k, v, is_causal=True, window=window)
        assert out.shape == (2, 70, 16) and torch.equal(out, sdpa), window


def test_attention_api_cpu():
    _check_attention_api("cpu")


@pytest.mark.cuda
def test_attention_api_cuda():
    _check_attention_api("cuda")


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(window=5), TypeError, "window must be None or a pair of ints"),
    (dict(window=(3,)), TypeError, "window must be None or a pair of ints"),
    (dict(window=(3, 0, 1)), TypeError, "window must be None or a pair of ints"),
    (dict(window=(3.0, 0)), TypeError, "window must be None or a pair of ints"),
    (dict(window=(True, 0)), TypeError, "window must be None or a pair of ints"),
    (dict(window="3,0"), TypeError, "window must be None or a pair of ints"),
    (dict(window=(-2, 0)), RuntimeError, "window left bound must be >= 0, or -1"),
    (dict(window=(4, -5)), RuntimeError, "window right bound must be >= 0, or -1"),
    (dict(softcap=-1.0), RuntimeError, "softcap must be finite and > 0"),
    (dict(softcap=math.nan), RuntimeError, "softcap must be finite and > 0"),
    (dict(softcap=math.inf), RuntimeError, "softcap must be finite and > 0"),
    (dict(softcap="30"), TypeError, "softcap must be a float or None"),
    (dict(softcap=True), TypeError, "softcap must be a float or None"),
    (dict(is_causal=1), TypeError, "is_causal must be bool"),
])
def test_attention_errors(kwargs, exc, words):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(exc, match=words) as info:
        attention(q, q, q, **kwargs)
    assert isinstance(info.value, RingAttnException)
    with pytest.raises(TypeError):  # everything after value is keyword-only
        attention(q, q, q, True)
