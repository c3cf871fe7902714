"""Dropout: reproducibility under torch.manual_seed, unbiasedness (the mean over many
masks converges to the dropout-free output within a bound derived from the variance),
the drop rate and the 1/(1-p) scaling, exactness against torch's math SDPA given the mask
the contract defines (csrc/common/dropout_rng.h, modelled independently in helpers), the
gradient's consistency with the forward's mask, and invariance of the mask to how the
query rows are split (what the ring relies on)."""
from __future__ import annotations

import math

import pytest
import torch

import ring_attn
from ring_attn import ops
from ring_attn.functional import draw_seed
from helpers import assert_close_to_ref, dropout_keep_mask, randn, sdpa_reference

pytestmark = pytest.mark.filterwarnings("ignore:Dropout mask should only be used")

Tensor = torch.Tensor
sdpa = ring_attn.scaled_dot_product_attention


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bonferroni_z(n: int, false_alarm: float = 1e-6) -> float:
    """|z| a standard normal exceeds with probability false_alarm / n (two-sided)."""
    return float(-torch.special.ndtri(torch.tensor(false_alarm / (2 * n), dtype=torch.float64)))


def _check_seeding(device: str) -> None:
    q, k, v = (randn((2, 3, 20, 16), torch.float32, _gen(i), device) for i in range(3))
    torch.manual_seed(5)
    a = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(5)
    b = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(6)
    c = sdpa(q, k, v, dropout_p=0.4)
    d = sdpa(q, k, v, dropout_p=0.4)  # next draw of the same generator
    plain = sdpa(q, k, v)
    assert torch.equal(a, b), "same torch.manual_seed must give the same output"
    assert not torch.equal(a, c) and not torch.equal(c, d), "new seeds must give new masks"
    # Dropout applies whenever dropout_p > 0 (there is no training flag), even tiny p
    # drops some of 2*3*20*20 elements: P(no drop at p=0.01) = 0.99^2400 < 1e-10.
    assert not torch.equal(a, plain)
    assert not torch.equal(sdpa(q, k, v, dropout_p=0.01), plain)


def test_seeding_cpu() -> None:
    _check_seeding("cpu")


@pytest.mark.cuda
def test_seeding_cuda() -> None:
    _check_seeding("cuda")


def _check_unbiased(device: str, p: float, is_causal: bool) -> None:
    """E[out] = out without dropout, since kept probabilities are scaled by 1/(1-p).
    Each of the N samples is one batch entry (the mask is keyed by batch index) of one of
    several seeds; Var[out_id] = p/(1-p) * sum_j P_ij^2 v_jd^2 from the float64 P."""
    H, L, S, E = 2, 12, 64, 16
    g = _gen(3)
    q1, k1, v1 = (torch.randn((1, H, n, E), generator=g, dtype=torch.float64)
                  for n in (L, S, S))
    per_call, seeds = 512, 4
    n_samples = per_call * seeds
    total = torch.zeros((H, L, E), dtype=torch.float64)
    for s in range(seeds):
        torch.manual_seed(100 + s)
        out = sdpa(*(t.to(device, torch.float32).expand(per_call, H, -1, -1)
                     for t in (q1, k1, v1)), dropout_p=p, is_causal=is_causal)
        total += out.double().sum(0).cpu()
    mean = total / n_samples
    ref = sdpa_reference(q1, k1, v1, is_causal=is_causal)[0]
    scores = (q1 @ k1.transpose(-1, -2))[0] / math.sqrt(E)
    if is_causal:
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -math.inf)
    probs = torch.softmax(scores, -1)
    var = p / (1 - p) * (probs ** 2) @ (v1[0] ** 2)
    se = (var / n_samples).sqrt()
    z_max = _bonferroni_z(mean.numel())
    z = ((mean - ref) / se).abs()
    assert float(z.max()) < z_max, (
        f"mean over {n_samples} dropout masks deviates by {float(z.max()):.2f} standard "
        f"errors (bound {z_max:.2f})")
    # The bound can fail: a missing 1/(1-p) rescale would be detected.
    z_unscaled = ((mean * (1 - p) - ref) / se).abs()
    assert float(z_unscaled.max()) > z_max


@pytest.mark.parametrize("p,is_causal", [(0.1, False), (0.5, True), (0.8, False)])
def test_unbiased_cpu(p: float, is_causal: bool) -> None:
    _check_unbiased("cpu", p, is_causal)


@pytest.mark.cuda
@pytest.mark.parametrize("p,is_causal", [(0.1, False), (0.5, True), (0.8, False)])
def test_unbiased_cuda(p: float, is_causal: bool) -> None:
    _check_unbiased("cuda", p, is_causal)


def _check_drop_rate(device: str, p: float, dtype: torch.dtype) -> None:
    """q = 0 makes attention uniform (P = 1/S) and v = I exposes each element:
    out[..., i, j] = keep_ij / ((1 - p) S). Values must be exactly 0 or the scaled
    1/((1-p) S) (with the exact p: float64 must not see p rounded to float32, which is off
    by up to 2^-24 relative), and the dropped fraction ~ p within 6 binomial standard
    deviations."""
    B, H, L, S = 4, 3, 40, 48
    q = torch.zeros((B, H, L, 8), dtype=dtype, device=device)
    k = randn((B, H, S, 8), dtype, _gen(1), device)
    v = torch.eye(S, dtype=dtype, device=device).expand(B, H, S, S)
    torch.manual_seed(11)
    out = sdpa(q, k, v, dropout_p=p).double().cpu()
    kept_value = 1.0 / ((1 - p) * S)
    kept = out > 0.5 * kept_value
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2) * kept_value
    err = float((out - kept_value).abs()[kept].max())
    assert err <= tol, f"kept values must be scaled by exactly 1/(1-p): off by {err:.2e}"
    assert bool((out[~kept] == 0).all()), "dropped values must be exactly 0"
    n = out.numel()
    frac = 1.0 - float(kept.double().mean())
    assert abs(frac - p) <= 6 * math.sqrt(p * (1 - p) / n), f"dropped {frac:.4f}, p = {p}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_drop_rate_cpu(p: float, dtype: torch.dtype) -> None:
    _check_drop_rate("cpu", p, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_drop_rate_cuda(p: float, dtype: torch.dtype) -> None:
    _check_drop_rate("cuda", p, dtype)


def _check_exact_mask(device: str, dtype: torch.dtype, hq: int, hk: int,
                      is_causal: bool) -> None:
    """attn_fwd/attn_bwd with an explicit seed equal torch's math SDPA given the keep mask
    the contract defines, forward and gradients (the backward regenerates the forward's
    mask). Error scale: torch's math SDPA with that mask in the same dtype."""
    B, L, S, E, p = 2, 19, 33, 16, 0.35
    seed = 0x1234_5678_9ABC
    g = _gen(4)
    q = randn((B, hq, L, E), dtype, g, device)
    k = randn((B, hk, S, E), dtype, g, device)
    v = randn((B, hk, S, 24), dtype, g, device)
    scale = 1 / math.sqrt(E)
    kw = dict(is_causal=is_causal, scale=scale, dropout_p=p,
              seed=torch.tensor(seed, dtype=torch.int64, device=device))
    out, lse = ops.attn_fwd(q, k, v, **kw)
    dout = randn(out.shape, dtype, g, device)
    grads = ops.attn_bwd(dout, q, k, v, out, lse, None, **kw)
    keep = dropout_keep_mask(seed, B, hq, range(L), range(S), p).to(device)

    def math_sdpa(cast: torch.dtype) -> tuple[Tensor, tuple[Tensor, ...]]:
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o = sdpa_reference(*leaves, dropout_p=p, is_causal=is_causal, scale=scale,
                           enable_gqa=hq != hk, dropout_mask=keep, dtype=cast)
        return o, torch.autograd.grad(o, leaves, dout.to(cast))

    ref, refs = math_sdpa(torch.float64)
    theirs, theirs_grads = math_sdpa(dtype)
    # float64 included: p, lse and 1/(1-p) are float64 in the contract for float64 inputs.
    assert_close_to_ref(out, theirs, ref, what="dropout out")
    for name, a, b, r in zip(("dq", "dk", "dv"), grads, theirs_grads, refs):
        assert_close_to_ref(a, b, r, factor=5.0, what=f"dropout {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hk,is_causal", [(2, 2, False), (4, 2, True), (3, 1, False)])
def test_exact_mask_cpu(hq: int, hk: int, is_causal: bool, dtype: torch.dtype) -> None:
    _check_exact_mask("cpu", dtype, hq, hk, is_causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hk,is_causal", [(2, 2, False), (4, 2, True), (3, 1, False)])
def test_exact_mask_cuda(hq: int, hk: int, is_causal: bool, dtype: torch.dtype) -> None:
    _check_exact_mask("cuda", dtype, hq, hk, is_causal)


def _check_public_seed_path(device: str) -> None:
    """The public function draws its seed from torch's generator (draw_seed) and applies
    the contract's mask with it: same output as the reference with that mask."""
    q, k, v = (randn((2, 2, 15, 8), torch.float64, _gen(i), device) for i in range(3))
    torch.manual_seed(77)
    out = sdpa(q, k, v, dropout_p=0.25, is_causal=True)
    torch.manual_seed(77)
    seed = int(draw_seed())
    keep = dropout_keep_mask(seed, 2, 2, range(15), range(15), 0.25).to(device)
    ref = sdpa_reference(q, k, v, dropout_p=0.25, is_causal=True, dropout_mask=keep)
    assert_close_to_ref(out, None, ref, what="public dropout out")


def test_public_seed_path_cpu() -> None:
    _check_public_seed_path("cpu")


@pytest.mark.cuda
def test_public_seed_path_cuda() -> None:
    _check_public_seed_path("cuda")


def _check_split_invariance(device: str) -> None:
    """The mask depends on global positions only: computing the query rows in two blocks
    (q_offset / a q_pos map) reproduces the single call bit for bit."""
    g = _gen(8)
    q, k, v = (randn((1, 2, n, 16), torch.float32, g, device) for n in (30, 30, 30))
    kw = dict(is_causal=True, scale=0.25, dropout_p=0.5,
              seed=torch.tensor(99, dtype=torch.int64, device=device))
    whole, _ = ops.attn_fwd(q, k, v, **kw)
    top, _ = ops.attn_fwd(q[:, :, :13], k, v, **kw)
    bottom, _ = ops.attn_fwd(q[:, :, 13:], k, v, q_offset=13, **kw)
    assert torch.equal(torch.cat([top, bottom], 2), whole)
    rows = torch.tensor([29, 3, 17, 8], device=device)
    picked, _ = ops.attn_fwd(q[:, :, rows], k, v, q_pos=rows, **kw)
    assert torch.equal(picked, whole[:, :, rows])


def test_split_invariance_cpu() -> None:
    _check_split_invariance("cpu")


@pytest.mark.cuda
def test_split_invariance_cuda() -> None:
    _check_split_invariance("cuda")


def _check_gradcheck_dropout(device: str) -> None:
    """With the global seed reset before each call the function is deterministic, so
    finite differences check that the backward applies the forward's mask."""
    g = _gen(9)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_()
               for s in ((1, 2, 5, 4), (1, 2, 7, 4), (1, 2, 7, 3)))

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        torch.manual_seed(1234)
        return sdpa(q, k, v, dropout_p=0.4, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_dropout_cpu() -> None:
    _check_gradcheck_dropout("cpu")


@pytest.mark.cuda
def test_gradcheck_dropout_cuda() -> None:
    _check_gradcheck_dropout("cuda")


def test_head_offset_draws_the_global_heads_mask() -> None:
    """A call over heads [2, 4) with dropout_head_offset=2 drops exactly what the call over
    all four heads drops there (Ulysses ranks hold head slices); offset 0 does not."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64) for _ in range(3))
    seed = torch.tensor(1234)
    full, _ = ops.attn_fwd(q, k, v, is_causal=True, scale=0.25, dropout_p=0.3, seed=seed)
    part, _ = ops.attn_fwd(q[:, 2:], k[:, 2:], v[:, 2:], is_causal=True, scale=0.25,
                           dropout_p=0.3, seed=seed, dropout_head_offset=2)
    local, _ = ops.attn_fwd(q[:, 2:], k[:, 2:], v[:, 2:], is_causal=True, scale=0.25,
                            dropout_p=0.3, seed=seed)
    torch.testing.assert_close(part, full[:, 2:], rtol=0, atol=0)
    assert not torch.allclose(local, full[:, 2:])
    xs = [t[:, 2:].clone().requires_grad_() for t in (q, k, v)]
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    o1, _ = ops.attn_fwd(*xs, is_causal=True, scale=0.25, dropout_p=0.3, seed=seed,
                         dropout_head_offset=2)
    o2, _ = ops.attn_fwd(*ys, is_causal=True, scale=0.25, dropout_p=0.3, seed=seed)
    dout = torch.randn_like(o2)
    g1 = torch.autograd.grad(o1, xs, dout[:, 2:])
    g2 = torch.autograd.grad(o2, ys, dout)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b[:, 2:], rtol=1e-12, atol=1e-12)
