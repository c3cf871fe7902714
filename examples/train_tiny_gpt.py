"""Train a tiny GPT with its sequence split across ranks (ring attention).

    torchrun --standalone --nproc-per-node 2 examples/train_tiny_gpt.py          # CPU, gloo
    torchrun --standalone --nproc-per-node 2 examples/train_tiny_gpt.py --check  # + 1-process run
    torchrun --standalone --nproc-per-node 2 examples/train_tiny_gpt.py --device cuda

The model is an ordinary pre-norm GPT whose attention calls
torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True); it knows nothing
about ring_attn. Sequence parallelism is added around it:
  * each rank takes its shard of the tokens and targets (ring_attn.shard, dim=1),
  * RoPE uses the global positions of those tokens (ring_attn.positions),
  * the forward runs inside ring_attn.sequence_parallel(), which turns its SDPA calls into
    ring attention on the shards,
  * loss = (sum over all ranks of the local token losses) / total tokens: every rank
    backpropagates its local sum / total tokens, and since parameters are replicated while
    tokens are split, the full gradient is the SUM of the ranks' gradients (all_reduce).
    The ring's backward already sends each rank's share of dK/dV home, so this is exact.

Data: character-level, from the text below, cut into windows at offsets drawn from a
seeded generator (identical on every rank). Windows longer than the text's period see the
text repeat, which a model can only exploit by attending to tokens held by other ranks.

--check also trains a second copy of the model in one process on the full sequences, with
plain torch attention, the same initial weights and the same batches, and requires the two
losses to agree at every step: |ring - single| <= rtol * |single|, rtol 1e-4 in float32
and 1e-10 in float64 (the ring merges partial results in the accumulation dtype: float32,
float64 for float64 inputs).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

try:
    import ring_attn
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ring_attn

TEXT = """\
A ring of workers shares one long sentence. Each worker keeps a slice of the words and
passes its keys and values to the next worker, one block at a time, while it attends with
its own queries to the block it holds. After a full turn of the ring every query has met
every key, and the partial results, each with its log-sum-exp, merge into exactly the
answer one large machine would have given. No worker ever holds the whole sentence, so the
sentence can grow with the number of workers. The causal mask keeps the future hidden;
zigzag and striped layouts give every worker the same amount of work to do at every turn.
"""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (all ranks)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--layout", choices=("zigzag", "striped", "contiguous"), default="zigzag")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", "--compare-single", dest="check", action="store_true",
                   help="also train in one process on full sequences; compare losses per step")
    return p.parse_args()


# ------------------------------------------------------------------------------ model

def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, S, D] at the global positions pos [S]."""
    d = x.shape[-1] // 2
    inv_freq = 10000.0 ** (-torch.arange(d, dtype=torch.float64, device=x.device) / d)
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, pos), rope(k, pos), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, dim))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, pos)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------ data

class Batches:
    """(tokens, targets) [B, S] windows of the text, repeated to any length, at offsets
    from a seeded generator: the same sequence of batches on every rank."""

    def __init__(self, batch: int, seq_len: int, seed: int) -> None:
        chars = sorted(set(TEXT))
        self.vocab = len(chars)
        ids = torch.tensor([chars.index(c) for c in TEXT])
        self.data = ids.repeat(math.ceil((seq_len + 1) / len(TEXT)) + 1)
        self.batch, self.seq_len = batch, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(TEXT), (self.batch,), generator=self.gen)
        win = torch.stack([self.data[s: s + self.seq_len + 1] for s in starts.tolist()])
        return win[:, :-1], win[:, 1:]


# ------------------------------------------------------------------------------ training

def setup(device_kind: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group, or make a 1-process group for plain `python`."""
    timeout = datetime.timedelta(seconds=120)
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def ring_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
              targets: torch.Tensor, layout: str) -> float:
    """One optimizer step with the sequence split across the ranks; returns the global
    mean token loss."""
    n_total = targets.numel()
    tok = ring_attn.shard(tokens, dim=1, layout=layout)
    tgt = ring_attn.shard(targets, dim=1, layout=layout)
    pos = ring_attn.positions(tok.shape[1], layout=layout).to(tok.device)
    with ring_attn.sequence_parallel(layout=layout):
        logits = model(tok, pos)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
    opt.zero_grad(set_to_none=False)
    (loss_sum / n_total).backward()
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads] + [loss_sum.detach().reshape(1)])
    dist.all_reduce(flat)  # SUM: every rank holds the gradient of its own tokens only
    for g, chunk in zip(grads, flat[:-1].split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))
    opt.step()
    return flat[-1].item() / n_total


def single_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
                targets: torch.Tensor) -> float:
    """The same step in one process on the full sequences, plain torch attention."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    loss = F.cross_entropy(model(tokens, pos).flatten(0, 1), targets.flatten())
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return loss.item()


def main() -> int:
    args = parse_args()
    rank, world, device = setup(args.device)
    if args.seq_len % (2 * world):
        raise SystemExit(f"--seq-len must be a multiple of 2 x ranks = {2 * world}")
    dtype = DTYPES[args.dtype]
    data = Batches(args.batch, args.seq_len, args.seed)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = TinyGPT(data.vocab, args.d_model, args.layers, args.heads).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    check = args.check and rank == 0
    if check:
        ref_model = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=args.lr)
    losses: list[tuple[float, float]] = []
    bar = tqdm(range(args.steps), disable=rank != 0, desc=f"{world} ranks, S={args.seq_len}",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        tokens, targets = (t.to(device) for t in data.next())
        loss = ring_step(model, opt, tokens, targets, args.layout)
        if check:
            ref = single_step(ref_model, ref_opt, tokens, targets)
            losses.append((loss, ref))
            bar.set_postfix(loss=f"{loss:.4f}", single=f"{ref:.4f}")
        else:
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    ok = True
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s, final loss {loss:.4f} "
              f"({world} ranks x {args.seq_len // world} tokens, {args.dtype})")
    if check:
        rtol = RTOL[dtype]
        print(f"step   ring loss           single-process loss   rel diff  (rtol {rtol:g})")
        for i, (ours, ref) in enumerate(losses):
            rel = abs(ours - ref) / abs(ref)
            ok &= rel <= rtol
            print(f"{i:4d}   {ours:.12f}   {ref:.12f}        {rel:.1e}"
                  f"{'' if rel <= rtol else '  <-- too large'}")
        print("PASS: ring training matches single-process training" if ok else "FAIL")
    flag = torch.tensor([int(ok)], device=device)
    dist.broadcast(flag, src=0)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
