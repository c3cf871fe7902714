"""pytest setup shared by every test: the `cuda` marker skips a test unless a CUDA device
and ring_attn's CUDA kernels are both present (checked at collection, never at import),
and each test starts from the same global RNG state (dropout seeds come from it)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import helpers`

from helpers import has_cuda_kernel  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # torch's cuDNN SDPA is not a usable reference on CUDA: on an H200 (torch 2.11, cuDNN
    # 9.19, where torch tries cuDNN first on sm_90) it faulted with "misaligned address" on
    # a broadcast (L, 1) mask, poisoning the CUDA context for every later test, and returned
    # None for batch 0; it also reads a float32 mask given with bf16/fp16 queries as if it
    # were bf16/fp16 (pytorch/pytorch#191612). Torch's error is measured with its flash,
    # memory-efficient or math kernels instead (helpers.torch_sdpa).
    torch.backends.cuda.enable_cudnn_sdp(False)
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any("cuda" in item.keywords for item in items) or has_cuda_kernel():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and ring_attn built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_global_seed() -> None:
    torch.manual_seed(20240611)
