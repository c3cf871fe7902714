"""The packed balanced layout: packed documents split across P ranks so that every rank
does the same causal work, whatever the mix of document lengths.

Each document of length L is cut, head to tail, into 2P pieces; rank r holds pieces r
and 2P-1-r (zigzag, per document). Under a causal mask within documents, equal pieces
of c tokens give every rank c^2 (2P - 1) + c (c + 1) pairs of that document, and - as for
zigzag over one sequence - the same work at every ring step. A document whose length is
not a multiple of 2P leaves rem = L mod 2P extra tokens; the library places them, never
the user (no per-document divisibility rule, no user padding):

  balanced remainder rule  pieces hold q = L // 2P tokens, and the rem extra tokens go
                           one per rank to the ranks with the fewest tokens so far (ties:
                           the least causal work so far, then the lowest rank), into their
                           TAIL piece (the late, heavier tokens to the neediest ranks);
                           when rem > P the first rem - P of them get a second one in
                           their head piece.

Documents are taken in order and each rank's tokens and work are tracked exactly, so the
extras of one document even out what earlier ones left (1-token documents go round-robin).
Tokens first keeps every rank at floor(T/P) or ceil(T/P) tokens (by induction: extras go
to the lowest ranks, so the spread never exceeds 1), hence at most one padding row per
rank; the work tie-break still keeps causal pairs within 1.0025 max/min on issue 10's mixes
at P = 2..8 (S = 16k; ranking by work first gave 1.002 but up to 81 padding rows at P = 8
on the long-tailed mix). Every rank is padded at its end to S_local = ceil(T/P) with
positions >= T (the token count): they lie in no document, so the kernels give them out 0
and no query sees them.

A rank's tokens are in increasing global order (document by document, head then tail), as
`Run`s (layout.py) so the ring drives this layout like any other. The plan is a pure
function of (cu_seqlens, world_size), built once per pair (lru_cache).

Balanced pairs are not yet balanced time: a kernel tile is skipped only when its queries
and keys share no document, from the min/max of its documents, so pieces shorter than a
tile (L / 2P tokens against the CPU forward's 512-key tiles) make tiles straddle pieces
and compute pairs nobody sees. At S = 16k, P = 4 the tiles computed over the visible pairs
are 2.48 for the uniform mix (contiguous layout: 1.42), 1.53 with 128-key tiles, and 2048
for 1-token documents (contiguous: 512), whose round-robin pieces interleave every rank's
documents (benchmarks/bench_varlen.py measures both).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from .documents import check_cu_seqlens
from .errors import RingAttnError, RingAttnNotImplementedError
from .layout import Run, runs_to_positions

Tensor = torch.Tensor
PACKED = "packed"


class Piece(NamedTuple):
    """`count` consecutive global positions from `start`, of one document, on `rank`."""
    rank: int
    start: int
    count: int


@dataclass(frozen=True)
class PackedPlan:
    """Who holds which tokens of a packed sequence in the packed layout.

    runs[r]:   rank r's global positions in local order, real tokens then padding
               (positions >= total, in no document).
    counts[r]: rank r's real tokens (its first counts[r] local rows); s_local: every
               rank's padded length. pieces[d]: document d's nonempty pieces."""
    cu_seqlens: tuple[int, ...]
    world_size: int
    s_local: int
    counts: tuple[int, ...]
    runs: tuple[tuple[Run, ...], ...]
    pieces: tuple[tuple[Piece, ...], ...] = field(repr=False)

    @property
    def total(self) -> int:
        return self.cu_seqlens[-1]


def _pairs_before(offset: int, n: int) -> int:
    """Causal pairs of n consecutive queries at offsets offset.. within their document:
    query o sees o + 1 keys."""
    return n * offset + n * (n + 1) // 2


def _compact(pieces: Sequence[tuple[int, int]]) -> list[Run]:
    """(start, count) pieces in increasing order -> as few Runs as possible: adjacent
    pieces merge, and single tokens at a constant stride (1-token documents dealt
    round-robin) become one strided run."""
    runs: list[Run] = []
    for start, n in pieces:
        if runs:
            r = runs[-1]
            last = r.start + r.step * (r.count - 1)
            if r.step == 1 and last + 1 == start:
                runs[-1] = Run(r.start, 1, r.count + n)
                continue
            if n == 1 and r.count == 1:
                runs[-1] = Run(r.start, start - r.start, 2)
                continue
            if n == 1 and start - last == r.step:
                runs[-1] = Run(r.start, r.step, r.count + 1)
                continue
        runs.append(Run(start, 1, n))
    return runs


@functools.lru_cache(maxsize=64)
def packed_plan(cu_seqlens: tuple[int, ...], world_size: int) -> PackedPlan:
    """The packed layout of documents cu_seqlens (a validated tuple, see
    documents.check_cu_seqlens) over world_size ranks. Cached: call it with the same
    tuple on every step of a run."""
    p = world_size
    if p < 1:
        raise RingAttnError(f"ring_attn: world_size must be >= 1, got {p}")
    tok = [0] * p
    work = [0] * p
    mine: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    doc_pieces: list[tuple[Piece, ...]] = []
    for a, b in zip(cu_seqlens, cu_seqlens[1:]):
        q, rem = divmod(b - a, 2 * p)
        extra = [0] * (2 * p)
        if rem:
            order = sorted(range(p), key=lambda r: (tok[r], work[r], r))
            for r in order[:min(rem, p)]:
                extra[2 * p - 1 - r] = 1
            for r in order[:max(rem - p, 0)]:
                extra[r] = 1
        here = []
        off = a
        for i in range(2 * p):
            n = q + extra[i]
            if n:
                r = i if i < p else 2 * p - 1 - i
                mine[r].append((off, n))
                here.append(Piece(r, off, n))
                tok[r] += n
                work[r] += _pairs_before(off - a, n)
            off += n
        doc_pieces.append(tuple(here))
    total = cu_seqlens[-1]
    s_local = max(tok)
    runs = []
    for r in range(p):
        rr = _compact(mine[r])
        if tok[r] < s_local:  # padding: unique positions >= total, in no document
            rr.append(Run(total + r * s_local, 1, s_local - tok[r]))
        runs.append(tuple(rr))
    return PackedPlan(cu_seqlens, p, s_local, tuple(tok), tuple(runs), tuple(doc_pieces))


def _plan(cu_seqlens, world_size: int, total: Optional[int] = None,
          device: Optional[torch.device] = None) -> PackedPlan:
    """The plan from a cu_seqlens tensor (validated here: for `total` tokens when given,
    on `device` when given) or from an already validated tuple."""
    if cu_seqlens is None:
        raise RingAttnError("ring_attn: the 'packed' layout needs cu_seqlens (the document "
                            "boundaries of the full packed sequence), got None")
    if not isinstance(cu_seqlens, tuple):
        cu_seqlens = check_cu_seqlens(cu_seqlens, total, "cu_seqlens", device)
    elif total is not None and cu_seqlens[-1] != total:
        raise RingAttnError(f"ring_attn: cu_seqlens must end at the token count {total}, "
                            f"got {cu_seqlens[-1]}")
    return packed_plan(cu_seqlens, world_size)


def packed_runs(rank: int, world_size: int, s_local: Optional[int], cu_seqlens) -> list[Run]:
    """rank's runs in the packed layout (layout.local_runs' "packed" case). s_local, when
    given, must be the plan's padded length."""
    plan = _plan(cu_seqlens, world_size)
    if not 0 <= rank < world_size:
        raise RingAttnError(f"ring_attn: rank {rank} outside [0, {world_size})")
    if s_local is not None and s_local != plan.s_local:
        raise RingAttnError(f"ring_attn: a 'packed' shard of these {len(plan.cu_seqlens) - 1} "
                            f"documents over {world_size} ranks holds {plan.s_local} tokens "
                            f"(padded), got {s_local}")
    return list(plan.runs[rank])


def packed_global_positions(rank: int, world_size: int, cu_seqlens,
                            device: Optional[torch.device] = None) -> Tensor:
    """int64 kernel (global) positions of rank's S_local rows: the packed-sequence index of
    each token, and positions >= T for the padding (in no document)."""
    return runs_to_positions(packed_runs(rank, world_size, None, cu_seqlens), device)


def packed_document_positions(rank: int, world_size: int, cu_seqlens,
                              device: Optional[torch.device] = None) -> Tensor:
    """int64 positions within each token's document (0 at every document start), what
    rotary embeddings need; 0 for the padding rows."""
    plan = _plan(cu_seqlens, world_size)
    g = runs_to_positions(plan.runs[rank])
    cu = torch.tensor(plan.cu_seqlens, dtype=torch.int64)
    doc = torch.searchsorted(cu, g, right=True) - 1
    inside = g < plan.total
    pos = torch.where(inside, g - cu[doc.clamp(max=cu.numel() - 1)], torch.zeros_like(g))
    return pos.to(device)


@functools.lru_cache(maxsize=64)
def _order(cu_seqlens: tuple[int, ...], world_size: int) -> tuple[Tensor, Tensor]:
    """(gather, inverse): the concatenated real tokens of ranks 0..P-1 as global indices,
    and the permutation that puts that concatenation back in global order."""
    plan = packed_plan(cu_seqlens, world_size)
    real = [runs_to_positions(r[:-1] if plan.counts[i] < plan.s_local else r)
            for i, r in enumerate(plan.runs)]
    gather = torch.cat(real) if real else torch.empty(0, dtype=torch.int64)
    inverse = torch.empty_like(gather)
    inverse[gather] = torch.arange(gather.numel())
    return gather, inverse


def shard_packed(x: Tensor, rank: int, world_size: int, cu_seqlens, dim: int) -> Tensor:
    """rank's S_local rows of the full packed tensor x along dim (zeros for padding)."""
    dim = dim % x.dim()
    plan = _plan(cu_seqlens, world_size, x.size(dim))
    runs = plan.runs[rank]
    real = runs[:-1] if plan.counts[rank] < plan.s_local else runs
    mine = x.index_select(dim, runs_to_positions(real, x.device))
    pad = plan.s_local - plan.counts[rank]
    if pad == 0:
        return mine
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([mine, x.new_zeros(shape)], dim)


def unshard_packed(shards: Sequence[Tensor], cu_seqlens, dim: int) -> Tensor:
    """The full packed tensor (T rows along dim) from every rank's shard, padding dropped:
    the exact inverse of shard_packed."""
    plan = _plan(cu_seqlens, len(shards))
    dim = dim % shards[0].dim()
    for r, s in enumerate(shards):
        if s.size(dim) != plan.s_local:
            raise RingAttnError(f"ring_attn: shard {r} holds {s.size(dim)} rows along dim "
                                f"{dim}, the 'packed' layout gives {plan.s_local}")
    real = torch.cat([s.narrow(dim, 0, n) for s, n in zip(shards, plan.counts)], dim)
    _, inverse = _order(plan.cu_seqlens, plan.world_size)
    return real.index_select(dim, inverse.to(real.device))


# --- Balance: exact causal pairs per rank, for the packed and the contiguous layouts ----

def contiguous_pieces(cu_seqlens: tuple[int, ...], world_size: int
                      ) -> tuple[tuple[Piece, ...], ...]:
    """Per document, its pieces in the contiguous layout (rank r holds tokens
    [r*C, (r+1)*C), C = ceil(T / P): the sequence padded at its end to a multiple of P,
    as pad_for_ring does)."""
    c = -(-cu_seqlens[-1] // world_size) if cu_seqlens[-1] else 1
    out = []
    for a, b in zip(cu_seqlens, cu_seqlens[1:]):
        here = []
        t = a
        while t < b:
            r = t // c
            n = min(b, (r + 1) * c) - t
            here.append(Piece(r, t, n))
            t += n
        out.append(tuple(here))
    return tuple(out)


def block_pairs(cu_seqlens: tuple[int, ...], world_size: int, layout: str,
                is_causal: bool = True) -> list[list[int]]:
    """pairs[r][s]: visible (query, key) pairs of rank r's queries with rank s's keys
    (same document, and key <= query when causal): the work of the ring block (r, s).
    Pieces of one document are disjoint ranges, so a key piece before the query piece is
    seen whole, after it not at all, and a piece against itself is a triangle."""
    if layout == PACKED:
        pieces = packed_plan(cu_seqlens, world_size).pieces
    elif layout == "contiguous":
        pieces = contiguous_pieces(cu_seqlens, world_size)
    else:
        raise RingAttnError(f"ring_attn: block_pairs covers 'packed' and 'contiguous', "
                            f"got {layout!r}")
    pairs = [[0] * world_size for _ in range(world_size)]
    for doc in pieces:
        for qp in doc:
            row = pairs[qp.rank]
            for kp in doc:
                if not is_causal or kp.start + kp.count <= qp.start:
                    row[kp.rank] += qp.count * kp.count
                elif kp.start == qp.start:
                    row[kp.rank] += qp.count * (qp.count + 1) // 2
    return pairs


@dataclass(frozen=True)
class Balance:
    """Causal work per rank (exact pair counts) and what the ring's steps make of it.

    per_rank[r]:  pairs rank r computes over the whole ring (its queries, every key).
    imbalance:    max / min of per_rank (1.0 = perfect; inf when a rank has none).
    step_factor:  sum over ring steps of the slowest rank's pairs, over the ideal
                  total / P: how much longer the pass-KV ring takes than a perfectly
                  balanced one if compute were exactly proportional to pairs."""
    layout: str
    world_size: int
    per_rank: tuple[int, ...]
    imbalance: float
    step_factor: float


def balance(cu_seqlens: tuple[int, ...], world_size: int, layout: str = PACKED) -> Balance:
    """The schedule's balance figures of `layout` for these documents, causal."""
    pairs = block_pairs(cu_seqlens, world_size, layout)
    per_rank = tuple(sum(row) for row in pairs)
    lo, hi = min(per_rank), max(per_rank)
    imbalance = hi / lo if lo else (1.0 if hi == 0 else float("inf"))
    p = world_size
    slowest = sum(max(pairs[r][(r - t) % p] for r in range(p)) for t in range(p))
    total = sum(per_rank)
    step_factor = slowest * p / total if total else 1.0
    return Balance(layout, p, per_rank, imbalance, step_factor)


def example_mixes(total: int, world_size: int, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """The document mixes the balance tests and benchmarks/bench_varlen.py report on, as
    cu_seqlens tuples of `total` tokens (issue 10's list):
      uniform      lengths uniform in [512, 4096] (the last one whatever remains)
      long_tail    one document of total / 2 among many short ones (log-uniform 1..512)
      single_token every document 1 token
      long_doc     one document of 1.5 total / P (longer than a contiguous shard) among
                   uniform 512..4096 ones"""
    g = torch.Generator().manual_seed(seed)

    def fill(n: int, draw) -> list[int]:
        out: list[int] = []
        while n > 0:
            length = min(n, draw())
            out.append(length)
            n -= length
        return out

    def uniform() -> int:
        return int(torch.randint(512, 4097, (), generator=g))

    def short() -> int:
        return int(torch.exp(torch.rand((), generator=g) * torch.log(torch.tensor(512.0)))) or 1

    def around(big: int, rest: list[int]) -> list[int]:
        at = int(torch.randint(0, len(rest) + 1, (), generator=g))
        return rest[:at] + [big] + rest[at:]

    half, long = total // 2, min(total, 3 * total // (2 * world_size))
    lengths = {
        "uniform": fill(total, uniform),
        "long_tail": around(half, fill(total - half, short)),
        "single_token": [1] * total,
        "long_doc": around(long, fill(total - long, uniform)),
    }
    return {name: tuple([0] + torch.tensor(ls, dtype=torch.int64).cumsum(0).tolist())
            for name, ls in lengths.items()}


def check_packed_arguments(cu_seqlens: object, attn_mask: object) -> None:
    """What a ring call with layout 'packed' needs besides valid boundaries: cu_seqlens
    itself, and no attn_mask (documents already separate the tokens, and the padding rows
    have no column in a [.., S_local, T] mask)."""
    if cu_seqlens is None:
        raise RingAttnError("ring_attn: layout 'packed' needs cu_seqlens (the documents it "
                            "balances), got None")
    if attn_mask is not None:
        raise RingAttnNotImplementedError(
            "ring_attn: attn_mask with layout 'packed' is not supported (documents already "
            "separate the tokens; its padding rows lie in no document)")
