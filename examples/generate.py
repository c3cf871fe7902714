"""Greedy generation after a long prompt with the KV cache sharded over ranks.

    python -m torch.distributed.run --standalone --nproc-per-node 4 examples/generate.py
    python examples/generate.py                     # one process (P = 1, no process group)

A small decoder-only transformer (random weights from a fixed seed; no download: RMSNorm,
GQA attention with RoPE at GLOBAL positions, SiLU MLP) reads a prompt of --prompt-len
random tokens and generates --new-tokens tokens greedily:

  prefill  each rank embeds only its share of each prompt chunk (cache.prefill_positions),
           every layer runs ring_attn.ring_prefill (chunks of --chunk tokens: chunked
           prefill), and the rank holding the last prompt token picks the first new token;
  decode   every rank runs the (replicated) new token through the model; each layer's
           ring_attn.ring_decode attends to the rank's share of the cache and merges the
           ranks' partials, so every rank gets the same logits and the same next token.

Rank 0 then runs the same model in one process without ring_attn (a whole-prompt forward
and incremental decoding with torch SDPA over a concatenated cache) and prints PASS when
the tokens are identical. Per-rank cache memory is printed: total / P.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ring_attn  # noqa: E402


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            self.layers.append(torch.nn.ModuleDict({
                "n1": torch.nn.RMSNorm(dim), "n2": torch.nn.RMSNorm(dim),
                "q": torch.nn.Linear(dim, heads * self.hd, bias=False),
                "kv": torch.nn.Linear(dim, 2 * kv_heads * self.hd, bias=False),
                "o": torch.nn.Linear(heads * self.hd, dim, bias=False),
                "up": torch.nn.Linear(dim, 4 * dim, bias=False),
                "down": torch.nn.Linear(4 * dim, dim, bias=False)}))
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary embedding at the tokens' GLOBAL positions ([B, H, S, hd], pos [S])."""
        half = self.hd // 2
        freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
        ang = pos.to(torch.float64)[:, None] * freq[None, :]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def qkv(self, layer, h: torch.Tensor, pos: torch.Tensor):
        b, s, _ = h.shape
        x = layer["n1"](h)
        q = layer["q"](x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = layer["kv"](x).view(b, s, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        return self.rope(q, pos), self.rope(k, pos), v.contiguous()

    def finish(self, layer, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        h = h + layer["o"](att.transpose(1, 2).flatten(2))
        return h + layer["down"](F.silu(layer["up"](layer["n2"](h))))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """Logits of tokens [B, S] at global positions pos [S]; attend(i, q, k, v) is the
        attention of layer i (ring_prefill / ring_decode, or plain SDPA with a cache)."""
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = self.finish(layer, h, attend(i, *self.qkv(layer, h, pos)))
        return self.head(self.norm(h))


def generate_sharded(model: TinyLM, prompt: torch.Tensor, n_new: int, chunk: int,
                     strategy: str) -> tuple[list[list[int]], ring_attn.ShardedKVCache]:
    b = prompt.size(0)
    cache = ring_attn.ShardedKVCache(len(model.layers), b, model.kv_heads, model.hd,
                                     dtype=model.head.weight.dtype)
    last = None
    for start in range(0, prompt.size(1), chunk):
        piece = prompt[:, start:start + chunk]
        pos = cache.prefill_positions(piece.size(1))
        logits = model(piece.index_select(1, pos - start), pos,
                       lambda i, q, k, v: ring_attn.ring_prefill(q, k, v, cache, layer=i,
                                                                 strategy=strategy))
        last = (logits, pos)
    logits, pos = last
    # The rank holding the last prompt position knows the first new token: share it.
    end = prompt.size(1) - 1
    tok = torch.full((b,), -1, dtype=torch.int64)
    if bool((pos == end).any()):
        tok = logits[:, int((pos == end).nonzero()), :].argmax(-1)
    if dist.is_initialized():
        dist.all_reduce(tok, op=dist.ReduceOp.MAX)
    out = [tok]
    for t in range(n_new - 1):
        p = torch.tensor([prompt.size(1) + t])
        logits = model(tok.view(b, 1), p,
                       lambda i, q, k, v: ring_attn.ring_decode(q, k, v, cache, layer=i))
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist(), cache


def generate_single(model: TinyLM, prompt: torch.Tensor, n_new: int) -> list[list[int]]:
    """The same model in one process, no ring_attn: a whole-prompt causal forward, then
    incremental decoding with a concatenated K/V cache and torch SDPA."""
    ks: list = [None] * len(model.layers)
    vs: list = [None] * len(model.layers)

    def attend(i, q, k, v):
        ks[i] = k if ks[i] is None else torch.cat([ks[i], k], 2)
        vs[i] = v if vs[i] is None else torch.cat([vs[i], v], 2)
        causal = ks[i].size(2) == q.size(2)  # the prompt; a decode token sees everything
        return F.scaled_dot_product_attention(q, ks[i], vs[i], is_causal=causal,
                                              enable_gqa=True)
    b, s = prompt.shape
    tok = model(prompt, torch.arange(s), attend)[:, -1].argmax(-1)
    out = [tok]
    for t in range(n_new - 1):
        tok = model(tok.view(b, 1), torch.tensor([s + t]), attend)[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, 1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--strategy", default="auto", choices=["auto", "pass_kv", "pass_q"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--no-check", action="store_true", help="skip the one-process run")
    a = ap.parse_args()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    p = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)  # the same weights and prompt on every rank
    model = TinyLM(vocab=512, dim=128, layers=4, heads=8, kv_heads=2).to(getattr(torch, a.dtype))
    model.eval()
    prompt = torch.randint(0, 512, (a.batch, a.prompt_len))
    with torch.inference_mode():
        t0 = time.perf_counter()
        tokens, cache = generate_sharded(model, prompt, a.new_tokens, a.chunk, a.strategy)
        dt = time.perf_counter() - t0
    mib = cache.memory_bytes() / 2 ** 20
    print(f"rank {rank}/{p}: {a.new_tokens} tokens after a {a.prompt_len}-token prompt in "
          f"{dt:.2f} s; cache {cache.local_length()} of {cache.length()} tokens per layer, "
          f"{mib:.2f} MiB on this rank", flush=True)
    if rank == 0:
        print("tokens[0]:", tokens[0][:16], "...")
        if not a.no_check:
            with torch.inference_mode():
                single = generate_single(model, prompt, a.new_tokens)
            if single == tokens:
                print(f"PASS: P = {p} generated the same {a.new_tokens} tokens as one process")
            else:
                first = next(j for j in range(a.new_tokens)
                             if any(x[j] != y[j] for x, y in zip(single, tokens)))
                print(f"FAIL: tokens differ from the one-process run from step {first}")
                sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
