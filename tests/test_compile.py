"""torch.compile(fullgraph=True) of a module calling ring_attn.scaled_dot_product_attention
traces without graph breaks (fake kernels give the shapes, autograd comes from the op's
registration) and gives the same outputs and gradients as eager, with causal, masks, GQA
and dropout. Dropout draws its seed with torch.randint inside the graph: the eager and
aot_eager backends run that op as eager does, so the same torch.manual_seed gives the
same mask; inductor replaces random ops with its own generator unless
torch._inductor.config.fallback_random is set, which the inductor test sets."""
from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import nn

import ring_attn

Tensor = torch.Tensor


class Attention(nn.Module):
    """Projections + heads + ring_attn SDPA + output projection, GQA-capable."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                dropout_p: float = 0.0) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        out = ring_attn.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, enable_gqa=self.heads != self.kv_heads)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "dropout_causal": {"is_causal": True, "dropout_p": 0.25},
}


def _run(model: nn.Module, fn: Any, x: Tensor, kw: dict[str, Any]
         ) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients (input and parameters) of fn(x, **kw), global seed fixed."""
    x = x.detach().requires_grad_()
    torch.manual_seed(321)
    out = fn(x, **kw)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out, [x, *params], torch.ones_like(out))
    return out.detach(), list(grads)


def _check_compiled(device: str, backend: str, name: str, kv_heads: int,
                    dynamic: Optional[bool] = None) -> None:
    torch._dynamo.reset()
    case = CASES[name]
    torch.manual_seed(0)
    model = Attention(32, 4, kv_heads).to(device)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    lengths = (13, 21) if dynamic else (13,)
    for s in lengths:
        x = torch.randn(2, s, 32, device=device)
        kw: dict[str, Any] = {k: v for k, v in case.items() if k != "mask"}
        if case.get("mask") == "bool":
            kw["attn_mask"] = torch.rand(2, 1, s, s, device=device) > 0.3
        elif case.get("mask") == "float":
            kw["attn_mask"] = torch.randn(s, s, device=device)
        out_e, grads_e = _run(model, model, x, kw)
        out_c, grads_c = _run(model, compiled, x, kw)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)


# (backend, case, kv heads): every case under aot_eager (which also traces the backward
# through the op's autograd registration), two under the plain eager backend.
COMBOS = [("eager", "plain", 4), ("eager", "dropout_causal", 2),
          ("aot_eager", "plain", 4), ("aot_eager", "causal", 2), ("aot_eager", "bool_mask", 2),
          ("aot_eager", "float_mask", 4), ("aot_eager", "dropout_causal", 2)]


@pytest.mark.parametrize("backend,name,kv_heads", COMBOS)
def test_compiled_matches_eager_cpu(backend: str, name: str, kv_heads: int) -> None:
    _check_compiled("cpu", backend, name, kv_heads)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,name,kv_heads", COMBOS)
def test_compiled_matches_eager_cuda(backend: str, name: str, kv_heads: int) -> None:
    _check_compiled("cuda", backend, name, kv_heads)


def test_compiled_dynamic_shapes_cpu() -> None:
    """dynamic=True: the fake kernels handle symbolic lengths (two lengths in turn)."""
    _check_compiled("cpu", "aot_eager", "bool_mask", 2, dynamic=True)


@pytest.mark.slow
def test_compiled_inductor_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default backend, once, tiny: GQA + causal + dropout, forward and backward
    (about 30 s of C++ compilation on 2 cores when the inductor cache is cold)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    _check_compiled("cpu", "inductor", "dropout_causal", 2)


# --- The ring under torch.compile ---------------------------------------------------------

class RingBlock(nn.Module):
    """Attention with the ring in the middle, as a sequence-parallel model has it: x is
    this rank's zigzag shard of the sequence [B, S_local, dim]."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                window: Optional[tuple[int, int]] = None, dropout_p: float = 0.0) -> Tensor:
        a = self.attn
        b, s, _ = x.shape
        q = a.wq(x).view(b, s, a.heads, a.head_dim).transpose(1, 2)
        k, v = a.wkv(x).view(b, s, 2, a.kv_heads, a.head_dim).unbind(2)
        out = ring_attn.ring_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       attn_mask=attn_mask, window=window, dropout_p=dropout_p)
        return a.wo(out.transpose(1, 2).reshape(b, s, -1)) + x


def _ring_compiled(rank: int, world_size: int, backend: str) -> list[str]:
    """On every rank: the compiled block (fullgraph: any graph break raises) equals eager,
    output and gradients (bit for bit under aot_eager, which runs eager's kernels; within
    1e-5 under inductor, which generates its own for the projections), and eager equals
    the block on the whole sequence with torch's SDPA in float64 (parameter gradients
    summed over ranks)."""
    tol = 0.0 if backend == "aot_eager" else 1e-5
    import torch.distributed as dist
    import torch.nn.functional as F
    done = []
    for name, kw in (("causal GQA", {}), ("key padding + window", {"pad": 5, "window": (6, 0)}),
                     ("dropout", {"dropout_p": 0.2})):
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = RingBlock(32, 4, 2)
        s = 16 * world_size
        x = torch.randn(2, s, 32)
        keep = torch.ones(2, s, dtype=torch.bool)
        keep[:, s - kw.get("pad", 0):] = False
        mask = keep[:, None, None, :] if "pad" in kw else None
        xl = ring_attn.shard(x, dim=1)
        call = {"attn_mask": mask, "window": kw.get("window"),
                "dropout_p": kw.get("dropout_p", 0.0)}
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        out_e, grads_e = _run(block, block, xl, call)
        out_c, grads_c = _run(block, compiled, xl, call)
        torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol, msg=name)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=tol, atol=tol, msg=name)
        if "dropout_p" not in kw:  # the reference: the whole sequence, float64, torch SDPA
            ref = block.double()
            xd = x.double().requires_grad_()
            a = ref.attn
            q = a.wq(xd).view(2, s, 4, 8).transpose(1, 2)
            k, v = a.wkv(xd).view(2, s, 2, 2, 8).unbind(2)
            k, v = (t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
            i = torch.arange(s)
            left = kw.get("window", (s, 0))[0]
            vis = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)
            vis = vis & keep[:, None, None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=vis)
            y = a.wo(o.transpose(1, 2).reshape(2, s, -1)) + xd
            grads_r = torch.autograd.grad(y, [xd, *ref.parameters()], torch.ones_like(y))
            torch.testing.assert_close(out_e.double(), ring_attn.shard(y.detach(), dim=1),
                                       rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(grads_e[0].double(), ring_attn.shard(grads_r[0], dim=1),
                                       rtol=1e-5, atol=1e-5, msg=name)
            for ge, gr in zip(grads_e[1:], grads_r[1:]):
                total = ge.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total.double(), gr, rtol=1e-5, atol=1e-5, msg=name)
        done.append(name)
    # A compiled function calling F.scaled_dot_product_attention inside the
    # sequence_parallel context (which patches it to the ring): the same op, no break.
    torch._dynamo.reset()

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    g = torch.Generator().manual_seed(3)
    full = [torch.randn(1, 2, 8 * world_size, 16, generator=g) for _ in "qkv"]
    local = [ring_attn.shard(t) for t in full]
    with ring_attn.sequence_parallel(layout="zigzag"):
        out_c = torch.compile(attend, backend=backend, fullgraph=True)(*local)
        out_e = attend(*local)
    torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol)
    ref = 2 * F.scaled_dot_product_attention(*(t.double() for t in full), is_causal=True)
    torch.testing.assert_close(out_c.double(), ring_attn.shard(ref), rtol=1e-5, atol=1e-5)
    done.append("sequence_parallel")
    return done


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                                marks=pytest.mark.slow)])
def test_ring_compiles_without_graph_break(tmp_path, backend: str) -> None:
    """torch.compile(fullgraph=True) through ring_attn.ring_attention at P = 2 (gloo): the
    ring is one opaque op (ring_attn::ring_fwd / ring_bwd), so nothing breaks the graph,
    and the compiled block gives eager's results and the whole-sequence float64
    reference. Dropout matches under inductor too: the seed is drawn inside the op."""
    from dist_utils import assert_all_ok, run_ranks
    per_rank = assert_all_ok(run_ranks(_ring_compiled, 2, tmp_path, backend,
                                       join_timeout_s=600))
    assert all(len(done) == 4 for done in per_rank), per_rank


def _ring_opcheck(rank: int, world_size: int) -> int:
    """torch.library.opcheck of ring_attn::ring_fwd on a one-rank group: schema, fake
    kernel, autograd registration. Not test_aot_dispatch_*: they compare two calls'
    outputs, and `state` carries the call's number in its group, one more each call (what
    lets the backward check that every rank is in the same call's); the compiled path,
    backward included, is test_ring_compiles_without_graph_break's."""
    import torch.distributed as dist
    from torch.library import opcheck
    name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 8, 16, generator=g, requires_grad=True) for _ in "kv")
    mask = torch.rand(1, 1, 8, 8, generator=g) > 0.2
    cases = [(q, k, v, None, None, None, True, None, 0.0, "zigzag", None, 0.0, 0, name),
             (q, k, v, mask, None, None, False, 0.3, 0.0, "contiguous", [3, 1], 5.0, 0, name)]
    for args in cases:
        opcheck(torch.ops.ring_attn.ring_fwd.default, args,
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    return len(cases)


def test_ring_ops_pass_opcheck(tmp_path) -> None:
    from dist_utils import assert_all_ok, run_ranks
    assert assert_all_ok(run_ranks(_ring_opcheck, 1, tmp_path, join_timeout_s=300)) == [2]
