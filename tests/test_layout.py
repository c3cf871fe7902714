"""ring_attn.layout: positions, shard / unshard, the length rules and pad_for_ring, checked
against the layouts' definitions written out independently here (no process group; the
differentiable shard / unshard over gloo are tested in test_ring.py)."""
from __future__ import annotations

import pytest
import torch

from ring_attn.layout import (LAYOUTS, check_global_length, global_positions, local_runs,
                              narrow_runs, pad_for_ring, runs_to_positions, shard_tensor,
                              unshard_tensors)


def _definition(rank: int, p: int, s_local: int, layout: str) -> list[int]:
    """The layouts as the docs state them, token by token."""
    s = p * s_local
    if layout == "contiguous":
        return [t for t in range(s) if t // s_local == rank]
    if layout == "striped":
        return [t for t in range(s) if t % p == rank]
    c = s_local // 2
    chunk = lambda t: t // c  # noqa: E731
    return ([t for t in range(s) if chunk(t) == rank]
            + [t for t in range(s) if chunk(t) == 2 * p - 1 - rank])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_positions_match_definition_and_partition(layout: str, p: int) -> None:
    for s_local in ([2, 4, 6] if layout == "zigzag" else [1, 3, 4]):
        seen: list[int] = []
        for r in range(p):
            pos = global_positions(r, p, s_local, layout)
            assert pos.dtype == torch.int64
            assert pos.tolist() == _definition(r, p, s_local, layout)
            seen += pos.tolist()
        assert sorted(seen) == list(range(p * s_local))  # every token on exactly one rank


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(layout: str, p: int) -> None:
    s = 2 * p * 3
    x = torch.randn(2, 3, s, 5)
    shards = [shard_tensor(x, r, p, layout, dim=2) for r in range(p)]
    for r, sh in enumerate(shards):
        idx = torch.tensor(_definition(r, p, s // p, layout))
        assert torch.equal(sh, x.index_select(2, idx))
    assert torch.equal(unshard_tensors(shards, layout, dim=2), x)
    # Another dim (tokens on dim 1, as for [B, S, E] activations).
    y = torch.randn(2, s, 4)
    ys = [shard_tensor(y, r, p, layout, dim=1) for r in range(p)]
    assert torch.equal(unshard_tensors(ys, layout, dim=1), y)


def test_narrow_runs_matches_position_slices() -> None:
    for layout in LAYOUTS:
        for p in (1, 3, 4):
            pos = global_positions(p - 1, p, 8, layout)
            runs = local_runs(p - 1, p, 8, layout)
            for start in range(8):
                for length in range(0, 8 - start + 1):
                    got = runs_to_positions(narrow_runs(runs, start, length))
                    assert got.tolist() == pos[start:start + length].tolist()


@pytest.mark.parametrize("layout,multiple", [("contiguous", 3), ("striped", 3), ("zigzag", 6)])
def test_uneven_length_error_names_multiple(layout: str, multiple: int) -> None:
    check_global_length(4 * multiple, 3, layout)
    with pytest.raises(ValueError, match=rf"multiple of {multiple}\b"):
        check_global_length(4 * multiple + 1, 3, layout)
    with pytest.raises(ValueError, match="pad_for_ring"):
        shard_tensor(torch.zeros(1, 1, 4 * multiple + 1, 2), 0, 3, layout)


def test_zigzag_shard_length_must_be_even() -> None:
    with pytest.raises(ValueError, match="even"):
        global_positions(0, 2, 3, "zigzag")


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        global_positions(0, 2, 4, "diagonal")


@pytest.mark.parametrize("layout,p,s", [("zigzag", 3, 10), ("contiguous", 4, 9),
                                        ("striped", 2, 8), ("zigzag", 2, 8)])
def test_pad_for_ring(layout: str, p: int, s: int) -> None:
    x = torch.randn(2, 3, s, 4)
    padded, key_mask, valid = pad_for_ring(x, dim=2, world_size=p, layout=layout)
    m = 2 * p if layout == "zigzag" else p
    assert padded.size(2) % m == 0 and padded.size(2) - s < m
    assert valid == s
    assert torch.equal(padded[:, :, :s], x)
    assert not padded[:, :, s:].any()
    assert key_mask.dtype == torch.bool
    assert key_mask.tolist() == [i < s for i in range(padded.size(2))]
    check_global_length(padded.size(2), p, layout)  # no raise
