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
