"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Rank u of U holds the CONTIGUOUS tokens [u * S/U, (u+1) * S/U) of every head (the
"contiguous" layout of ring_attn.layout; shard with `ring_attn.shard(x, layout=
"contiguous", group=group)`). Forward:

    q, k, v  [B, H, S/U, D]  --all_to_all-->  [B, H/U, S, D]   heads u*H/U .. (u+1)*H/U - 1,
                                                               every token, in global order
    out      = attention over the whole sequence for those heads (one ring_attn kernel call
               here; the ring across the other mesh dim in the hybrid, hybrid.py)
    out      [B, H/U, S, Dv]  --all_to_all-->  [B, H, S/U, Dv]

Backward: the transposed all-to-alls around the kernel's backward (dout to head shards;
dq, dk, dv back to sequence shards). q, k and v travel in ONE all_to_all_single (packed per
destination), as do dq, dk and dv.

Bytes sent per rank (the 1/U a rank keeps does not travel), |x| = this rank's shard of x:
    forward  (U-1)/U * (|q| + |out|) + kv_share * (|k| + |v|)
    backward the same again (dout out, dq dk dv back; the gradients in the input dtype)
with kv_share = (U-1)/U when Hk >= U. With MHA that is 4 (U-1)/U |shard| per direction,
independent of the sequence length per rank in units of |shard| (the ring's is P-1 times
|K/V shard|, see ring.py).

GQA: K/V heads are scattered as far as they go. Hk % U == 0: each rank receives Hk/U whole
K/V heads (its query heads' group). U % Hk == 0 (Hk < U): each K/V head goes only to the
U/Hk ranks whose query heads read it, so kv_share = (U-1)/Hk: every rank sends its S/U
tokens of one K/V head to each of the U-1 others, (U-1) * S/U * (D + Dv) elements per
batch row: U/Hk times the MHA-free share, but Hq/U times less than repeating K/V to Hq
heads before the all-to-all would send. The backward sums the U/Hk replicas' dK/dV in the
accumulation dtype. Other head counts (Hq % U != 0, or Hk and U not multiples of one
another) are refused with an error naming them.

Agreement: before any transfer, one all_gather of 22 int64 per rank over the Ulysses group
(and, in the hybrid, one more over the ring group, so a problem anywhere in the 2-D mesh
reaches every rank) compares shapes, heads, dtype, causal, scale, dropout, layout, mask
presence and the mesh shape; any rank's bad input or a disagreement raises on every rank.
The backward starts with validate.agree_on_backward over the same group(s); after the
dout all-to-all, refuse_saturated makes every rank raise when any holds a saturated row
with a gradient (the kernels' backward refuses one; a lone raise would hang the rest).

Dropout: the kernels' RNG is keyed by (seed, batch, head, query position, key position);
each Ulysses rank passes the global index of its first query head (dropout_head_offset),
so head u*H/U + j draws that head's single-device mask, and with the same torch seed the
output equals one device's. In the hybrid the ring across takes the seed Ulysses agreed
on (torch's generator moves once, as on one device) and the same head offset.

Masks: only key masks broadcastable to [B|1, Hq|1, 1, S] (bool, or additive in the query
dtype), identical on every rank: after the all-to-all each rank holds all S queries of its
heads, so a mask with query rows would have to be gathered (S^2 / U per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import ops
from ..comm import GroupInfo, group_info
from ..errors import SATURATED, RingAttnError, RingAttnException, refuse_double_backward
from ..functional import draw_seed
from ..layout import LAYOUTS, check_layout, required_multiple
from ..merge import acc_dtype, saturated_rows
from ..validate import (_DEVICES, _DTYPES, _ROW, RingInputError, _check_equal, _gather,
                        _local_check, _next_call, _show, agree_on_backward,
                        check_mask_values, float_bits)

Tensor = torch.Tensor


# --- Which heads go where (pure). ----------------------------------------------------------

@dataclass(frozen=True)
class HeadPlan:
    """The heads of a [B, heads, S_local, D] tensor that go to each Ulysses rank: `count`
    heads starting at starts[j] to rank j."""
    heads: int
    count: int
    starts: tuple[int, ...]

    @property
    def partition(self) -> bool:
        """Every head to exactly one rank (no K/V replication)."""
        return self.starts == tuple(j * self.count for j in range(len(self.starts)))


def head_plans(hq: int, hk: int, u: int) -> tuple[HeadPlan, HeadPlan]:
    """(query/output plan, key/value plan) for Hq query and Hk K/V heads over U ranks."""
    if hq % u != 0:
        raise RingAttnError(f"ring_attn: Ulysses needs query heads divisible by the Ulysses "
                            f"group size {u}, got {hq} query heads")
    hl = hq // u
    qplan = HeadPlan(hq, hl, tuple(j * hl for j in range(u)))
    if hk % u == 0:
        c = hk // u
        return qplan, HeadPlan(hk, c, tuple(j * c for j in range(u)))
    if u % hk == 0:
        # Rank j's query heads j*hl .. all read K/V head j // (u // hk) (hq/hk = hl * u/hk).
        return qplan, HeadPlan(hk, 1, tuple(j // (u // hk) for j in range(u)))
    raise RingAttnError(f"ring_attn: Ulysses needs key/value heads ({hk}) to be a multiple "
                        f"or a divisor of the Ulysses group size ({u})")


# --- The all-to-alls. -----------------------------------------------------------------------

def _exchange(pieces: list[Tensor], info: GroupInfo) -> Tensor:
    """pieces ordered destination-major (the same total per destination) -> one
    all_to_all_single; returns the received buffer, source-major."""
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)
    return recv


def _split(recv: Tensor, u: int, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """The received buffer as one [U, *shape] view per tensor (source-major)."""
    per_src = recv.view(u, -1)
    views, offset = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        views.append(per_src[:, offset:offset + n].view(u, *shape))
        offset += n
    return views


def to_heads(xs: list[Tensor], plans: list[HeadPlan], info: GroupInfo) -> list[Tensor]:
    """[B, H, S_local, D] sequence shards -> [B, count, U * S_local, D] head shards, tokens in
    the order of the ranks (rank 0's first)."""
    u = info.world_size
    pieces = [x.narrow(1, p.starts[j], p.count) for j in range(u) for x, p in zip(xs, plans)]
    shapes = [(x.size(0), p.count, x.size(2), x.size(3)) for x, p in zip(xs, plans)]
    views = _split(_exchange(pieces, info), u, shapes)
    return [v.permute(1, 2, 0, 3, 4).reshape(b, c, u * s, d)
            for v, (b, c, s, d) in zip(views, shapes)]


def to_sequence(ys: list[Tensor], plans: list[HeadPlan], info: GroupInfo) -> list[Tensor]:
    """The transpose of to_heads: [B, count, U * S_local, D] -> [B, H, S_local, D]; a head
    that went to several ranks (replicated K/V) gets the sum of what they send back."""
    u = info.world_size
    s = ys[0].size(2) // u
    pieces = [y.narrow(2, j * s, s) for j in range(u) for y in ys]
    shapes = [(y.size(0), p.count, s, y.size(3)) for y, p in zip(ys, plans)]
    out = []
    for v, y, p in zip(_split(_exchange(pieces, info), u, shapes), ys, plans):
        if p.partition:
            out.append(v.permute(1, 0, 2, 3, 4).reshape(y.size(0), p.heads, s, y.size(3)))
            continue
        acc = torch.zeros(y.size(0), p.heads, s, y.size(3), dtype=acc_dtype(y.dtype),
                          device=y.device)
        for j in range(u):
            acc.narrow(1, p.starts[j], p.count).add_(v[j])
        out.append(acc.to(y.dtype))
    return out


@dataclass(frozen=True)
class Exchange:
    """What the all-to-all Functions need: the Ulysses group, the head plans, and for the
    backward's agreement the groups to agree over with this call's numbers in them."""
    info: GroupInfo
    plans: tuple[HeadPlan, ...]
    agree_over: tuple[tuple[GroupInfo, int], ...] = ()


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: Exchange, *xs: Tensor):
        ctx.ex = ex
        return tuple(to_heads(list(xs), list(ex.plans), ex.info))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, *to_sequence(list(grads), list(ctx.ex.plans), ctx.ex.info))


class _ToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: Exchange, y: Tensor, lse: Tensor) -> Tensor:
        ctx.ex = ex
        ctx.save_for_backward(lse)
        return to_sequence([y], list(ex.plans), ex.info)[0]

    @staticmethod
    def backward(ctx, dout: Tensor):
        # The first transfer of this call's backward: every rank of the mesh must be in the
        # backward of the same call (and none may ask for a double backward) before it.
        ex = ctx.ex
        if not ex.agree_over:
            refuse_double_backward()
        no_flag = torch.zeros((), dtype=torch.bool)
        error: Optional[BaseException] = None
        for info, call in ex.agree_over:
            # A rank whose row refused still joins its column's gather, with call number
            # -1, so the ranks of the other rows see a disagreement and raise too.
            try:
                agree_on_backward(info, call if error is None else -1, dout,
                                  torch.is_grad_enabled(), no_flag)
            except RingAttnException as e:
                error = error or e
        if error is not None:
            raise error
        dout_h = to_heads([dout], list(ex.plans), ex.info)[0]
        refuse_saturated(ctx.saved_tensors[0], dout_h, [info for info, _ in ex.agree_over])
        return None, dout_h, None


def refuse_saturated(lse: Tensor, dout: Tensor, groups: list[GroupInfo]) -> None:
    """Raise on every rank of the mesh when any rank holds a saturated row with a gradient
    (merge.saturated_rows): the kernels' backward refuses such a row, and a rank that
    raised alone would leave the others waiting in the next all-to-all until the process
    group's timeout. The row lives on one rank of the mesh (its head's Ulysses rank, its
    position's ring rank), so a MAX over the Ulysses group and then over the ring group
    reaches every rank. Cost: one all_reduce of one int per group and one host read."""
    flag = saturated_rows(lse, dout).to(torch.int32).reshape(1)
    for info in groups:
        if info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.group)
    if bool(flag.item()):
        raise RingAttnError(f"{SATURATED} (a rank of this mesh holds the row; every rank "
                            f"stops)")


# --- Agreement before any transfer. ---------------------------------------------------------

_MAGIC = 0x554C5953  # "ULYS": tells a Ulysses vector from the ring's ("RING") on one group
_FIELDS = ["call number", "batch", "query heads", "key/value heads", "head dim",
           "value head dim", "query shard length", "key/value shard length", "dtype",
           "device type", "layout", "is_causal", "scale", "dropout_p", "attn_mask presence",
           "attn_mask dtype", "Ulysses size", "ring size",
           "index along the other mesh dim (ring rank within a Ulysses group, Ulysses "
           "rank within a ring group)"]
_MESH = slice(2 + len(_FIELDS) - 3, 2 + len(_FIELDS))  # the mesh fields in the vector
# [MAGIC, error flag, *fields, zeros, seed]: padded to the ring's vector length, so a
# Ulysses call paired by mistake with a ring call on the same group fails the phase check
# instead of hanging.
_PAD = _ROW - (2 + len(_FIELDS) + 1)
assert _PAD >= 0


@dataclass(frozen=True)
class Agreed:
    scale: float
    dropout_p: float
    seed: Optional[Tensor]   # row rank 0's dropout seed (int64 scalar); None w/o dropout
    mask: Optional[Tensor]   # 4-D key mask [B|1, Hq|1, 1, S]
    plans: tuple[HeadPlan, HeadPlan]
    calls: tuple[tuple[GroupInfo, int], ...]  # (group, this call's number) agreed over
    head_offset: int = 0     # global index of this rank's first query head (dropout RNG)


def key_mask(mask: Optional[Tensor], q: Tensor, s_global: int) -> Optional[Tensor]:
    """attn_mask as a 4-D [B|1, Hq|1, 1, S] view, or raise naming the expected shape."""
    if mask is None:
        return None
    check_mask_values(mask, q)
    want = [q.size(0), q.size(1), 1, s_global]
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() <= 4 else None
    if m is None or any(m.size(i) not in (1, want[i]) for i in range(3)) or m.size(3) != want[3]:
        raise RingAttnError(
            f"ring_attn: Ulysses and the hybrid take only key masks, broadcastable to "
            f"[B|1, Hq|1, 1, S] = {want} (global key order, the same on every rank; each "
            f"rank computes all S queries of its heads, so rows per query would have to be "
            f"gathered), got attn_mask of shape {tuple(mask.shape)}")
    return m


def _check_here(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool,
                scale: Optional[float], dropout_p: float, layout: str, row: GroupInfo,
                ring_size: int):
    """This rank's own checks; returns (scale, dropout_p, 4-D mask, head plans)."""
    check_layout(layout)
    # validate's checks of q, k, v (torch's exception types); "contiguous": the zigzag
    # evenness applies to the ring shard, U * S_local, checked below.
    _, scale, dropout_p = _local_check(q, k, v, None, is_causal=is_causal, scale=scale,
                                       dropout_p=dropout_p, layout="contiguous", info=row)
    u = row.world_size
    plans = head_plans(q.size(1), k.size(1), u)
    m = required_multiple(ring_size, layout) // ring_size  # zigzag: the ring shard is even
    if (u * q.size(2)) % m != 0:
        raise RingAttnError(f"ring_attn: a {layout!r} ring shard holds two equal chunks, so "
                            f"Ulysses size x shard length ({u} x {q.size(2)}) must be even")
    s_global = q.size(2) * u * ring_size
    return scale, dropout_p, key_mask(mask, q, s_global), plans


def _problem(rows: list[list[int]], info: GroupInfo, which: str) -> Optional[str]:
    """What is wrong in one gathered set of vectors, or None."""
    other = [r for r, row in enumerate(rows) if row[0] != _MAGIC]
    if other:
        return (f"ring_attn: rank {info.rank} of the {which} group runs a Ulysses forward "
                f"while its rank(s) {other} run something else on that group (a ring call "
                "or a backward): every rank must make the same calls in the same order")
    bad = [r for r, row in enumerate(rows) if row[1] != 0]
    if bad:
        return (f"ring_attn: rank(s) {bad} of the {which} group rejected their inputs or saw "
                f"a disagreement (see the error raised there); this rank stops too")
    try:
        _check_equal(rows, _FIELDS, _show)
    except RingInputError as e:
        return f"{e} (ranks of the {which} group)"
    return None


def agree(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool,
          scale: Optional[float], dropout_p: float, layout: str, row: GroupInfo,
          col: Optional[GroupInfo]) -> Agreed:
    """Check this rank's inputs, then all_gather one vector over the Ulysses group `row`
    and (when it has more than one rank) one over the ring group `col`, each carrying the
    previous one's verdict: any rank's error or any disagreement raises on every rank of
    the mesh, before any transfer."""
    ring_size = col.world_size if col is not None else 1
    groups = [(row, "Ulysses", col.rank if col is not None else 0)]
    if ring_size > 1:
        groups.append((col, "ring", row.rank))
    calls = tuple((g, _next_call(g)) for g, _, _ in groups)
    error: Optional[BaseException] = None
    try:
        scale, dropout_p, mask4, plans = _check_here(
            q, k, v, mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            layout=layout, row=row, ring_size=ring_size)
        fields = [q.size(0), q.size(1), k.size(1), q.size(3), v.size(3), q.size(2), k.size(2),
                  _DTYPES.index(q.dtype), _DEVICES.index(q.device.type),
                  LAYOUTS.index(layout), int(is_causal), float_bits(scale), float_bits(dropout_p),
                  int(mask is not None), _DTYPES.index(mask.dtype) if mask is not None else -1]
    except (RingAttnException, TypeError, ValueError, IndexError, NotImplementedError) as e:
        if all(g.world_size == 1 for g, _, _ in groups):
            raise
        error, fields, dropout_p = e, [-1] * (len(_FIELDS) - 4), 0.0
    # Every rank draws (keeping torch's generator in step across ranks); row rank 0's is used.
    seed = int(draw_seed()) if dropout_p > 0.0 and error is None else 0
    problem: Optional[str] = None
    seeds = [seed]
    for (g, call), (_, which, other) in zip(calls, groups):
        vec = [_MAGIC, int(error is not None or problem is not None), call, *fields,
               row.world_size, ring_size, other, *([0] * _PAD), seed]
        rows = _gather(vec, g)
        problem = problem or _problem(rows, g, which)
        if g is row:
            seeds = [r[-1] for r in rows]
            # Ranks of one row that disagree on the mesh (ring size, ring rank) hold
            # inconsistent ring groups: a gather over them could pair the wrong ranks.
            if any(r[_MESH] != rows[0][_MESH] for r in rows):
                break
    if error is not None:
        msg = f"ring_attn: rank {row.rank} of the Ulysses group: {error}"
        # (NotImplementedError is a RuntimeError too: keep its type, torch's for "no kernel")
        if isinstance(error, RuntimeError) and not isinstance(error, NotImplementedError):
            raise RingInputError(msg) from error
        raise type(error)(msg) from error
    if problem is not None:
        raise RingInputError(problem)
    seed_t = torch.tensor(seeds[0], dtype=torch.int64) if dropout_p > 0.0 else None
    return Agreed(float(scale), dropout_p, seed_t, mask4, plans, calls,
                  plans[0].starts[row.rank] if row.world_size > 1 else 0)


# --- The drivers. ---------------------------------------------------------------------------

# inner(q, k, v, mask, agreed) -> (out, lse): attention of [B, Hq/U, S_ring_shard, D] head
# shards over the whole sequence, and its float64 lse [B, Hq/U, S_ring_shard] (no
# gradient). mask: [B|1, Hq/U|1, 1, S] or None.
Inner = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Agreed], tuple[Tensor, Tensor]]


def ulysses_around(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *,
                   is_causal: bool, scale: Optional[float], dropout_p: float, layout: str,
                   row: GroupInfo, col: Optional[GroupInfo], inner: Inner) -> Tensor:
    """Agree, scatter heads / gather tokens over `row`, run `inner`, and back."""
    agreed = agree(q, k, v, mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                   layout=layout, row=row, col=col)
    qplan, kvplan = agreed.plans
    m = agreed.mask
    if m is not None and m.size(1) != 1:
        m = m.narrow(1, qplan.starts[row.rank], qplan.count)
    if row.world_size == 1:
        return inner(q, k, v, m, agreed)[0]
    ex_in = Exchange(row, (qplan, kvplan, kvplan))
    qh, kh, vh = _ToHeads.apply(ex_in, q, k, v)
    out, lse = inner(qh, kh, vh, m, agreed)
    return _ToSequence.apply(Exchange(row, (qplan,), agreed.calls), out, lse.detach())


def _local(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], agreed: Agreed,
           is_causal: bool) -> tuple[Tensor, Tensor]:
    """All S tokens are here, in global order: one kernel call (its autograd)."""
    s = q.size(2)
    m = None if mask is None else mask.expand(q.size(0), q.size(1), s, s)
    out, lse = ops.attn_fwd(q, k, v, m, None, None, 0, 0, is_causal, agreed.scale,
                          agreed.dropout_p, agreed.seed, False,
                          dropout_head_offset=agreed.head_offset)
    return out, lse


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, *,
                      group: Optional[dist.ProcessGroup] = None, is_causal: bool = False,
                      attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                      scale: Optional[float] = None) -> Tensor:
    """Exact attention over a sequence split contiguously across the U ranks of `group`,
    by all-to-all over heads (DeepSpeed-Ulysses).

    Args:
      query: [B, Hq, S/U, D], this rank's contiguous shard: tokens [u*S/U, (u+1)*S/U)
        (`ring_attn.shard(x, layout="contiguous", group=group)`). Hq % U == 0.
      key, value: [B, Hk, S/U, D] / [B, Hk, S/U, Dv]; Hq % Hk == 0, and Hk a multiple or a
        divisor of U (GQA: K/V heads are never expanded to Hq; see the module docstring).
      is_causal: key j kept for query i iff j <= i, on global positions.
      attn_mask: a key mask broadcastable to [B|1, Hq|1, 1, S] (bool, False masks out, or
        additive in the query dtype), global key order, the same on every rank.
      dropout_p: dropout on the probabilities; with the same torch seed the output equals
        the one-device ring_attn.scaled_dot_product_attention output.
      scale: score scale, default 1/sqrt(D).
      group: the Ulysses process group (default: the world).

    Returns this rank's shard [B, Hq, S/U, Dv] of the output; differentiable (dq, dk, dv
    are this rank's shards). Cross-rank disagreement raises on every rank before any
    transfer; the backward agrees again before its first transfer.
    """
    row = group_info(group)
    return ulysses_around(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                          dropout_p=dropout_p, layout="contiguous", row=row, col=None,
                          inner=lambda q, k, v, m, a: _local(q, k, v, m, a, is_causal))
