"""Op-level checks of the CPU kernels (torch.ops.ring_attn.attn_fwd / attn_bwd) against a
float64 reference written here from torch ops (scores, masks, positions, softmax), with
the gradients from autograd through that reference.

Shapes cross the kernels' block edges (forward key block 512, backward key block 128,
query block 64) and cover what the public-API suite cannot reach: position maps (zigzag),
offsets, GQA with and without the key-chunked backward, broadcast (stride-0) masks and
inputs, fully masked rows, out_fp32 / grad_fp32, the dlse path, reduced precision against
torch's own error, and every instruction-set path (cpu/cpu_isa.h): the float32 / bfloat16
checks named in ISA_CHECKS rerun in a subprocess per path this machine supports, with
RING_ATTN_CPU_ISA set (the path is decided once per process).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from ring_attn import ops
from helpers import assert_close_to_ref, randn

Tensor = torch.Tensor

# lse and float masks are float64 for float64 inputs (the op contract's accumulation
# dtype), so float64 results are float64-accurate: measured errors stay below 2e-15 x
# max(1, max|ref|) here (F64_DEBUG-style instrumentation of assert_close_to_ref); the floor
# leaves 500x.
F64_FLOOR = 1e-12


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_pos: Tensor,
              k_pos: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) in float64 by the contract's definition; differentiable in q, k, v.
    Rows with no surviving key give out 0 and lse -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = scale * q.double() @ k.transpose(-1, -2)
    keep = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        s = s + mask.double()  # float masks are read in the accumulation dtype (float64)
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach()
    p = torch.exp(s - safe[..., None])
    # Normalise by the exact row sum (differentiable), not by the detached lse.
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ v, lse


def positions(n: int, offset: int = 0) -> Tensor:
    return torch.arange(n, dtype=torch.int64) + offset


def zigzag(n: int, chunks: int) -> Tensor:
    """Global positions of a zigzag shard: chunk i and chunk (2*chunks - 1 - i) interleaved
    as a rank holding pieces from both ends of the sequence would see them."""
    size = n // (2 * chunks)
    order = []
    for i in range(chunks):
        order += list(range(i * size, (i + 1) * size))
        j = 2 * chunks - 1 - i
        order += list(range(j * size, (j + 1) * size))
    return torch.tensor(order, dtype=torch.int64)


def run_op(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, mask: Optional[Tensor] = None,
           q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None, q_offset: int = 0,
           k_offset: int = 0, causal: bool = False, scale: float = 0.5,
           dlse: Optional[Tensor] = None, out_fp32: bool = False, grad_fp32: bool = False):
    out, lse = ops.attn_fwd(q, k, v, mask, q_pos, k_pos, q_offset, k_offset, causal, scale,
                            0.0, None, out_fp32)
    grads = ops.attn_bwd(dout, q, k, v, out, lse, dlse, mask, q_pos, k_pos, q_offset,
                         k_offset, causal, scale, 0.0, None, grad_fp32)
    return out, lse, grads


def reference_grads(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, mask, qp, kp, causal,
                    scale, dlse: Optional[Tensor] = None):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference(*leaves, mask, qp, kp, causal, scale)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), lse.detach(), grads


def check_f64(B, Hq, Hk, Sq, Sk, D, Dv, *, mask=None, q_pos=None, k_pos=None, q_offset=0,
              k_offset=0, causal=False, dlse=False, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    q = randn((B, Hq, Sq, D), torch.float64, g)
    k = randn((B, Hk, Sk, D), torch.float64, g)
    v = randn((B, Hk, Sk, Dv), torch.float64, g)
    dout = randn((B, Hq, Sq, Dv), torch.float64, g)
    dl = randn((B, Hq, Sq), torch.float64, g) if dlse else None
    scale = 1.0 / math.sqrt(D)
    qp = q_pos if q_pos is not None else positions(Sq, q_offset)
    kp = k_pos if k_pos is not None else positions(Sk, k_offset)
    out, lse, grads = run_op(q, k, v, dout, mask, q_pos, k_pos, q_offset, k_offset, causal,
                             scale, dl)
    r_out, r_lse, r_grads = reference_grads(q, k, v, dout, mask, qp, kp, causal, scale, dl)
    assert_close_to_ref(out, None, r_out, atol_floor=F64_FLOOR, what="out")
    assert lse.dtype == torch.float64, f"lse of float64 inputs must be float64, got {lse.dtype}"
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), "lse: -inf rows differ"
    assert_close_to_ref(lse, None, r_lse, atol_floor=F64_FLOOR, what="lse")
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, r_grads):
        assert ours.dtype == torch.float64
        assert_close_to_ref(ours, None, ref, atol_floor=F64_FLOOR, what=name)
    return out, lse, grads


def test_zigzag_positions_causal_gqa():
    # A zigzag shard of a 2800-token sequence: non-contiguous maps, so tiles are decided
    # from block min/max positions; Sk = 700 spans two forward and six backward key blocks.
    q_pos = zigzag(1400, 2)[:150]
    k_pos = zigzag(2800, 2)[::4]
    check_f64(2, 4, 2, 150, 700, 40, 24, q_pos=q_pos, k_pos=k_pos, causal=True)


def test_offsets_fully_masked_rows():
    # Keys start at position 70: queries 0..69 see no key (out 0, lse -inf, zero dq).
    out, lse, (dq, dk, dv) = check_f64(1, 2, 2, 130, 200, 16, 16, q_offset=0, k_offset=70,
                                       causal=True)
    assert torch.all(out[:, :, :70] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :70])) and torch.all(torch.isfinite(lse[:, :, 70:]))
    assert torch.all(dq[:, :, :70] == 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


@pytest.mark.parametrize("B,Hk", [(1, 1), (4, 4)], ids=["key-chunked", "one-chunk"])
def test_gqa_dk_dv_summed_over_group(B, Hk):
    # B*Hk = 1 makes the backward cut the keys into chunks with float32 dQ partials;
    # B*Hk = 16 gives every thread whole (batch, KV head) items.
    check_f64(B, 4 * Hk, Hk, 100, 300, 32, 48, causal=True)


def test_bool_and_float_masks_broadcast():
    g = torch.Generator().manual_seed(1)
    bmask = torch.rand((2, 1, 90, 1), generator=g) < 0.8         # per query row
    bmask = bmask & (torch.rand((1, 1, 1, 530), generator=g) < 0.9)  # and per key
    check_f64(2, 3, 3, 90, 530, 24, 24, mask=bmask.expand(2, 3, 90, 530))
    fmask = torch.randn((1, 3, 1, 530), generator=g, dtype=torch.float64)
    fmask = fmask.masked_fill(torch.rand((1, 3, 1, 530), generator=g) > 0.7, -math.inf)
    check_f64(2, 3, 3, 90, 530, 24, 24, mask=fmask)


def test_fully_masked_rows_by_mask_no_nan():
    mask = torch.ones((1, 2, 80, 150), dtype=torch.bool)
    mask[:, :, 5] = False
    mask[:, 1, 70:] = False
    out, lse, grads = check_f64(1, 2, 2, 80, 150, 8, 8, mask=mask)
    assert torch.all(out[:, :, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))
    assert torch.all(torch.isneginf(lse[:, 1, 70:]))
    assert all(torch.isfinite(t).all() for t in grads)


def test_dlse_path():
    # d(lse)/dS = P, folded into delta = rowsum(dout * out) - dlse.
    check_f64(2, 2, 1, 77, 260, 16, 16, causal=True, q_offset=200, dlse=True)


@pytest.mark.parametrize("D,Dv", [(1, 3), (80, 80), (256, 64), (64, 256)])
def test_head_dims(D, Dv):
    check_f64(1, 2, 2, 70, 140, D, Dv, causal=True, q_offset=70)


def test_strided_and_broadcast_inputs():
    # [B, S, H, D] storage seen as [B, H, S, D] (row stride H*D), and K/V broadcast over
    # the batch with stride 0; strides come straight from the tensors, nothing is copied.
    g = torch.Generator().manual_seed(2)
    B, H, Sq, Sk, D = 3, 2, 70, 150, 16
    q = randn((B, Sq, H, D), torch.float32, g).transpose(1, 2)
    k = randn((1, Sk, H, D), torch.float32, g).transpose(1, 2).expand(B, H, Sk, D)
    v = randn((1, H, Sk, D), torch.float32, g).expand(B, H, Sk, D)
    dout = randn((B, H, Sq, D), torch.float32, g)
    out, lse, grads = run_op(q, k, v, dout, causal=True, q_offset=Sk - Sq, scale=0.25)
    qp, kp = positions(Sq, Sk - Sq), positions(Sk)
    r_out, _, r_grads = reference_grads(q, k.contiguous(), v.contiguous(), dout, None, qp, kp,
                                        True, 0.25)
    t_out = F.scaled_dot_product_attention(q, k, v, attn_mask=kp[None, :] <= qp[:, None],
                                           scale=0.25)
    assert_close_to_ref(out, t_out, r_out, what="out")
    # dk/dv of a broadcast K/V: the op returns one gradient per batch entry.
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_close_to_ref(ours, None, ref, atol_floor=2e-5, what=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_fp32", [False, True])
def test_lse_float64_for_every_dtype(dtype, out_fp32):
    # lse is float64 for every q dtype, whatever out_fp32 says about out (attn_params.h).
    g = torch.Generator().manual_seed(7)
    q, k, v = (randn((1, 2, 9, 8), dtype, g) for _ in range(3))
    _, lse = ops.attn_fwd(q, k, v, None, None, None, 0, 0, True, 0.5, 0.0, None, out_fp32)
    assert lse.dtype == torch.float64


def test_float32_mask_widened_exactly_for_float64():
    # A float32 mask with float64 inputs is converted to float64 (exact), not the other
    # way: the result equals that of the same mask given as float64, bit for bit, and
    # differs from a mask rounded through float32 from float64 values.
    g = torch.Generator().manual_seed(8)
    q, k, v = (randn((1, 2, 40, 16), torch.float64, g) for _ in range(3))
    dout = randn((1, 2, 40, 16), torch.float64, g)
    m64 = torch.randn((1, 2, 40, 40), generator=g, dtype=torch.float64)
    m32 = m64.float()
    out32, lse32, g32 = run_op(q, k, v, dout, mask=m32)
    out64, lse64, g64 = run_op(q, k, v, dout, mask=m32.double())
    assert torch.equal(out32, out64) and torch.equal(lse32, lse64)
    assert all(torch.equal(a, b) for a, b in zip(g32, g64))
    out_exact, lse_exact, _ = run_op(q, k, v, dout, mask=m64)
    assert not torch.equal(lse_exact, lse32), "a float64 mask must not be rounded to float32"


def test_out_fp32_grad_fp32():
    g = torch.Generator().manual_seed(3)
    q, k, v = (randn((1, 2, 100, 32), torch.bfloat16, g) for _ in range(3))
    dout = randn((1, 2, 100, 32), torch.bfloat16, g)
    out, lse, grads = run_op(q, k, v, dout, causal=True, out_fp32=True, grad_fp32=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in grads)
    qp = positions(100)
    r_out, _, r_grads = reference_grads(q, k, v, dout, None, qp, qp, True, 0.5)
    out_bf16, _, grads_bf16 = run_op(q, k, v, dout, causal=True)
    # The float32 output skips the final rounding to bfloat16: strictly closer.
    assert (out.double() - r_out).abs().max() < (out_bf16.double() - r_out).abs().max()
    for ours, ours_bf16, ref in zip(grads, grads_bf16, r_grads):
        assert (ours.double() - ref).abs().max() <= (ours_bf16.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reduced_precision_vs_torch_error(dtype):
    g = torch.Generator().manual_seed(4)
    B, H, S, D = 1, 4, 300, 64
    q, k, v = (randn((B, H, S, D), dtype, g) for _ in range(3))
    dout = randn((B, H, S, D), dtype, g)
    scale = 1.0 / math.sqrt(D)
    out, _, grads = run_op(q, k, v, dout, causal=True, scale=scale)
    qp = positions(S)
    r_out, _, r_grads = reference_grads(q, k, v, dout, None, qp, qp, True, scale)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    t_out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    t_grads = torch.autograd.grad(t_out, leaves, dout)
    assert out.dtype == dtype
    assert_close_to_ref(out, t_out, r_out, factor=3.0, what="out")
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
        assert_close_to_ref(ours, theirs, ref, factor=3.0, what=name)


def test_bf16_odd_shapes_strided_vs_torch():
    # On AVX512-BF16 CPUs the bfloat16 kernels multiply bf16 pairs: odd head dims, odd key
    # counts and (backward, pairs of queries) odd query counts are padded, and q rows with
    # an odd stride are repacked.
    g = torch.Generator().manual_seed(6)
    B, H, Sq, Sk, D = 1, 3, 101, 1101, 37
    q = randn((B, Sq, H, D), torch.bfloat16, g).transpose(1, 2)  # row stride H*D = 111
    k, v = (randn((B, H, Sk, D), torch.bfloat16, g) for _ in range(2))
    dout = randn((B, H, Sq, D), torch.bfloat16, g)
    scale = 1.0 / math.sqrt(D)
    out, _, grads = run_op(q, k, v, dout, causal=True, q_offset=Sk - Sq, scale=scale)
    qp, kp = positions(Sq, Sk - Sq), positions(Sk)
    r_out, _, r_grads = reference_grads(q, k, v, dout, None, qp, kp, True, scale)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    t_out = F.scaled_dot_product_attention(*leaves, attn_mask=kp[None, :] <= qp[:, None],
                                           scale=scale)
    t_grads = torch.autograd.grad(t_out, leaves, dout)
    assert_close_to_ref(out, t_out, r_out, factor=3.0, what="out")
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
        assert_close_to_ref(ours, theirs, ref, factor=3.0, what=name)


def test_gqa_masks_vs_torch_error():
    # float32 and bfloat16, GQA (4 query heads per KV head), causal with a key offset, a
    # broadcast bool mask, odd head dim, keys across the forward's 512 and the backward's
    # 128-key blocks: forward and backward against float64, within 3x torch's error.
    g = torch.Generator().manual_seed(9)
    B, Hq, Hk, Sq, Sk, D = 1, 4, 1, 70, 530, 40
    keep = torch.rand((B, 1, Sq, Sk), generator=g) < 0.85
    qp, kp = positions(Sq, Sk - Sq), positions(Sk)
    scale = 1.0 / math.sqrt(D)
    for dtype in (torch.float32, torch.bfloat16):
        q = randn((B, Hq, Sq, D), dtype, g)
        k, v = (randn((B, Hk, Sk, D), dtype, g) for _ in range(2))
        dout = randn((B, Hq, Sq, D), dtype, g)
        out, _, grads = run_op(q, k, v, dout, mask=keep, causal=True, q_offset=Sk - Sq,
                               scale=scale)
        r_out, _, r_grads = reference_grads(q, k, v, dout, keep, qp, kp, True, scale)
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        t_out = F.scaled_dot_product_attention(
            *leaves, attn_mask=keep & (kp[None, :] <= qp[:, None]), scale=scale,
            enable_gqa=True)
        t_grads = torch.autograd.grad(t_out, leaves, dout)
        assert_close_to_ref(out, t_out, r_out, factor=3.0, what=f"out {dtype}")
        for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
            assert_close_to_ref(ours, theirs, ref, factor=3.0, what=f"{name} {dtype}")


def cpu_isa() -> tuple[str, list[str], bool]:
    """(the path in use, the paths this machine supports lowest first, AMX detected)."""
    isa, supported, amx = torch.ops.ring_attn._cpu_isa()
    return isa, list(supported), amx


def test_isa_is_the_requested_or_highest():
    # The subprocesses of test_isa_path rerun this: the variable really selects the path.
    isa, supported, _ = cpu_isa()
    assert supported[0] == "avx2" and isa in supported
    assert isa == os.environ.get("RING_ATTN_CPU_ISA", supported[-1]).lower(), (isa, supported)


# The float32 / bfloat16 kernel checks rerun under every path: the path decides the
# micro-kernels (gemm_avx2 / gemm_avx512 / vdpbf16ps) and the row operations; float64
# always takes the BLAS, so its checks run once.
ISA_CHECKS = ("test_isa_is_the_requested_or_highest", "test_gqa_masks_vs_torch_error",
              "test_bf16_odd_shapes_strided_vs_torch", "test_strided_and_broadcast_inputs",
              "test_out_fp32_grad_fp32")


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512_bf16"])
def test_isa_path(isa):
    isa_now, supported, _ = cpu_isa()
    if isa not in supported:
        pytest.skip(f"this machine supports {supported}")
    if isa == isa_now:
        pytest.skip(f"{isa} is this process's path: the checks ran in process")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
         "-p", "no:cacheprovider", "-k", " or ".join(ISA_CHECKS)],
        env=_subprocess_env(RING_ATTN_CPU_ISA=isa), capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"{len(ISA_CHECKS)} passed" in res.stdout, res.stdout[-500:]


_TORCH_AVX2_SCRIPT = r"""
import math, os, torch
from ring_attn import ops
assert torch.backends.cpu.get_cpu_capability() != "AVX512"
# An unknown value, then one above torch's capability: ValueError naming the variable,
# the value and what this machine supports; nothing is decided until a valid value.
for value, words in (("amx", ("not a CPU kernel path", "avx512_bf16", "AMX has no kernel")),
                     ("AVX512", ("not supported on this machine",))):
    os.environ["RING_ATTN_CPU_ISA"] = value
    try:
        torch.ops.ring_attn._cpu_isa()
        raise AssertionError(f"RING_ATTN_CPU_ISA={value} was accepted")
    except ValueError as e:
        msg = str(e)
        assert f"RING_ATTN_CPU_ISA={value}" in msg and "supports: avx2" in msg, msg
        assert "supports: avx2," not in msg, msg
        assert all(w in msg for w in words), msg
del os.environ["RING_ATTN_CPU_ISA"]
# torch's capability caps the path: AVX2 here even on an AVX-512 CPU.
assert torch.ops.ring_attn._cpu_isa()[:2] == ("avx2", ["avx2"])
F = torch.nn.functional
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 90, 24, generator=g).to(dtype) for _ in range(3))
    dout = torch.randn(1, 2, 90, 24, generator=g).to(dtype)
    out, lse = ops.attn_fwd(q, k, v, None, None, None, 0, 0, True, 0.3)
    grads = ops.attn_bwd(dout, q, k, v, out, lse, None, None, None, None, 0, 0, True, 0.3)
    def sdpa_grads(dt):
        leaves = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=0.3)
        return [o] + list(torch.autograd.grad(o, leaves, dout.to(dt)))
    ref, theirs = sdpa_grads(torch.float64), sdpa_grads(dtype)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), [out, *grads], theirs, ref):
        err = (a.double() - r).abs().max().item()
        bound = 3 * (b.double() - r).abs().max().item() + 1e-6 * max(1.0, r.abs().max().item())
        assert err <= bound, (dtype, name, err, bound)
print("ok")
"""


def test_torch_avx2_caps_the_path_and_bad_values_raise():
    # ATEN_CPU_CAPABILITY=avx2 (torch's own AVX2 path, as on an AVX2-only CPU): our path
    # follows it down, RING_ATTN_CPU_ISA cannot raise it, and the kernels run correctly.
    env = _subprocess_env(ATEN_CPU_CAPABILITY="avx2")
    env.pop("RING_ATTN_CPU_ISA", None)
    res = subprocess.run([sys.executable, "-c", _TORCH_AVX2_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")
