"""examples/train_hf.py runs end to end under torchrun at 2 ranks (CPU, gloo): a tiny
random HF Llama fine-tuned on padded batches with activation checkpointing, its loss equal
to single-process transformers training at every step (the script checks and prints)."""
from __future__ import annotations

import re

import pytest
from test_examples import _torchrun

pytest.importorskip("transformers")


def test_train_hf_matches_single_process():
    out = _torchrun("train_hf.py", "--steps", "3", "--check", "--dtype", "float64",
                    "--seq-len", "128", "--checkpointing", "reentrant")
    assert "PASS: ring training matches single-process training" in out, out
    rows = re.findall(r"^\s*\d+\s+\d+\.\d+\s+\d+\.\d+\s", out, flags=re.M)
    assert len(rows) == 3, out  # one (ring, single) loss pair per step
