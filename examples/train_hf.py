"""Fine-tune a tiny random Hugging Face Llama with its sequence split across ranks.

    torchrun --standalone --nproc-per-node 2 examples/train_hf.py            # CPU, gloo
    torchrun --standalone --nproc-per-node 2 examples/train_hf.py --check    # + 1-process run
    torchrun --standalone --nproc-per-node 2 examples/train_hf.py --checkpointing reentrant

The model is transformers' own LlamaForCausalLM (built from a LlamaConfig, random weights,
nothing downloaded). Sequence parallelism is two lines from ring_attn.integrations.transformers:

    model = prepare_model(model, layout="zigzag")       # attention + masks -> the ring
    out = model(**shard_batch(batch, layout="zigzag"))  # this rank's tokens, global
                                                        # positions, labels shifted on the
                                                        # full sequence
then out.loss.backward() and all_reduce_gradients(model): each rank's loss is its share of
the full-sequence loss (shard_batch passes the global num_items_in_batch), so the sum of
the ranks' gradients is the single-process gradient.

Data: byte-level tokens of the text below, windows at offsets drawn from a seeded generator
(identical on every rank); every second row is shorter and right-padded (attention_mask 0,
labels -100), so the key-padding path is exercised at every step.

--check also trains a copy in one process on the full batch with transformers' SDPA
attention, same weights, same batches, and requires the losses to agree at every step,
|ring - single| <= 1e-5 * |single| (transformers computes the loss in float32 in both
dtypes), and the parameters after the last step: largest relative difference <= 1e-4
float32, 1e-10 float64.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

try:
    import ring_attn  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ring_attn.integrations.transformers import (all_reduce_gradients, prepare_model,  # noqa: E402
                                                 shard_batch)

TEXT = (b"Most people who need long context train Hugging Face models. With the sequence "
        b"split across ranks, each rank embeds its own tokens, rotates them at their global "
        b"positions, and sends its keys and values around the ring; padding reaches every "
        b"rank as one key mask, and the labels are shifted before the sequence is cut. ")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# transformers computes the cross-entropy in float32 whatever the model dtype
# (ForCausalLMLoss upcasts with .float()), so the loss agrees to float32 rounding in both;
# the parameters show the float64 run's float64 accuracy.
LOSS_RTOL = 1e-5
PARAM_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--checkpointing", default="off",
                   choices=["off", "reentrant", "non_reentrant"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with 1-process training")
    return p.parse_args()


def batches(n: int, s: int, seed: int):
    """Full batches (identical on every rank): input_ids, attention_mask, labels."""
    data = torch.tensor(list(TEXT * (s // len(TEXT) + 2)), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(TEXT), (n,), generator=g)
        ids = torch.stack([data[i:i + s] for i in start.tolist()])
        mask = torch.ones_like(ids)
        for row in range(1, n, 2):   # every second row: right-padded to a random length
            mask[row, int(torch.randint(s // 2, s, (1,), generator=g)):] = 0
        yield dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask,
                   labels=ids.masked_fill(mask == 0, -100))


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(args.seq_len, 128), use_cache=False)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = LlamaForCausalLM(cfg).to(DTYPES[args.dtype])
    if args.checkpointing != "off":
        model.activation_checkpointing_enable(
            {"use_reentrant": args.checkpointing == "reentrant"})
    return model.train()


def main() -> int:
    args = parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = build_model(args)
    check = args.check and rank == 0
    if check:
        ref = copy.deepcopy(model)       # transformers' own SDPA on the full sequence
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr)
    prepare_model(model, layout=args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(args.batch, args.seq_len, args.seed)
    losses: list[tuple[float, float]] = []
    bar = tqdm(range(args.steps), disable=rank != 0, dynamic_ncols=True,
               desc=f"{world} ranks x {args.seq_len // world} tokens")
    t0 = time.perf_counter()
    for _ in bar:
        batch = next(data)
        out = model(**shard_batch(batch, layout=args.layout))
        opt.zero_grad()
        out.loss.backward()
        all_reduce_gradients(model)
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)           # the ranks' shares sum to the full-sequence loss
        if check:
            ref_loss = ref(**batch).loss
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            losses.append((loss.item(), ref_loss.item()))
            bar.set_postfix(loss=f"{loss.item():.4f}", single=f"{ref_loss.item():.4f}")
        else:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    ok = True
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s, final loss "
              f"{loss.item():.4f} ({world} ranks x {args.seq_len // world} tokens, "
              f"{args.dtype}, layout {args.layout}, checkpointing {args.checkpointing})")
    if check:
        rtol = LOSS_RTOL
        print(f"step   ring loss           single-process loss   rel diff  (rtol {rtol:g})")
        for i, (ours, single) in enumerate(losses):
            rel = abs(ours - single) / abs(single)
            ok &= rel <= rtol
            print(f"{i:4d}   {ours:.12f}   {single:.12f}        {rel:.1e}"
                  f"{'' if rel <= rtol else '  <-- too large'}")
        with torch.no_grad():
            drift = max(float((p - q).norm() / q.norm()) for p, q in
                        zip(model.parameters(), ref.parameters()))
        ok &= drift <= PARAM_RTOL[DTYPES[args.dtype]]
        print(f"largest relative parameter difference after {args.steps} steps: {drift:.1e} "
              f"(rtol {PARAM_RTOL[DTYPES[args.dtype]]:g})")
        print("PASS: ring training matches single-process training" if ok else "FAIL")
    flag = torch.tensor([int(ok)])
    dist.broadcast(flag, src=0)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
