"""benchmarks/torch_cp.py, the driver of PyTorch's context-parallel ring that
bench_ring.py --vs-torch-cp compares against: on 2 gloo ranks, torch CP (all-gather and
all-to-all rotations) and ring_attn, on the benchmark's own shards (contiguous without
causal, zigzag = torch's head-tail with causal), must each match float64 SDPA on the full
sequence (out, dq, dk, dv) within 4x one-device SDPA's error in float32 and bfloat16, so
the benchmark compares correct implementations of the same computation."""
from __future__ import annotations

import os
import sys

import pytest

from dist_utils import assert_all_ok, run_ranks

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _torch_cp_available() -> bool:
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:
        return False
    return hasattr(_attention, "_templated_ring_attention_backward")


def torch_cp_checks(rank: int, world: int) -> bool:
    sys.path.insert(0, BENCH)
    import torch_cp
    torch_cp.check(rank, world)
    return True


@pytest.mark.skipif(not _torch_cp_available(),
                    reason="this torch has no _context_parallel._templated_ring_attention_backward")
def test_torch_cp_driver_matches_sdpa_cpu(tmp_path) -> None:
    assert assert_all_ok(run_ranks(torch_cp_checks, 2, tmp_path, pg_timeout_s=60)) == [True, True]
