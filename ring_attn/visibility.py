"""The visibility rule of csrc/common/visibility.h, in Python, for whole shards.

The kernels decide per element and per tile which keys a query may see besides the
attention mask: the band on global positions (qpos - left <= kpos <= qpos + right, -1
unbounded; causal is right = 0) and documents (same document, -1 = in none). The ring's
schedule applies the SAME rule to whole (query shard, K/V shard) blocks: `classify` mirrors
`classify_tile` line for line, and `needed_rows` narrows a block to the rows that can be
visible at all, so a skipped or narrowed block never drops a visible pair (tested against
the element rule in tests/test_schedule.py).

Shards are described by `Run`s of global positions (layout.py). A unit-step run's
positions are an interval and its documents an interval of document ids (documents are
intervals of positions), so for unit-step runs both tests are exact; a strided run
(striped layout) is bounded by its min/max, which is conservative (a block may be computed
that could have been skipped), never wrong.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

from .layout import Run, narrow_runs

SKIP, FULL, PARTIAL = 0, 1, 2


@dataclass(frozen=True)
class Visibility:
    """The rule's parameters: left/right bounds (-1 unbounded; right is 0 when causal)
    and the global cu_seqlens (None: one document holding every position)."""
    left: int = -1
    right: int = -1
    cu_seqlens: Optional[tuple[int, ...]] = None

    @staticmethod
    def of(is_causal: bool, window: Optional[tuple[int, int]],
           cu_seqlens: Optional[tuple[int, ...]]) -> "Visibility":
        left, right = window if window is not None else (-1, -1)
        if is_causal:  # causal is the band's right bound, as the host sets it (attn_host.cpp)
            right = 0
        return Visibility(left, right, cu_seqlens)

    @property
    def has_rule(self) -> bool:
        return self.left >= 0 or self.right >= 0 or self.cu_seqlens is not None

    def doc(self, pos: int) -> int:
        """Document of a global position; -1 beyond the last document (padding)."""
        cu = self.cu_seqlens
        if cu is None:
            return 0
        if pos >= cu[-1] or pos < 0:
            return -1
        return bisect.bisect_right(cu, pos) - 1

    def visible(self, qpos: int, kpos: int) -> bool:
        """visibility.h's visible(), for one element (the tests' reference)."""
        if self.right >= 0 and kpos > qpos + self.right:
            return False
        if self.left >= 0 and kpos < qpos - self.left:
            return False
        if self.cu_seqlens is not None:
            qd, kd = self.doc(qpos), self.doc(kpos)
            if qd != kd or qd < 0:
                return False
        return True


def _span(r: Run) -> tuple[int, int]:
    return r.start, r.start + r.step * (r.count - 1)


def classify(vis: Visibility, q: Run, k: Run) -> int:
    """classify_tile(m, q_span, k_span, qdoc_span, kdoc_span) for two non-empty runs."""
    (qlo, qhi), (klo, khi) = _span(q), _span(k)
    if vis.right >= 0 and klo > qhi + vis.right:
        return SKIP
    if vis.left >= 0 and khi < qlo - vis.left:
        return SKIP
    full = ((vis.right < 0 or khi <= qlo + vis.right) and
            (vis.left < 0 or klo >= qhi - vis.left))
    if vis.cu_seqlens is not None:
        # Document ids of the positions that lie in a document (padding, id -1, sees
        # nothing): exact intervals for unit-step runs, bounds for strided ones.
        (qdl, qdh), (kdl, kdh) = _known(vis, q), _known(vis, k)
        if qdh < 0 or kdh < 0 or kdl > qdh or kdh < qdl:
            return SKIP
        full = (full and qdl == qdh == kdl == kdh and _in_docs(vis, q)
                and _in_docs(vis, k))
    return FULL if full else PARTIAL


def _in_docs(vis: Visibility, r: Run) -> bool:
    """Every position of r lies in some document (none is padding)."""
    return _span(r)[1] < vis.cu_seqlens[-1]


def _known(vis: Visibility, r: Run) -> tuple[int, int]:
    """The document span of r's positions that lie in a document ((-1, -1) if none)."""
    lo, _ = _span(r)
    end = vis.cu_seqlens[-1]
    if lo >= end:
        return -1, -1
    last = min(_span(r)[1], lo + ((end - 1 - lo) // r.step) * r.step)
    return vis.doc(lo), vis.doc(last)


def _index_range(r: Run, lo: int, hi: int) -> tuple[int, int]:
    """Indices [a, b) of r's positions within the global interval [lo, hi]."""
    a = max(0, -(-(lo - r.start) // r.step))
    b = min(r.count, (hi - r.start) // r.step + 1)
    return (a, b) if a < b else (0, 0)


def _reach(vis: Visibility, src: Run, backward: bool) -> tuple[int, int]:
    """The global interval of positions the positions of src can meet: keys a query run
    may see (backward=False) or queries a key run may be seen by (backward=True)."""
    lo, hi = _span(src)
    left, right = (vis.right, vis.left) if backward else (vis.left, vis.right)
    a = lo - left if left >= 0 else -(1 << 62)
    b = hi + right if right >= 0 else 1 << 62
    if vis.cu_seqlens is not None:
        dl, dh = _known(vis, src)
        if dh < 0:
            return 0, -1
        a, b = max(a, vis.cu_seqlens[dl]), min(b, vis.cu_seqlens[dh + 1] - 1)
    return a, b


def needed_rows(vis: Visibility, q_runs: Sequence[Run], k_runs: Sequence[Run]
                ) -> tuple[int, int, int, int, bool]:
    """(q_start, q_len, k_start, k_len, band) of the smallest rectangle of local rows that
    holds every visible (query, key) pair of the block; q_len = k_len = 0 when none is.
    band: some pair inside the rectangle may be invisible, so the kernel must apply the
    rule (False: every pair is visible, the kernel runs unmasked by it)."""
    if not vis.has_rule:
        nq, nk = sum(r.count for r in q_runs), sum(r.count for r in k_runs)
        return 0, nq, 0, nk, False
    qa = ka = 1 << 62
    qb = kb = -1
    q_off = 0
    for qr in q_runs:
        k_off = 0
        for kr in k_runs:
            if classify(vis, qr, kr) != SKIP:
                lo, hi = _reach(vis, qr, False)
                ia, ib = _index_range(kr, lo, hi)
                lo, hi = _reach(vis, kr, True)
                ja, jb = _index_range(qr, lo, hi)
                if ia < ib and ja < jb:
                    ka, kb = min(ka, k_off + ia), max(kb, k_off + ib)
                    qa, qb = min(qa, q_off + ja), max(qb, q_off + jb)
            k_off += kr.count
        q_off += qr.count
    if qb < 0:
        return 0, 0, 0, 0, False
    band = not all(classify(vis, a, b) == FULL
                   for a in narrow_runs(q_runs, qa, qb - qa)
               for b in narrow_runs(k_runs, ka, kb - ka))
    return qa, qb - qa, ka, kb - ka, band
