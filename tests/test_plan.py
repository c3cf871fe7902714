"""The planner's formulas against hand-computed cases and brute-force counts.

Memory: an 8-token shard worked out by hand from ring.py's allocations. Work: the pairs
each rank computes per step against a brute-force count over the layout's global
positions. Overlap: the Ring Attention paper's Table 1 (A100 NVLink 6.2K tokens) and our
rule reducing to its c = F/B in the paper's setting (non-causal, MHA, forward, peak).
"""
from __future__ import annotations

import json
import math
import os

import pytest

from ring_attn.layout import global_positions
from ring_attn.plan import model as M
from ring_attn.plan import plan
from ring_attn.plan.__main__ import main
from ring_attn.plan.planner import parse_bytes, parse_tokens
from ring_attn.plan.presets import DEVICES, FABRICS, load_preset


def test_layer_memory_by_hand():
    # B=1, Hq=2, Hk=1, D=Dv=4, S_local=8, fp32 (e=a=4), lse 8 bytes, P=2:
    # Q=64 K=32 V=32 O=64 R=16 elements.
    sh = M.Shape(heads=2, kv_heads=1, head_dim=4, dtype_bytes=4, acc_bytes=4, lse_bytes=8)
    mem = M.layer_memory(sh, 8, 2, train=True)
    it = mem.items
    assert it["q, k, v (inputs)"] == 128 * 4
    assert it["K/V double buffer"] == 2 * 64 * 4
    assert it["fp32 dK/dV travelling pair"] == 2 * 64 * 4
    assert it["fp32 dq accumulator"] == 64 * 4
    assert it["lse"] == 16 * 8
    # forward loop: inputs 512 + kv 512 + acc out 256 + acc lse 128 + partial and merge
    # product 2*256 + partial lse and 5 merge rows 16*(8+20) = 2368
    # backward loop: saved (q,k,v,out) 768 + lse 128 + dout 256 + dq 256 + dkv 512 +
    # kv 512 = 2432, plus the block's fp32 partials 512 + their lse-sized delta 64, plus
    # the previous step's partials 512 (alive until `grads` is rebound) = 3520
    assert it["previous step's partials"] == 128 * 4
    assert mem.peak == 3520 and mem.peak_phase == "backward"
    fwd = M.layer_memory(sh, 8, 2, train=False)
    assert fwd.peak == 2368 and fwd.peak_phase == "forward"
    # one rank: no K/V buffers, one dK/dV accumulator, no per-step partials
    one = M.layer_memory(sh, 8, 1, train=True)
    assert one.items["K/V double buffer"] == 0
    assert one.items["fp32 dK/dV travelling pair"] == 64 * 4
    assert one.items["previous step's partials"] == 0    # one step only
    assert one.peak == 896 + 256 + 256 + 256 + 576  # saved, dout, dq, dkv, partials


def test_model_memory_by_hand():
    sh = M.Shape(heads=2, kv_heads=1, head_dim=4, layers=3, dtype_bytes=4, acc_bytes=4,
                 lse_bytes=8, hidden=8)
    layer = M.layer_memory(sh, 8, 2).peak
    saved = (64 + 32 + 32 + 64) * 4 + 16 * 8
    assert M.model_memory(sh, 8, 2).peak == layer + 2 * saved
    assert M.model_memory(sh, 8, 2, checkpointing=True).peak == layer + 3 * 8 * 8 * 4
    infer = M.model_memory(sh, 8, 2, train=False)
    assert infer.peak == M.layer_memory(sh, 8, 2, False).peak + 2 * 64 * 4


def _visible_pairs(rank: int, source: int, world: int, s_local: int, layout: str) -> int:
    qp = global_positions(rank, world, s_local, layout)
    kp = global_positions(source, world, s_local, layout)
    return int((kp.view(1, -1) <= qp.view(-1, 1)).sum())


@pytest.mark.parametrize("layout", M.LAYOUTS)
def test_step_pairs_match_brute_force(layout):
    for world, s_local in ((2, 8), (4, 6), (3, 4)):
        for r in range(world):
            for t in range(world):
                src = (r - t) % world
                want = _visible_pairs(r, src, world, s_local, layout)
                assert M.step_pairs(r, t, world, s_local, layout, True) == want
                assert M.step_pairs(r, t, world, s_local, layout, False) == s_local ** 2


def test_ring_time_by_hand():
    # P=2 contiguous causal, S_local=1024, H=Hk=1, D=64 bf16; 1 TFLOP/s, 1 GB/s, no latency
    sh = M.Shape(heads=1, kv_heads=1, head_dim=64)
    dev = M.Device("d", 1e12, 1e9, efficiency=1.0)
    fab = M.Fabric("f", 1e9, 0.0)
    t = M.ring_time(sh, 1024, 2, "contiguous", True, dev, fab, "fwd")
    full = 1024 ** 2 * 256 / 1e12          # 4*D FLOPs per pair
    diag = 1024 * 1025 / 2 * 256 / 1e12
    comm = 2 * 1024 * 64 * 2 / 1e9          # K and V, bf16
    assert t.steps == pytest.approx([max(diag, comm), full])
    assert t.compute == pytest.approx([diag, diag + full])
    assert t.bubble == pytest.approx(1 - diag / (comm + full))
    assert t.comm_bubble == pytest.approx((comm - diag) / (comm + full))
    # backward: 2.5x the FLOPs; step 1 also carries the fp32 dK/dV; one exposed hop home
    b = M.ring_time(sh, 1024, 2, "zigzag", True, dev, fab, "bwd")
    dkv = 2 * 1024 * 64 * 4 / 1e9
    zig = (2 * 512 ** 2 + 512) * 640 / 1e12
    half = 2 * 512 ** 2 * 640 / 1e12
    assert b.steps == pytest.approx([max(zig, comm), max(half, dkv)])
    assert b.total == pytest.approx(max(zig, comm) + max(half, dkv) + dkv)


def test_paper_rule_reproduced():
    # Liu et al. 2023 Table 1: A100 (312 TFLOPS) over NVLink (300 GB/s): block 1.0K,
    # minimal sequence length 6.2K per device; TPU v4 (275 TF, 268 GB/s): 1.0K / 6.2K.
    c, s = M.paper_min_block(312e12, 300e9)
    assert round(c / 1e3, 1) == 1.0 and round(s / 1e3, 1) == 6.2
    c, s = M.paper_min_block(275e12, 268e9)
    assert round(c / 1e3, 1) == 1.0 and round(s / 1e3, 1) == 6.2
    # Our rule in the paper's setting (MHA, D == Dv, bf16, non-causal forward at peak, no
    # latency) is the same c = F / B: the quadratic's root.
    sh = M.Shape(heads=32, kv_heads=32, head_dim=128)
    ours = M.min_tokens_for_overlap(sh, M.Device("a100", 312e12, 0, 1.0),
                                    M.Fabric("nvl", 300e9, 0.0), "fwd", causal=False)
    assert ours == pytest.approx(1040.0)
    # causal halves the compute per step (doubles the minimum); GQA 4:1 quarters the bytes
    gqa = M.Shape(heads=32, kv_heads=8, head_dim=128)
    causal = M.min_tokens_for_overlap(gqa, M.Device("a100", 312e12, 0, 1.0),
                                      M.Fabric("nvl", 300e9, 0.0), "fwd", causal=True)
    assert causal == pytest.approx(1040.0 * 2 / 4)


def test_closed_forms_ulysses_and_ring_bytes():
    sh = M.Shape(heads=8, kv_heads=8, head_dim=64)
    s, p = 4096, 4
    shard = 1 * 8 * (s // p) * 64 * 2
    assert M.ulysses_bytes(sh, s // p, p) == pytest.approx(4 * (p - 1) / p * shard)
    k_global = 8 * s * 64 * 2
    assert M.ring_bytes(sh, s // p, p) == pytest.approx(2 * (p - 1) / p * k_global)


def test_options_respect_kv_heads():
    sh = M.Shape(heads=28, kv_heads=4, head_dim=128, layers=28)
    names = {o.strategy for o in M.options(sh, 2 ** 16, 8, True, DEVICES["h100"],
                                           FABRICS["nvlink4"], True)}
    assert names == {"ring", "hybrid 2x4", "hybrid 4x2"}   # U=8 would split 4 KV heads


def test_max_context_is_the_largest_that_fits():
    sh = M.Shape(heads=32, kv_heads=8, head_dim=128, layers=32, hidden=4096)
    budget = 40 * 2 ** 30
    s = M.max_context(sh, 8, budget, True, False, 16)
    assert s > 0 and s % 16 == 0
    assert M.model_memory(sh, s // 8, 8).peak <= budget
    assert M.model_memory(sh, s // 8 + 2, 8).peak > budget


def test_plan_cli_and_json(capsys):
    assert main(["--model", "llama3-8b", "--seq", "1M", "--devices", "8", "--device",
                 "h100", "--fabric", "nvlink4", "--budget", "80GiB", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["s_local"] == 2 ** 17 and res["budget"] == 80 * 2 ** 30
    assert res["recommendation"]["layout"] in ("zigzag", "striped")
    assert res["fits"] == (res["memory_model"]["peak"] <= res["budget"])
    assert main(["--model", "qwen2.5-7b", "--seq", "128K", "--devices", "4", "--infer",
                 "--checkpointing"]) == 0
    assert "Recommendation:" in capsys.readouterr().out
    assert parse_tokens("1M") == 2 ** 20 and parse_bytes("80GB") == 80e9
    with pytest.raises(ValueError, match="--seq"):
        plan(seq="12x")
    with pytest.raises(ValueError, match="multiple of 2 \\* devices = 16"):
        plan(seq=1000, devices=8)
    with pytest.raises(ValueError, match="--device must be one of"):
        plan(device="tpu")


def test_calibrate_tiny(tmp_path):
    from ring_attn.plan.calibrate import calibrate, fit_latency_bandwidth
    lat, bw = fit_latency_bandwidth([1e3, 1e5, 1e7], [1e-5 + 1e3 / 2e9, 1e-5 + 1e5 / 2e9,
                                                      1e-5 + 1e7 / 2e9])
    assert lat == pytest.approx(1e-5) and bw == pytest.approx(2e9)
    out = str(tmp_path / "cpu.json")
    rec = calibrate(sizes=[64], out=out, heads=1, head_dim=16, max_link_mib=1, repeats=1)
    assert rec["device"]["flops"] > 0 and rec["fabric"]["bandwidth"] > 0
    assert [r["bytes"] for r in rec["link"]] == [4 ** k * 4096 for k in range(5)] and os.path.exists(out)
    dev, fab, _ = load_preset(out)
    assert dev.flops == rec["device"]["flops"] and fab.shared_host
    res = plan(seq=256, devices=2, preset=out, model="llama3-8b")
    assert res["device"]["flops"] == rec["device"]["flops"]
    assert math.isfinite(res["options"][0]["fwd"])


def test_calibrated_rates_by_hand():
    rows = ({"S": 1000, "fwd": 10.0, "bwd": 20.0, "fwd1": 6.0, "bwd1": 12.0, "cfwd": 5.0,
             "cbwd": 8.0, "cfwd1": 3.0, "cbwd1": 4.0},
            {"S": 4000, "fwd": 30.0, "bwd": 40.0, "fwd1": 18.0, "bwd1": 24.0, "cfwd": 15.0,
             "cbwd": 16.0, "cfwd1": 9.0, "cbwd1": 8.0})
    dev = M.Device("cpu", 30.0, 0, 1.0, 40.0, cores=2, core_flops=18.0, core_flops_bwd=24.0,
                   table=rows)
    # log-linear between the rows: S = 2000 is halfway (log 2 / log 4); clamped outside
    assert dev.rate("fwd", 1, False, 2000) == pytest.approx(20.0)
    assert dev.rate("bwd", 1, False, 2000, masked=True) == pytest.approx(12.0)
    assert dev.rate("fwd", 1, False, 100) == 10.0 and dev.rate("fwd", 1, False, 1e5) == 30.0
    # 2 ranks on 2 cores: one thread each; 4 ranks: one thread, half a core each
    assert dev.rate("fwd", 2, True, 4000) == pytest.approx(18.0)
    assert dev.rate("fwd", 4, True, 4000, masked=True) == pytest.approx(4.5)
    # zigzag P=2: step 0 is each rank's causal diagonal (masked rate), step 1 whole halves
    sh = M.Shape(heads=1, kv_heads=1, head_dim=1, dtype_bytes=4)
    t = M.ring_time(sh, 4000, 2, "zigzag", True, dev, M.Fabric("f", 1e30, 0.0, True), "fwd")
    diag = (2 * 2000 ** 2 + 2000) * 4 / 9.0
    half = 2 * 2000 ** 2 * 4 / 18.0
    assert t.steps == pytest.approx([diag, half])
    assert not M.step_masked(1, 1, 2, "zigzag", True) and M.step_masked(1, 1, 2, "striped", True)


def test_cpu_workspace_by_hand():
    # fp32, B=1, Hq=Hk=8, D=64, S_local=4096, 2 threads: forward packs K^T (8 MiB); the
    # backward keeps one key chunk (B*Hk = 8 >= 2*threads) of 4096 keys per thread,
    # 4096 * (3*64 + 2*64) floats = 5 MiB each.
    sh = M.Shape(heads=8, kv_heads=8, head_dim=64, dtype_bytes=4, acc_bytes=4)
    assert M.cpu_workspace(sh, 4096, 2) == (8 * 2 ** 20, 2 * 5 * 2 ** 20)
    # bf16: V is packed too; one KV head and 4 threads: 8 chunks of 512 keys, + 8 dQ slices
    sh = M.Shape(heads=2, kv_heads=1, head_dim=64, dtype_bytes=2, acc_bytes=4)
    fwd, bwd = M.cpu_workspace(sh, 4096, 4)
    assert fwd == 2 * 4096 * 64 * 4
    assert bwd == 4 * 512 * 320 * 4 + 8 * (2 * 4096 * 64 * 4)
    base = M.layer_memory(sh, 4096, 2, True)
    with_ws = M.layer_memory(sh, 4096, 2, True, cpu_threads=4)
    # the backward's kernel phase: fp32 partials (Q+K+V)*4 + delta R*4 + workspace now
    # exceeds the bf16 delta temporaries 3*O*4 that set the peak without it
    q, kv, o, r = 2 * 4096 * 64, 4096 * 64, 2 * 4096 * 64, 2 * 4096
    partial0, temps = (q + 2 * kv) * 4 + r * 4, 3 * o * 4
    assert temps > partial0
    assert with_ws.peak - base.peak == partial0 + bwd - temps
