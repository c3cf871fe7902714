"""The planner's formulas: per-device memory, per-step time and bubble of ring attention.

Everything here is a pure function of numbers (no torch, no process group), so every
formula is unit-tested against hand-computed cases (tests/test_plan.py).

Notation (per device): Sl = S / P tokens; element counts of this device's shards
    Q = B*Hq*Sl*D   K = B*Hk*Sl*D   V = B*Hk*Sl*Dv   O = B*Hq*Sl*Dv   R = B*Hq*Sl (rows)
e = bytes of the input dtype, a = bytes of the accumulation dtype (4; 8 for float64),
l = bytes of one lse value (8: lse is float64 from this session on).

Memory follows ring.py line by line (the cited lines are those of the pass-KV ring at
the base commit of this session); kernel scratch (per-thread tiles, a few hundred KiB)
and the process's own footprint are not counted.

Time: a ring step costs max(compute of the slowest rank, transfer of the block it
receives): the transfer of step t overlaps the compute of step t (comm.py), and a rank
cannot start step t+1 before the K/V of step t+1 has arrived. FLOPs per (query, key)
pair and head: forward 2*D + 2*Dv (QK^T and PV), backward 6*D + 4*Dv (QK^T recomputed,
dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): 2.5x the forward when D == Dv.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Shape:
    """The attention of one layer (and how many layers the model has)."""
    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 1
    batch: int = 1
    v_head_dim: Optional[int] = None
    dtype_bytes: int = 2          # bf16
    acc_bytes: int = 4            # float32 accumulators (8 for float64 inputs)
    lse_bytes: int = 8            # lse is float64 (this session's contract)
    hidden: Optional[int] = None  # residual stream width (checkpointed layer inputs)

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def model_dim(self) -> int:
        return self.hidden or self.heads * self.head_dim


@dataclass(frozen=True)
class Device:
    name: str
    flops: float                 # peak dense bf16 FLOP/s (datasheet) or measured
    memory: float                # bytes
    efficiency: float = 0.6      # fraction of peak an attention kernel reaches
    flops_bwd: Optional[float] = None  # measured backward FLOP/s (calibration)
    cores: int = 0               # > 0: a CPU; ranks on one host share these cores
    core_flops: Optional[float] = None      # measured with one thread (calibration)
    core_flops_bwd: Optional[float] = None
    # Calibration rows {"S", "fwd", "bwd", "fwd1", "bwd1" (one thread), and "cfwd", ...
    # on a causal diagonal block, FLOPs counted over its visible pairs}: the CPU kernel's
    # FLOP/s grows with the block (150 -> 181 GFLOP/s from S = 512 to 2048 on the 2-core
    # VM) and is lower on diagonal blocks (masked tiles: 0.71x the time of the full block
    # for half the pairs at S = 2048, one thread).
    table: tuple = ()
    source: str = ""

    def rate(self, phase: str, world: int = 1, shared_host: bool = False,
             s_block: Optional[float] = None, masked: bool = False) -> float:
        """Achieved FLOP/s of one rank in phase ("fwd"/"bwd") on an s_block-sized block,
        a causal diagonal one when masked."""
        bwd = phase == "bwd"
        one_thread = bool(shared_host and world > 1 and self.core_flops)
        if self.table and s_block:
            col = ("c" if masked and "cfwd" in self.table[0] else "") + phase + (
                "1" if one_thread else "")
            r = _interp_log([(row["S"], row[col]) for row in self.table], s_block)
        elif one_thread:
            r = self.core_flops_bwd if bwd and self.core_flops_bwd else self.core_flops
        else:
            r = self.flops_bwd if bwd and self.flops_bwd else self.flops
        if one_thread:
            # P ranks on one host split its cores: max(1, cores // P) threads each
            # (bench_ring.py, dist_utils.py), time-sliced to cores / P when P > cores.
            r *= min(max(1, self.cores // world), self.cores / world)
        return r * self.efficiency


def _interp_log(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise linear in log(x) through sorted points, constant outside them."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return y0 + f * (y1 - y0)
    return pts[-1][1]


@dataclass(frozen=True)
class Fabric:
    name: str
    bandwidth: float             # bytes/s per direction between ring neighbours
    latency: float               # seconds per message
    shared_host: bool = False    # every rank on one host (gloo loopback)
    source: str = ""

    def seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency + nbytes / self.bandwidth


# ----------------------------------------------------------------------------- memory

@dataclass
class Memory:
    """Bytes per device, itemised; `peak` is the largest live set."""
    items: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    peak_phase: str = ""


def _counts(sh: Shape, s_local: int) -> dict[str, int]:
    b, hq, hk, d, dv = sh.batch, sh.heads, sh.kv_heads, sh.head_dim, sh.dv
    return {"Q": b * hq * s_local * d, "K": b * hk * s_local * d, "V": b * hk * s_local * dv,
            "O": b * hq * s_local * dv, "R": b * hq * s_local}


def cpu_workspace(sh: Shape, s_local: int, threads: int) -> tuple[float, float]:
    """Bytes ring_attn's CPU kernels allocate inside one call on an S_local block
    (forward, backward); the CUDA kernels allocate none of this size.

    Forward (attention_fwd.cpp:86-90): K^T packed once per call in the accumulation type,
    [B*Hk][ceil(S/512)][D][512], and V too when it cannot be read in place (a dtype
    narrower than the accumulator). Backward (attention_bwd.cpp:86-131): per thread, the
    key chunk's K, K^T, V^T, dK, dV in the accumulation type (CK*(3D + 2Dv)); keys split
    into chunks only when B*Hk < 2*threads, then one float32 dQ slice per chunk."""
    b, hk, d, dv, a = sh.batch, sh.kv_heads, sh.head_dim, sh.dv, sh.acc_bytes
    kb = min(512, s_local)
    fwd = b * hk * math.ceil(s_local / kb) * kb * d * a
    if sh.dtype_bytes != a:
        fwd += b * hk * s_local * dv * a
    kb, nkb = min(128, s_local), math.ceil(s_local / min(128, s_local))
    nchunks = min(nkb, math.ceil(2 * threads / (b * hk))) if b * hk < 2 * threads else 1
    q_slice = b * sh.heads * s_local * d * a
    nchunks = max(1, min(nchunks, (512 << 20) // max(q_slice, 1)))
    ck = math.ceil(nkb / nchunks) * kb
    bwd = threads * ck * (3 * d + 2 * dv) * a + (nchunks * q_slice if nchunks > 1 else 0)
    return float(fwd), float(bwd)


def layer_memory(sh: Shape, s_local: int, world: int, train: bool = True,
                 cpu_threads: int = 0) -> Memory:
    """Peak bytes of one ring attention call (forward, and backward when train) on one
    device, counting its inputs q, k, v (and dout), as the pass-KV ring allocates them.
    cpu_threads > 0 adds the CPU kernels' workspace (cpu_workspace) for that many
    threads."""
    c = _counts(sh, s_local)
    e, a, l = sh.dtype_bytes, sh.acc_bytes, sh.lse_bytes
    Q, K, V, O, R = c["Q"], c["K"], c["V"], c["O"], c["R"]
    ring = world > 1
    ws_f, ws_b = cpu_workspace(sh, s_local, cpu_threads) if cpu_threads else (0.0, 0.0)
    it: dict[str, float] = {
        "q, k, v (inputs)": (Q + K + V) * e,
        "out": O * e,                               # ring.py:120, saved for backward
        "lse": R * l,                               # ring.py:121, saved for backward
        # ring.py:47-48 pack(k, v) + empty_like: the block held and the one arriving
        "K/V double buffer": 2 * (K + V) * e if ring else 0,
        "fp32 out accumulator": O * a,              # block.py:111 step 0's partial
        # block.py:103-107 (wide: a float32 partial per step) and merge.py's
        # out.to(acc) * w product, both block-sized (the whole shard here)
        "step partial out + merge temp": 2 * O * a + R * (l + 5 * a) if ring else 0,
    }
    if cpu_threads:
        it["CPU kernel workspace (fwd / bwd)"] = max(ws_f, ws_b)
    # during a step's kernel: its partial (out, lse) and the kernel's workspace; after
    # it, the merge's temporaries (the workspace is freed by then)
    in_kernel = (O * a + R * l if ring else 0) + ws_f
    fwd_loop = (it["q, k, v (inputs)"] + it["K/V double buffer"] + it["fp32 out accumulator"]
                + R * l + max(in_kernel, it["step partial out + merge temp"]))
    # ring.py:120 acc_out.to(q.dtype) while the float32 accumulator is alive
    fwd_end = it["q, k, v (inputs)"] + O * e + O * a + R * l
    phases = {"forward": max(fwd_loop, fwd_end)}
    if train:
        saved = (Q + K + V + O) * e + R * l         # q, k, v, out, lse (ring.py:121)
        it["dout"] = O * e
        it["fp32 dq accumulator"] = Q * a           # ring.py:80
        # ring.py:84-85: the travelling dK/dV and the buffer receiving the next one
        it["fp32 dK/dV travelling pair"] = (2 if ring else 1) * (K + V) * a
        # attn_host.cpp:288 delta = (dout.to(acc) * out.to(acc)).sum(-1): three fp32
        # block-sized temporaries for a narrower dtype, one (the product) for fp32
        temps = (3 if e < a else 1) * O * a
        # attn_host.cpp:292-294 float32 partial gradients of one block (block.py:147-151)
        partial = (Q + K + V) * a + R * a + ws_b
        it["step partials (dq, dk, dv) / delta temp"] = max(temps, partial)
        # ring.py:98 `grads = backward_block(...)`: the previous step's partials stay
        # alive through the next step's kernel call, until the name is rebound (found by
        # sampling RSS around backward_block at P=2: +18 MiB where +12 were expected)
        it["previous step's partials"] = (Q + K + V) * a if ring else 0
        bwd_base = (saved + it["dout"] + it["fp32 dq accumulator"]
                    + it["fp32 dK/dV travelling pair"] + it["K/V double buffer"])
        bwd_loop = (bwd_base + it["previous step's partials"]
                    + it["step partials (dq, dk, dv) / delta temp"])
        # ring.py:112: dq.to, dk.to, dv.to run while every buffer of the loop is alive
        it["dq, dk, dv (outputs)"] = (Q + K + V) * e
        bwd_end = bwd_base + it["dq, dk, dv (outputs)"]
        phases["backward"] = max(bwd_loop, bwd_end)
    phase = max(phases, key=phases.get)
    return Memory(it, phases[phase], phase)


def saved_per_layer(sh: Shape, s_local: int) -> float:
    """What one layer's attention keeps from forward to backward: q, k, v, out, lse."""
    c = _counts(sh, s_local)
    return (c["Q"] + c["K"] + c["V"] + c["O"]) * sh.dtype_bytes + c["R"] * sh.lse_bytes


def model_memory(sh: Shape, s_local: int, world: int, train: bool = True,
                 checkpointing: bool = False, cpu_threads: int = 0) -> Memory:
    """Attention memory of the whole model per device.

    Training without checkpointing: every layer's saved q, k, v, out, lse stay alive until
    its backward, and the last layer's ring buffers come on top. With (per-layer)
    checkpointing: only the layers' inputs (B*Sl*hidden, the residual stream) stay, and
    one layer is recomputed at a time. Inference (prefill): the KV cache of every layer
    plus one layer's forward."""
    one = layer_memory(sh, s_local, world, train, cpu_threads)
    items = {"one layer (peak)": one.peak}
    saved = saved_per_layer(sh, s_local)
    if not train:
        kv = (_counts(sh, s_local)["K"] + _counts(sh, s_local)["V"]) * sh.dtype_bytes
        items["KV cache of the other layers"] = (sh.layers - 1) * kv
    elif checkpointing:
        items["checkpointed layer inputs"] = (sh.layers * sh.batch * s_local * sh.model_dim
                                              * sh.dtype_bytes)
    else:
        items["saved q, k, v, out, lse of the other layers"] = (sh.layers - 1) * saved
    return Memory(items, sum(items.values()), one.peak_phase)


# ----------------------------------------------------------------------------- work

def step_masked(rank: int, step: int, world: int, layout: str, causal: bool) -> bool:
    """Whether the step's kernel call applies the causal mask (schedule.py: the diagonal
    s == r, and every striped step); the others are whole unmasked blocks."""
    return causal and (layout == "striped" or (rank - step) % world == rank)


def step_pairs(rank: int, step: int, world: int, s_local: int, layout: str,
               causal: bool) -> float:
    """(query, key) pairs rank computes at step (schedule.py's rule, in closed form)."""
    if not causal:
        return float(s_local) ** 2
    s = (rank - step) % world
    n = float(s_local)
    if layout == "contiguous":
        return n * n if s < rank else (n * (n + 1) / 2 if s == rank else 0.0)
    if layout == "zigzag":
        c = n / 2
        return 2 * c * c + c if s == rank else 2 * c * c
    if layout == "striped":
        return n * (n + 1) / 2 if s <= rank else n * (n - 1) / 2
    raise ValueError(f"ring_attn.plan: layout must be one of {LAYOUTS}, got {layout!r}")


def flops_per_pair(sh: Shape, phase: str) -> float:
    d, dv = sh.head_dim, sh.dv
    per_head = 2 * d + 2 * dv if phase == "fwd" else 6 * d + 4 * dv
    return per_head * sh.heads * sh.batch


@dataclass
class PhaseTime:
    """One pass (forward or backward) of the ring on every rank."""
    steps: list[float]          # wall time of each step (the slowest rank's)
    compute: list[float]        # per rank: its own compute summed over steps
    comm: list[float]           # per step: transfer time on the link
    exposed_tail: float         # a transfer after the last step (backward's dK/dV home)

    @property
    def total(self) -> float:
        return sum(self.steps) + self.exposed_tail

    @property
    def bubble(self) -> float:
        """Worst rank's idle share: 1 - its compute / the pass's wall time."""
        return 1.0 - min(self.compute) / self.total if self.total > 0 else 0.0

    @property
    def comm_bubble(self) -> float:
        """Share of the pass spent on transfers that the slowest compute did not hide."""
        exposed = sum(max(0.0, c - m) for c, m in zip(self.comm, self.max_compute))
        return (exposed + self.exposed_tail) / self.total if self.total > 0 else 0.0

    max_compute: list[float] = field(default_factory=list)  # per step, slowest rank


def ring_time(sh: Shape, s_local: int, world: int, layout: str, causal: bool,
              device: Device, fabric: Fabric, phase: str) -> PhaseTime:
    """Per-step time of the pass-KV ring (ring.py) for one layer."""
    c = _counts(sh, s_local)
    kv_bytes = (c["K"] + c["V"]) * sh.dtype_bytes
    dkv_bytes = (c["K"] + c["V"]) * sh.acc_bytes
    rates = {m: device.rate(phase, world, fabric.shared_host, s_local, m)
             for m in (False, True)}
    fpp = flops_per_pair(sh, phase)
    per_rank = [[step_pairs(r, t, world, s_local, layout, causal) * fpp
                 / rates[step_masked(r, t, world, layout, causal)]
                 for t in range(world)] for r in range(world)]
    steps, comm, mx = [], [], []
    for t in range(world):
        link = kv_bytes if t + 1 < world else 0.0
        if phase == "bwd" and t > 0:
            link += dkv_bytes   # the accumulator sent at step t-1 travels during step t
        comm.append(fabric.seconds(link))
        mx.append(max(row[t] for row in per_rank))
        steps.append(max(mx[-1], comm[-1]))
    tail = fabric.seconds(dkv_bytes) if phase == "bwd" and world > 1 else 0.0
    return PhaseTime(steps, [sum(row) for row in per_rank], comm, tail, mx)


def min_tokens_for_overlap(sh: Shape, device: Device, fabric: Fabric, phase: str,
                           causal: bool, world: int = 8) -> float:
    """Smallest S_local at which a balanced ring step's compute hides its transfer.

    Forward: pairs(Sl) * fpp / rate >= latency + Sl * kv_per_token / bandwidth, with
    pairs = Sl^2 (non-causal) or Sl^2 / 2 (causal, zigzag/striped). Backward adds the
    float32 dK/dV to the transfer and uses the backward FLOPs. Solved as a quadratic."""
    k = (1 if not causal else 0.5) * flops_per_pair(sh, phase) / device.rate(
        phase, world, fabric.shared_host)
    per_tok = sh.batch * sh.kv_heads * (sh.head_dim + sh.dv) * (
        sh.dtype_bytes + (sh.acc_bytes if phase == "bwd" else 0))
    b = per_tok / fabric.bandwidth
    # k Sl^2 - b Sl - latency >= 0
    return (b + math.sqrt(b * b + 4 * k * fabric.latency)) / (2 * k)


def paper_min_block(flops: float, bandwidth: float) -> tuple[float, float]:
    """The Ring Attention paper's rule (Liu et al. 2023, Sec. 3 and Table 1): a block of c
    tokens costs 4*d*c^2 FLOPs (QK^T and PV, hidden size d, non-causal, forward) and sends
    4*c*d bytes (K and V in bf16), so overlap needs 4dc^2/F >= 4cd/B, i.e. c >= F/B; the
    table's "minimal sequence length" per device is 6 such blocks. Returns (c, 6c)."""
    c = flops / bandwidth
    return c, 6 * c


# ----------------------------------------------------------------------------- strategies

def ulysses_bytes(sh: Shape, s_local: int, u: int) -> float:
    """Bytes one device sends per direction in one Ulysses pass (all-to-all of q, k, v in
    and out back): (U-1)/U of each local shard, i.e. 4*(U-1)/U*|shard| for MHA, D == Dv."""
    c = _counts(sh, s_local)
    return (u - 1) / u * (c["Q"] + c["K"] + c["V"] + c["O"]) * sh.dtype_bytes


def ring_bytes(sh: Shape, s_local: int, world: int) -> float:
    """Bytes one device sends in one pass-KV forward: P-1 shards of K and V, i.e.
    2*(P-1)/P*|K| of the whole sequence's K (V alike) for D == Dv."""
    c = _counts(sh, s_local)
    return (world - 1) * (c["K"] + c["V"]) * sh.dtype_bytes


@dataclass
class Option:
    strategy: str               # "ring", "ulysses", "hybrid U x R"
    layout: str
    ulysses: int                # U (1 = pure ring)
    ring: int                   # R
    fwd: float                  # seconds per layer
    bwd: float
    fwd_bubble: float
    bwd_bubble: float
    fwd_steps: list[float] = field(default_factory=list)   # wall time of each ring step
    bwd_steps: list[float] = field(default_factory=list)
    fwd_comm: list[float] = field(default_factory=list)    # transfer time of each step
    bwd_comm: list[float] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def strategy_time(sh: Shape, seq: int, world: int, u: int, layout: str, causal: bool,
                  device: Device, fabric: Fabric, train: bool) -> Option:
    """Time per layer of ring (u = 1), Ulysses (u = P) or hybrid (Ulysses inside groups
    of u, a ring of R = P/u groups over heads / u). Ulysses' all-to-alls cannot overlap
    the attention they feed, so they are exposed; the ring's transfers hide behind
    compute when the step is long enough."""
    r = world // u
    s_local = seq // world
    note = ""
    if u > 1:
        # After the all-to-all each device holds S/R tokens of Hq/u heads and Hk/u KV heads
        ring_sh = Shape(sh.heads // u, sh.kv_heads // u, sh.head_dim, sh.layers, sh.batch,
                        sh.v_head_dim, sh.dtype_bytes, sh.acc_bytes, sh.lse_bytes)
        # U-1 messages per device per all-to-all; the bytes of the closed form
        a2a = (u - 1) * fabric.latency + ulysses_bytes(sh, s_local, u) / fabric.bandwidth
        note = f"all-to-all {a2a * 1e3:.2f} ms per pass exposed"
    else:
        ring_sh, a2a = sh, 0.0
    ring_local = seq // r
    fwd = ring_time(ring_sh, ring_local, r, layout, causal, device, fabric, "fwd")
    total_f = fwd.total + a2a
    bub_f = 1 - min(fwd.compute) / total_f if total_f else 0.0
    res = Option("ring" if u == 1 else ("ulysses" if r == 1 else f"hybrid {u}x{r}"),
                 layout if r > 1 else "-", u, r, total_f, 0.0, bub_f, 0.0, fwd.steps, [],
                 fwd.comm, [], note)
    if train:
        bwd = ring_time(ring_sh, ring_local, r, layout, causal, device, fabric, "bwd")
        res.bwd = bwd.total + a2a
        res.bwd_bubble = 1 - min(bwd.compute) / res.bwd if res.bwd else 0.0
        res.bwd_steps, res.bwd_comm = bwd.steps, bwd.comm
    return res


def options(sh: Shape, seq: int, world: int, causal: bool, device: Device, fabric: Fabric,
            train: bool) -> list[Option]:
    """Every strategy and layout that applies: the ring in each layout; Ulysses and hybrid
    when u divides the KV heads (K/V heads are split, never replicated)."""
    out = []
    layouts = LAYOUTS if causal else ("contiguous",)
    for u in [d for d in range(1, world + 1) if world % d == 0]:
        if u > 1 and (sh.kv_heads % u or sh.heads % u):
            continue
        for layout in layouts if world // u > 1 else ("contiguous",):
            out.append(strategy_time(sh, seq, world, u, layout, causal, device, fabric, train))
    return out


def max_context(sh: Shape, world: int, budget: float, train: bool, checkpointing: bool,
                multiple: int, cpu_threads: int = 0) -> int:
    """Largest S (a multiple of `multiple`) whose attention memory per device fits budget.
    Memory is linear in S_local, so two evaluations give it exactly."""
    def mem(s_local: int) -> float:
        return model_memory(sh, s_local, world, train, checkpointing, cpu_threads).peak
    unit = multiple // world if multiple >= world else 1
    m1, m2 = mem(unit), mem(2 * unit)
    slope = m2 - m1
    if slope <= 0 or m1 > budget:
        return 0
    n = int((budget - (m1 - slope)) // slope)   # mem(n * unit) = m1 + (n - 1) * slope
    while n > 0 and mem(n * unit) > budget:
        n -= 1
    return n * unit * world
