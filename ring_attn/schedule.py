"""The pass-KV ring schedule: which block each rank computes at each step, which K/V rows
travel where, and how the dK/dV of the backward get home. Pure: tested without a process
group in tests/test_schedule.py.

Blocks. Rank r's queries meet the K/V shard of rank s in one block. Its status comes from
the visibility rule of the kernels (visibility.py mirrors csrc/common/visibility.h): the
band (causal is its right bound 0, a sliding window its left), and documents. A block no
visible pair reaches is skipped (no kernel call); any other is narrowed to the rectangle
of local rows that holds every visible pair, and run without the rule when every pair in
it is visible. For plain causal attention this gives what the ring always did:

  contiguous  s < r: whole block, unmasked; s == r: causal; s > r: skipped
              -> rank r works r + 1 steps: rank P-1 does P times rank 0's work.
  zigzag      shards hold chunks (r, 2P-1-r), c = S_local / 2 tokens each.
              s == r: whole block, causal; s < r: all queries x the FIRST K/V chunk;
              s > r: the SECOND query chunk x all K/V: every rank does 2c^2 pairs a step.
  striped     whole block, causal: a triangle of S_local(S_local +- 1)/2 pairs.

A sliding window (left < S) narrows further: with the contiguous layout rank r's
queries see only the last `left` keys of rank r-1, and nothing of ranks more than
ceil(left / S_local) away. Zigzag's chunks have neighbours on both sides (twice the hops),
striped's on every rank (no skip at all): layout.resolve_layout says which to pick.

Non-finite inputs. A block is skipped or narrowed only when the K/V shard it reads and
the rank's query rows are finite: torch's math backend masks additively, so a NaN or inf
in a masked key still reaches the output (NaN + -inf = NaN; 0 * NaN = NaN). When the
source's shard may hold NaN/inf (kv_nonfinite, agreed across ranks in validate.py) or the
rank's rows may meet one (rows_nonfinite: NaN/inf in q, or in the backward in dout or out,
or a NaN/+inf float mask), the block is computed whole with the rule.

Streams and hops. Step 0 computes the own block. Then K/V travel in up to two streams:
forward (rank r sends to r+1 and at hop t holds the shard of r - t) and backward (sends
to r-1, holds the shard of r + t). Without a window the forward stream runs P-1 hops, the
classic ring. With one, only the distances some rank needs are travelled: the hop counts
(H_fwd, H_bwd) are the smallest that cover every non-skipped block (contiguous, causal,
window left: ceil(left / S_local) forward hops, none backward). At hop t a rank receives
only the rows of the shard that it or a rank further down the stream still needs (a
suffix of the shard for a window), so bytes shrink with the window too.

dK/dV. The owner keeps its own block's gradient. Each shard's accumulator starts at hop 1
(zeros plus that rank's partial), travels with the K/V along the stream, each rank adding
its partial, and when the K/V stop travelling the last rank sends it straight home to the
owner at the end of the stream (for the full ring that is one hop: rank s-1 to s).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

from .layout import check_layout, check_local_length, local_runs
from .visibility import Visibility, needed_rows


@dataclass(frozen=True)
class BlockStep:
    """What rank computes at one step: local query rows [q_start, q_start + q_len) against
    rows [k_start, k_start + k_len) of the K/V shard of rank `source`."""
    step: int
    rank: int
    source: int
    skip: bool      # nothing visible: no kernel call at all
    q_start: int
    q_len: int
    k_start: int
    k_len: int
    band: bool      # the kernel applies the rule (causal, window, documents); False when
                    # every pair of the rectangle is visible


@dataclass(frozen=True)
class Rows:
    """Local rows [start, start + count) of the K/V shard of rank `source`."""
    source: int
    start: int
    count: int


@dataclass(frozen=True)
class Msg:
    peer: int       # group rank sent to / received from
    rows: Rows


@dataclass(frozen=True)
class Step:
    """One step of one rank: the block; the K/V rows it holds; the exchange posted before
    computing (bringing the next step's K/V); in the backward, the dK/dV accumulator of
    the held shard (acc: its rows; acc_in: it arrives from the previous rank, else it
    starts at zero), where it goes after the step (acc_out, None: its journey ends here),
    and at the end of a stream the accumulators sent home and the own one received."""
    blk: BlockStep
    hop: int
    held: Rows
    kv_send: Optional[Msg] = None
    kv_recv: Optional[Msg] = None
    acc: Optional[Rows] = None
    acc_in: Optional[Msg] = None
    acc_out: Optional[Msg] = None
    home_send: tuple[Msg, ...] = ()
    home_recv: Optional[Msg] = None


@dataclass(frozen=True)
class RingPlan:
    steps: tuple[Step, ...]
    hops: tuple[int, int]   # (forward, backward) hops of the K/V streams


def send_peer(rank: int, world_size: int) -> int:
    return (rank + 1) % world_size


def recv_peer(rank: int, world_size: int) -> int:
    return (rank - 1) % world_size


def source_rank(rank: int, step: int, world_size: int) -> int:
    """Whose K/V shard rank holds at hop `step` of the forward stream."""
    return (rank - step) % world_size


def _block(vis: Visibility, runs: list, step: int, r: int, s: int, forced: bool,
           s_local: int) -> BlockStep:
    if s == r or forced:
        return BlockStep(step, r, s, False, 0, s_local, 0, s_local, vis.has_rule)
    qs, ql, ks, kl, band = needed_rows(vis, runs[r], runs[s])
    return BlockStep(step, r, s, ql == 0, qs, ql, ks, kl, band)


@functools.lru_cache(maxsize=64)
def _plans(world_size: int, layout: str, s_local: int, vis: Visibility,
           kv_nonfinite: tuple[bool, ...], rows_nonfinite: tuple[bool, ...]
           ) -> tuple[RingPlan, ...]:
    p = world_size
    runs = [local_runs(r, p, s_local, layout, vis.cu_seqlens) for r in range(p)]
    kv_bad = kv_nonfinite or (False,) * p
    rows_bad = rows_nonfinite or (False,) * p
    need = {(r, s): _block(vis, runs, 0, r, s, kv_bad[s] or rows_bad[r], s_local)
            for r in range(p) for s in range(p)}
    dists = {(r - s) % p for (r, s), b in need.items() if r != s and not b.skip}
    # Smallest (H_fwd, H_bwd) covering every needed forward distance t: t <= H_fwd or
    # P - t <= H_bwd; ties go to the forward stream (the classic ring).
    hops = min(((hf, max([p - t for t in dists if t > hf], default=0)) for hf in range(p)),
               key=lambda h: (h[0] + h[1], -h[0]))
    steps: list[list[Step]] = [[_own_step(need[r, r])] for r in range(p)]
    for d, h in ((1, hops[0]), (-1, hops[1])):
        if h > 0:
            _stream(steps, need, p, s_local, d, h)
    return tuple(RingPlan(tuple(st), hops) for st in steps)


def _own_step(blk: BlockStep) -> Step:
    return Step(blk, 0, Rows(blk.rank, 0, blk.k_len))


def _stream(steps: list[list[Step]], need: dict, p: int, s_local: int, d: int,
            h: int) -> None:
    """Append the h hops of the stream in direction d (+1: send to r+1) to every rank."""
    def src(r: int, t: int) -> int:
        return (r - d * t) % p

    @functools.lru_cache(maxsize=None)
    def hold(r: int, t: int) -> Rows:
        """Rows of shard src(r, t) that r or a rank further down the stream needs: r's
        own need and what the next rank holds of the same shard at the next hop."""
        s = src(r, t)
        if t == 0:
            return Rows(s, 0, s_local)
        b = need[r, s]
        spans = [] if b.skip else [(b.k_start, b.k_start + b.k_len)]
        if t < h:
            later = hold((r + d) % p, t + 1)
            spans += [(later.start, later.start + later.count)] if later.count else []
        if not spans:
            return Rows(s, 0, 0)
        lo = min(a for a, _ in spans)
        return Rows(s, lo, max(b for _, b in spans) - lo)

    def journey_end(s: int) -> int:
        """The last hop at which shard s's K/V (and so its accumulator) still travel."""
        t = 0
        while t < h and hold((s + d * (t + 1)) % p, t + 1).count > 0:
            t += 1
        return t

    ends = [journey_end(s) for s in range(p)]
    for r in range(p):
        nxt, prv = (r + d) % p, (r - d) % p
        for t in range(1, h + 1):
            s = src(r, t)
            held = hold(r, t)
            blk = need[r, s]
            blk = BlockStep(len(steps[r]), r, s, blk.skip or held.count == 0, blk.q_start,
                            blk.q_len, blk.k_start, blk.k_len, blk.band)
            acc = hold((s + d) % p, 1) if held.count > 0 else None
            step = Step(blk, t, held, acc=acc,
                        acc_in=Msg(prv, acc) if acc is not None and t > 1 else None,
                        acc_out=(Msg(nxt, acc) if acc is not None and t < ends[s] else None))
            if t == h:  # end of the stream: finished accumulators go home
                step = dataclasses.replace(step, home_send=tuple(
                    Msg((r - d * ends[x]) % p, hold((x + d) % p, 1)) for x in range(p)
                    if ends[x] > 0 and (x + d * ends[x]) % p == r),
                    home_recv=(Msg((r + d * ends[r]) % p, hold(nxt, 1)) if ends[r] > 0
                               else None))
            steps[r].append(step)
        # The exchange posted before computing hop t brings hop t + 1's rows.
        first = len(steps[r]) - h - 1
        for t in range(h):
            i = first + t
            send, recv = hold(nxt, t + 1), hold(r, t + 1)
            steps[r][i] = dataclasses.replace(steps[r][i],
                                   kv_send=Msg(nxt, send) if send.count else None,
                                   kv_recv=Msg(prv, recv) if recv.count else None)


def ring_schedule(rank: int, world_size: int, layout: str, s_local: int,
                  vis: Visibility = Visibility(), kv_nonfinite: tuple[bool, ...] = (),
                  rows_nonfinite: tuple[bool, ...] = ()) -> RingPlan:
    """rank's steps. kv_nonfinite[s]: rank s's K/V shard may hold NaN/inf;
    rows_nonfinite[r]: rank r's query rows may (both empty: all finite)."""
    check_layout(layout)
    check_local_length(s_local, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"ring_attn: rank {rank} outside [0, {world_size})")
    return _plans(world_size, layout, s_local, vis, tuple(kv_nonfinite),
                  tuple(rows_nonfinite))[rank]


def ring_plan(rank: int, world_size: int, layout: str, is_causal: bool, s_local: int,
              kv_nonfinite: tuple[bool, ...] = (), rows_nonfinite: bool = False,
              window: Optional[tuple[int, int]] = None,
              cu_seqlens: Optional[tuple[int, ...]] = None) -> list[BlockStep]:
    """rank's blocks, one per step (the first is always the whole own block). Without a
    window every rank runs P steps; rows_nonfinite: this rank's query rows may be
    non-finite (the other ranks' are taken as finite)."""
    rows = tuple(r == rank and rows_nonfinite for r in range(world_size))
    vis = Visibility.of(is_causal, window, cu_seqlens)
    return [st.blk for st in ring_schedule(rank, world_size, layout, s_local, vis,
                                           kv_nonfinite, rows if rows_nonfinite else ()).steps]


def plan_step(rank: int, step: int, world_size: int, layout: str, is_causal: bool,
              s_local: int, source_nonfinite: bool = False) -> BlockStep:
    """The block of the classic ring's step (P steps, no window)."""
    if not 0 <= step < world_size:
        raise ValueError(f"ring_attn: step {step} outside [0, {world_size})")
    s = source_rank(rank, step, world_size)
    flags = tuple(x == s and source_nonfinite for x in range(world_size))
    return ring_plan(rank, world_size, layout, is_causal, s_local,
                     flags if source_nonfinite else ())[step]
