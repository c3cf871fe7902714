"""ring_attn.varlen_attention (packed documents, flash-attn's varlen interface) against
torch's SDPA run document by document in float64, with torch's own error in the same
dtype as the yardstick; dropout against the independent model of the mask (helpers);
cu_seqlens_from_position_ids; and every bad input named in issue 10."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import ring_attn
from ring_attn.documents import cu_seqlens_from_position_ids
from ring_attn.errors import RingAttnError
from ring_attn.functional import draw_seed
from ring_attn.varlen import varlen_attention
from helpers import assert_close_to_ref, dropout_keep_mask, randn, sdpa_reference

pytestmark = pytest.mark.filterwarnings("ignore:Dropout mask should only be used")

Tensor = torch.Tensor


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cu(lengths: list[int], device: str = "cpu", dtype=torch.int32) -> Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0)),
                        dtype=dtype, device=device)


def _doc_mask(lq: int, lk: int, is_causal: bool) -> Optional[Tensor]:
    """Bottom-right causal (flash-attn): query i sees keys j <= i + lk - lq."""
    return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if is_causal else None


def _per_document(q: Tensor, k: Tensor, v: Tensor, lq: list[int], lk: list[int],
                  is_causal: bool, scale: Optional[float], dtype: Optional[torch.dtype]
                  ) -> Tensor:
    """The independent reference: attention of each document on its own, [Tq, Hq, Dv].
    dtype None: torch's public SDPA in the inputs' dtype ("theirs"); else torch's math
    SDPA in `dtype`. A query with no visible key gives 0 (the public SDPA's convention)."""
    outs, a, b = [], 0, 0
    hq = q.shape[1]
    for nq, nk in zip(lq, lk):
        qd, kd, vd = (t.transpose(0, 1) for t in (q[a:a + nq], k[b:b + nk], v[b:b + nk]))
        a, b = a + nq, b + nk
        if nq == 0:
            continue
        if nk == 0:
            outs.append(q.new_zeros((nq, hq, v.shape[2]), dtype=dtype or q.dtype))
            continue
        mask = _doc_mask(nq, nk, is_causal)
        if dtype is None:
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        else:
            o = sdpa_reference(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True,
                               dtype=dtype)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros((0, hq, v.shape[2]), dtype=dtype or q.dtype)


def _random_lengths(g: torch.Generator, n: int, hi: int) -> list[int]:
    """n lengths in [0, hi], with 1-token and empty documents forced in."""
    ls = torch.randint(0, hi + 1, (n,), generator=g).tolist()
    ls[0], ls[n // 2] = 1, 0
    return ls


def _check_against_per_document(device: str, dtype: torch.dtype, lq: list[int],
                                 lk: list[int], is_causal: bool, hq: int = 4, hk: int = 2,
                                 d: int = 16, scale: Optional[float] = None) -> None:
    g = _gen(sum(lq) * 31 + sum(lk) + int(is_causal))
    q = randn((sum(lq), hq, d), dtype, g, device).requires_grad_()
    k = randn((sum(lk), hk, d), dtype, g, device).requires_grad_()
    v = randn((sum(lk), hk, d), dtype, g, device).requires_grad_()
    dout = randn((sum(lq), hq, d), dtype, g, device)
    out = varlen_attention(q, k, v, _cu(lq, device), _cu(lk, device, torch.int64),
                           max(lq), max(lk), is_causal=is_causal, scale=scale)
    assert out.shape == (sum(lq), hq, d) and out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # The float64 reference differentiates float64 leaves: gradients of the bf16 leaves
    # themselves would come back rounded to bf16 (torch 2.11's math SDPA then matched them
    # bit for bit and made "torch's error" 0).
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _per_document(*x64, lq, lk, is_causal, scale, torch.float64)
    ref_grads = torch.autograd.grad(ref, x64, dout.double())
    theirs = _per_document(q, k, v, lq, lk, is_causal, scale, None)
    their_grads = torch.autograd.grad(theirs, (q, k, v), dout)
    assert_close_to_ref(out, theirs, ref)
    for name, ours, th, rf in zip("qkv", grads, their_grads, ref_grads):
        assert_close_to_ref(ours, th, rf, what=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention_random_mixes_cpu(dtype: torch.dtype, is_causal: bool) -> None:
    # Documents longer than the kernels' 64-row / 512-key tiles, 1-token and empty ones,
    # so skipped, full and straddling tiles all occur.
    for seed in range(2):
        ls = _random_lengths(_gen(seed), 9, 150) + [600]
        _check_against_per_document("cpu", dtype, ls, ls, is_causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_attention_random_mixes_cuda(dtype: torch.dtype) -> None:
    ls = _random_lengths(_gen(0), 9, 150) + [600]
    for is_causal in (False, True):
        _check_against_per_document("cuda", dtype, ls, ls, is_causal)


def _check_cross_lengths(device: str) -> None:
    """Different query and key lengths per document (and an empty key document): causal
    is bottom-right, the first Lq - Lk queries of a document with Lq > Lk give 0."""
    lq, lk = [3, 0, 5, 1, 7, 70, 2], [5, 2, 2, 1, 7, 9, 0]
    for is_causal in (False, True):
        _check_against_per_document(device, torch.float64, lq, lk, is_causal)
        _check_against_per_document(device, torch.float32, lq, lk, is_causal, hq=3, hk=3,
                                    scale=0.3)


def test_cross_lengths_bottom_right_cpu() -> None:
    _check_cross_lengths("cpu")


@pytest.mark.cuda
def test_cross_lengths_bottom_right_cuda() -> None:
    _check_cross_lengths("cuda")


def test_bottom_right_rows_without_keys_are_zero() -> None:
    """The property itself, not through the reference: in a document of 5 queries and 2
    keys, queries 0..2 see no key (out exactly 0, gradient 0) and query 4 sees both."""
    g = _gen(7)
    q = randn((5, 1, 8), torch.float64, g).requires_grad_()
    k, v = randn((2, 1, 8), torch.float64, g), randn((2, 1, 8), torch.float64, g)
    out = varlen_attention(q, k, v, _cu([5]), _cu([2]), is_causal=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.allclose(out[3], v[0]) and not torch.allclose(out[4], v[0])
    out.sum().backward()
    assert torch.equal(q.grad[:3], torch.zeros_like(q.grad[:3]))


def test_fp16_and_head_dims_cpu() -> None:
    ls = [33, 1, 0, 70]
    _check_against_per_document("cpu", torch.float16, ls, ls, True, hq=2, hk=1, d=64)
    _check_against_per_document("cpu", torch.float32, ls, ls, True, hq=2, hk=2, d=7)


def test_matches_one_call_with_block_diagonal_mask() -> None:
    """The same kernel given the explicit block-diagonal (and causal) mask: equal outputs
    (the documents only let the kernel skip tiles that mask would zero anyway), with and
    without dropout under the same torch.manual_seed (the same seed, the same positions)."""
    ls = [40, 1, 0, 200, 3, 90]
    g = _gen(3)
    q, k, v = (randn((sum(ls), 4, 32), torch.float32, g) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))
    block = doc[:, None] == doc[None, :]
    for is_causal in (False, True):
        for p in (0.0, 0.25):
            mask = block & torch.ones_like(block).tril() if is_causal else block
            torch.manual_seed(9)
            want = ring_attn.scaled_dot_product_attention(
                *(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask,
                dropout_p=p).transpose(0, 1)
            torch.manual_seed(9)
            got = varlen_attention(q, k, v, _cu(ls), _cu(ls), is_causal=is_causal,
                                   dropout_p=p)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _check_dropout(device: str) -> None:
    """The kept elements are exactly those of the mask the contract defines (modelled
    independently in helpers), at packed-sequence positions; same seed, same output."""
    ls, p, hq, hk = [20, 1, 0, 45], 0.3, 4, 2
    g = _gen(11)
    q = randn((sum(ls), hq, 16), torch.float64, g, device)
    k, v = (randn((sum(ls), hk, 16), torch.float64, g, device) for _ in range(2))
    cu = _cu(ls, device)
    for is_causal in (False, True):
        torch.manual_seed(123)
        seed = int(draw_seed())
        torch.manual_seed(123)
        out = varlen_attention(q, k, v, cu, cu, is_causal=is_causal, dropout_p=p)
        torch.manual_seed(123)
        assert torch.equal(out, varlen_attention(q, k, v, cu, cu, is_causal=is_causal,
                                                 dropout_p=p))
        t = sum(ls)
        keep = dropout_keep_mask(seed, 1, hq, range(t), range(t), p).to(device)
        doc = torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)).to(device)
        vis = doc[:, None] == doc[None, :]
        if is_causal:
            vis &= torch.ones_like(vis).tril()
        ref = sdpa_reference(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
                             attn_mask=vis, dropout_p=p, enable_gqa=True, dropout_mask=keep)
        assert_close_to_ref(out, None, ref[0].transpose(0, 1))


def test_dropout_cpu() -> None:
    _check_dropout("cpu")


@pytest.mark.cuda
def test_dropout_cuda() -> None:
    _check_dropout("cuda")


def test_empty_pack_and_max_seqlen() -> None:
    q = torch.randn(0, 2, 8)
    out = varlen_attention(q, q, q, _cu([]), _cu([]), 0, 0, is_causal=True)
    assert out.shape == (0, 2, 8)
    q = torch.randn(10, 2, 8)
    cu = _cu([4, 6])
    torch.testing.assert_close(varlen_attention(q, q, q, cu, cu, 6, 100),
                               varlen_attention(q, q, q, cu, cu))


def _bad(call, exc, *needles: str) -> None:
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_bad_inputs() -> None:
    q = torch.randn(10, 4, 8)
    k = torch.randn(10, 2, 8)
    cu = _cu([4, 6])

    def call(cu_q=cu, cu_k=cu, **kw):
        args = dict(q=q, k=k, v=k)
        args.update({n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
        return varlen_attention(args["q"], args["k"], args["v"], cu_q, cu_k, **kw)

    _bad(lambda: call(cu_q=cu.view(1, -1)), RuntimeError, "cu_seqlens_q", "1-D", "(1, 3)")
    _bad(lambda: call(cu_k=cu.float()), RuntimeError, "cu_seqlens_k", "int32 or int64",
         "torch.float32")
    _bad(lambda: call(cu_q=torch.tensor([0, 7, 4, 10])), RuntimeError, "cu_seqlens_q",
         "non-decreasing", "7", "4")
    _bad(lambda: call(cu_k=torch.tensor([1, 4, 10])), RuntimeError, "cu_seqlens_k",
         "start at 0", "1")
    _bad(lambda: call(cu_q=torch.tensor([0, 4, 9])), RuntimeError, "cu_seqlens_q",
         "token count 10", "9")
    _bad(lambda: call(cu_q=[0, 4, 10]), TypeError, "cu_seqlens_q", "Tensor", "list")
    _bad(lambda: call(cu_k=torch.tensor([0, 10])), RuntimeError, "same number of documents",
         "2", "1")
    _bad(lambda: call(cu_q=cu.to("meta")), RuntimeError, "cu_seqlens_q", "device", "meta")
    _bad(lambda: call(max_seqlen_q=5), RuntimeError, "max_seqlen_q", ">= the longest", "6",
         "5")
    _bad(lambda: call(max_seqlen_k=6.0), TypeError, "max_seqlen_k", "int", "float")
    _bad(lambda: call(q=q.unsqueeze(0)), RuntimeError, "q must be 3-D", "(1, 10, 4, 8)")
    _bad(lambda: call(q=torch.randn(10, 3, 8)), RuntimeError, "q heads (3)",
         "k/v heads (2)")
    _bad(lambda: call(k=k.double(), v=k.double()), RuntimeError, "share one dtype",
         "torch.float64")
    _bad(lambda: call(q=q.int(), k=k.int(), v=k.int()), RuntimeError, "torch.int32")
    _bad(lambda: call(v=torch.randn(9, 2, 8)), RuntimeError, "k and v", "(9, 2)")
    _bad(lambda: call(is_causal=1), TypeError, "is_causal", "bool")
    _bad(lambda: call(dropout_p=1.0), RuntimeError, "dropout_p", "[0, 1)")
    _bad(lambda: call(scale=float("nan")), RuntimeError, "scale", "finite")
    for c in (lambda: call(cu_q=cu.float()), lambda: call(max_seqlen_q=1)):
        with pytest.raises(RingAttnError):
            c()


@pytest.mark.cuda
def test_cu_seqlens_on_another_device_cuda() -> None:
    q = torch.randn(10, 2, 8, device="cuda")
    _bad(lambda: varlen_attention(q, q, q, _cu([4, 6]), _cu([4, 6], "cuda")), RuntimeError,
         "cu_seqlens_q", "cuda", "cpu")


def test_cu_seqlens_from_position_ids() -> None:
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 0])
    for p in (pos, pos.view(1, -1), pos.int()):
        got = cu_seqlens_from_position_ids(p)
        assert got.dtype == torch.int32 and got.tolist() == [0, 3, 4, 8, 9]
    # A row that starts mid-document is one document up to the first restart.
    assert cu_seqlens_from_position_ids(torch.tensor([5, 6, 0, 1])).tolist() == [0, 2, 4]
    assert cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)).tolist() == [0]
    # The round trip with the positions a packing collator builds from lengths.
    ls = [3, 1, 7, 1, 1, 12]
    pos = torch.cat([torch.arange(n) for n in ls])
    assert cu_seqlens_from_position_ids(pos).tolist() == _cu(ls).tolist()
    _bad(lambda: cu_seqlens_from_position_ids(pos[:24].view(2, -1)), RuntimeError,
         "position_ids", "[1, T]", "(2, 12)")
    _bad(lambda: cu_seqlens_from_position_ids(torch.tensor([0, 1, 2, 1, 2])), RuntimeError,
         "position_ids[2] = 2", "position_ids[3] = 1")
    _bad(lambda: cu_seqlens_from_position_ids(torch.tensor([0, -1])), RuntimeError,
         "position_ids[1] = -1")
    _bad(lambda: cu_seqlens_from_position_ids(pos.float()), RuntimeError, "integer",
         "torch.float32")
    _bad(lambda: cu_seqlens_from_position_ids([0, 1]), TypeError, "Tensor")


def test_position_ids_drive_varlen() -> None:
    """HF-style packing end to end: position_ids -> cu_seqlens -> varlen_attention equals
    causal attention of each document alone."""
    ls = [5, 1, 17]
    pos = torch.cat([torch.arange(n) for n in ls]).view(1, -1)
    cu = cu_seqlens_from_position_ids(pos)
    g = _gen(5)
    q, k, v = (randn((sum(ls), 2, 8), torch.float64, g) for _ in range(3))
    out = varlen_attention(q, k, v, cu, cu, is_causal=True)
    assert_close_to_ref(out, None, _per_document(q, k, v, ls, ls, True, None, torch.float64))
