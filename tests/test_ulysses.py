"""Ulysses and the 2-D hybrid (ring_attn.parallel) over real gloo process groups.

One spawn of 4 processes runs P = 4 as 4x1, 1x4 and 2x2 (U x R: Ulysses x ring, as
DeviceMeshes, 2x2 in both dim orders), and P = 2 on a subgroup of the last two ranks (pure
Ulysses through ulysses_attention, and 2x1 / 1x2 through the (ulysses_group, ring_group)
pair). Every rank builds the same full inputs and the float64 reference (torch SDPA on the
full sequence), runs on its shard (hybrid_positions), and compares its shard of out, dq,
dk, dv: error <= a small multiple of torch's float32 SDPA error. Cases: causal and not,
every layout on the ring dim, GQA with Hk >= U and Hk < U, key-padding masks (bool, and
additive per head); dropout with U = 1 equal to single-device
ring_attn.scaled_dot_product_attention for the same seed, refused on every rank for U > 1;
cross-rank disagreement (is_causal, heads, mesh shape) raising on every rank.
"""
from __future__ import annotations

import torch

import ring_attn
from dist_utils import assert_all_ok, run_ranks
from helpers import assert_close_to_ref, random_float_mask, sdpa_reference
from ring_attn.layout import LAYOUTS, runs_to_positions
from ring_attn.parallel.hybrid import (hybrid_attention, hybrid_local_runs, hybrid_positions,
                                       hybrid_shard, hybrid_unshard)
from ring_attn.parallel.strategy import check_strategy, strategy_attention
from ring_attn.parallel.ulysses import head_plans, ulysses_attention


def _full_inputs(seed: int, s: int, hq: int, hk: int, d: int = 12, dv: int = 10):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, s, d, generator=g)
    k = torch.randn(2, hk, s, d, generator=g)
    v = torch.randn(2, hk, s, dv, generator=g)
    dout = torch.randn(2, hq, s, dv, generator=g)
    return (q, k, v, dout), g


def _mask(kind: str, s: int, hq: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "keypad":
        return torch.arange(s).lt(s - 3).view(1, 1, 1, s)  # one row serves every rank
    return random_float_mask((2, hq, 1, s), torch.float32, g)  # additive, per head


def _ref_mask(mask, causal: bool, s: int):
    if not causal:
        return mask
    tri = torch.ones(s, s, dtype=torch.bool).tril()
    if mask is None:
        return tri
    return mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))


def _grads(out, dout, xs):
    return torch.autograd.grad(out, xs, dout)


class Mesh:
    """A (ulysses_group, ring_group) mesh, or a DeviceMesh, with this rank's coordinates."""

    def __init__(self, name: str, mesh, u: int, u_size: int, r: int, r_size: int):
        self.name, self.mesh = name, mesh
        self.u, self.u_size, self.r, self.r_size = u, u_size, r, r_size

    def positions(self, s_local: int, layout: str) -> torch.Tensor:
        return runs_to_positions(hybrid_local_runs(self.u, self.u_size, self.r, self.r_size,
                                                   s_local, layout))


def _run_case(m: Mesh, layout: str, causal: bool, hq: int, hk: int, kind: str, seed: int,
              failures: list[str], api: str = "hybrid",
              dtype: torch.dtype = torch.float32) -> None:
    """One configuration through `api`: "hybrid" (hybrid_attention on m.mesh), "ulysses"
    (ulysses_attention on m.mesh[0]) or "strategy:<name>" (strategy_attention)."""
    p = m.u_size * m.r_size
    s_local = 3 if m.u_size > 1 else (4 if layout == "zigzag" else 5)  # odd where allowed
    s = p * s_local
    (q, k, v, dout), g = _full_inputs(seed, s, hq, hk)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    mask = _mask(kind, s, hq, g)
    ref_mask = _ref_mask(mask, causal, s)
    xs64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*xs64, attn_mask=ref_mask, enable_gqa=hq != hk)
    ref_g = _grads(ref, dout.double(), xs64)
    xst = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = sdpa_reference(*xst, attn_mask=ref_mask, enable_gqa=hq != hk, dtype=dtype)
    theirs_g = _grads(theirs, dout, xst)
    pos = m.positions(s_local, layout)
    ql, kl, vl = (t.index_select(2, pos).contiguous().requires_grad_() for t in (q, k, v))
    if api == "hybrid":
        out = hybrid_attention(ql, kl, vl, mesh=m.mesh, layout=layout, is_causal=causal,
                               attn_mask=mask)
    elif api == "ulysses":
        out = ulysses_attention(ql, kl, vl, group=m.mesh[0], is_causal=causal, attn_mask=mask)
    else:
        strategy = api.split(":")[1]
        where = {"hybrid": {"mesh": m.mesh, "layout": layout},
                 "ulysses": {"layout": "contiguous"}}
        out = strategy_attention(ql, kl, vl, strategy=strategy, is_causal=causal,
                                 attn_mask=mask, **where.get(strategy, {"layout": layout}))
    got = [out, *_grads(out, dout.index_select(2, pos), (ql, kl, vl))]
    what = (f"{m.name} (u={m.u}, r={m.r}) {layout} causal={causal} hq={hq} hk={hk} "
            f"mask={kind} via {api} {dtype}")
    for name, ours, r, t in zip(("out", "dq", "dk", "dv"), got, [ref, *ref_g],
                                [theirs, *theirs_g]):
        try:
            assert_close_to_ref(ours, t.detach().index_select(2, pos),
                                r.detach().index_select(2, pos), factor=4.0,
                                what=f"{what} {name}")
        except AssertionError as e:
            failures.append(str(e))


def _run_dropout(m: Mesh, failures: list[str]) -> None:
    """Equal to single-device ring_attn SDPA for the same seed on every mesh: each rank
    keys the kernels' RNG with its global head offset, and the hybrid's ring takes the seed
    its Ulysses step agreed on (torch's generator moves once, as on one device)."""
    s_local = 4
    s = m.u_size * m.r_size * s_local
    (q, k, v, dout), _ = _full_inputs(99, s, 4, 2)
    pure_ulysses = m.r_size == 1 and m.u_size > 1
    layout = "contiguous" if pure_ulysses else "zigzag"
    pos = m.positions(s_local, layout)
    ql, kl, vl = (t.index_select(2, pos).contiguous().requires_grad_() for t in (q, k, v))
    torch.manual_seed(2024)
    if pure_ulysses:
        from ring_attn.parallel.hybrid import mesh_groups
        out = ring_attn.ulysses_attention(ql, kl, vl, group=mesh_groups(m.mesh)[0],
                                          is_causal=True, dropout_p=0.25)
    else:
        out = hybrid_attention(ql, kl, vl, mesh=m.mesh, is_causal=True, dropout_p=0.25)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(2024)
    one = ring_attn.scaled_dot_product_attention(*xs, is_causal=True, dropout_p=0.25,
                                                 enable_gqa=True)
    one_g = _grads(one, dout, xs)
    got = [out, *_grads(out, dout.index_select(2, pos), (ql, kl, vl))]
    for name, ours, single in zip(("out", "dq", "dk", "dv"), got, [one, *one_g]):
        try:  # the same elements dropped: only float32 summation order differs
            assert_close_to_ref(ours, None, single.detach().index_select(2, pos),
                                atol_floor=2e-6, what=f"dropout {m.name} {name}")
        except AssertionError as e:
            failures.append(str(e))


def _run_shard_unshard(m: Mesh, failures: list[str]) -> None:
    """hybrid_shard -> hybrid_attention -> hybrid_unshard: full out and full gradients on
    every rank equal the float64 single-device ones; hybrid_positions agrees."""
    s = m.u_size * m.r_size * 4
    (q, k, v, dout), _ = _full_inputs(5, s, 4, 4)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    shards = [hybrid_shard(x, mesh=m.mesh, layout="zigzag") for x in xs]
    out = hybrid_attention(*shards, mesh=m.mesh, is_causal=True)
    full = hybrid_unshard(out, mesh=m.mesh)
    (full * dout.double()).sum().backward()
    xr = [t.double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*xr, is_causal=True)
    for name, ours, r in zip(("out", "dq", "dk", "dv"), [full, *(x.grad for x in xs)],
                             [ref, *_grads(ref, dout.double(), xr)]):
        try:
            assert_close_to_ref(ours, None, r, what=f"shard/unshard {m.name} {name}")
        except AssertionError as e:
            failures.append(str(e))
    if hybrid_positions(4, mesh=m.mesh).tolist() != m.positions(4, "zigzag").tolist():
        failures.append(f"{m.name}: hybrid_positions disagrees with hybrid_local_runs")


def _expect_raise(fn, exc, words: list[str], what: str, failures: list[str]) -> None:
    """fn raises exc whose message holds one of words."""
    try:
        fn()
    except exc as e:
        if not any(w in str(e) for w in words):
            failures.append(f"{what}: message {str(e)!r} holds none of {words}")
        return
    except Exception as e:  # noqa: BLE001 - reported
        failures.append(f"{what}: raised {e!r}, expected {exc.__name__}")
        return
    failures.append(f"{what}: did not raise")


def _run_saturated(m: Mesh, failures: list[str]) -> None:
    """Head 0 masked on every key by finfo(float32).min: its rows saturate (merge.
    saturated_rows) on the one Ulysses rank that holds head 0. With a gradient there, every
    rank of the mesh must raise before the next transfer (a lone raise would leave the
    others in an all-to-all until the process group's timeout, 30 s here); with a zero
    gradient on head 0, the backward runs and matches the float64 reference."""
    s_local = 4
    s = m.u_size * m.r_size * s_local
    (q, k, v, dout), _ = _full_inputs(5, s, 4, 2)
    mask = torch.zeros(1, 4, 1, s)
    mask[:, 0] = torch.finfo(torch.float32).min
    pos = m.positions(s_local, "zigzag")
    for zero_head0 in (False, True):
        ql, kl, vl = (t.index_select(2, pos).contiguous().requires_grad_() for t in (q, k, v))
        d = dout.clone()
        if zero_head0:
            d[:, 0] = 0
        out = hybrid_attention(ql, kl, vl, mesh=m.mesh, attn_mask=mask)
        try:
            got = _grads(out, d.index_select(2, pos), (ql, kl, vl))
        except RuntimeError as e:
            if zero_head0 or "huge finite additive" not in str(e):
                failures.append(f"{m.name} saturated (zero_head0={zero_head0}): {e}")
            continue
        if not zero_head0:
            failures.append(f"{m.name}: a saturated row with a gradient did not raise")
            continue
        xs = [t.double().requires_grad_() for t in (q, k, v)]
        ref = sdpa_reference(*xs, attn_mask=mask.double(), enable_gqa=True)
        want = _grads(ref, d.double(), xs)
        for name, a, r in zip(("dq", "dk", "dv"), got, want):
            try:
                assert_close_to_ref(a, None, r.index_select(2, pos), factor=4.0,
                                    what=f"{m.name} saturated, zero grad {name}")
            except AssertionError as e:
                failures.append(str(e))


def _run_disagreements(m: Mesh, rank: int, failures: list[str]) -> None:
    """One rank differs: every rank of the mesh raises before any transfer (a rank that
    went on would block in the all-to-all or the ring; the gloo timeout would fail the
    test): the ranks that see the difference name it, the others name the group that
    rejected. Afterwards a good call still works (the call numbers stayed in step)."""
    s_local = 4
    (q, k, v, _), _ = _full_inputs(3, s_local, 8, 4)
    q4, k4, v4 = q[:, :4], k[:, :2], v[:, :2]
    odd = rank == 3
    _expect_raise(lambda: hybrid_attention(q4, k4, v4, mesh=m.mesh, is_causal=odd),
                  RuntimeError, ["is_causal", "rejected"], f"{m.name} causal differs", failures)
    _expect_raise(lambda: hybrid_attention(q if odd else q4, k4, v4, mesh=m.mesh),
                  RuntimeError, ["query heads", "rejected"], f"{m.name} heads differ", failures)
    _expect_raise(lambda: hybrid_attention(q[:, :3], k[:, :3], v[:, :3], mesh=m.mesh),
                  RuntimeError, ["divisible by the Ulysses group size 2, got 3"],
                  f"{m.name} heads % U", failures)
    out = hybrid_attention(q4, k4, v4, mesh=m.mesh)
    if out.shape != q4.shape[:3] + (v4.size(3),):
        failures.append(f"{m.name}: good call after refusals gave shape {tuple(out.shape)}")
    # Backwards in different orders (rank 3 runs call 2's first), and a double backward on
    # rank 3: every rank raises before the first backward transfer.
    xs = [t.clone().requires_grad_() for t in (q4, k4, v4)]
    outs = [hybrid_attention(*xs, mesh=m.mesh) for _ in range(2)]
    first = outs[1] if odd else outs[0]
    _expect_raise(lambda: first.sum().backward(retain_graph=True), RuntimeError,
                  ["ring call whose backward runs"], f"{m.name} backward order", failures)
    _expect_raise(lambda: torch.autograd.grad(outs[0].sum(), xs, create_graph=odd),
                  RuntimeError, ["double backward", "ring call whose backward runs"],
                  f"{m.name} double backward", failures)


def _count_collectives(m: Mesh, failures: list[str], want: dict[str, int]) -> None:
    """U = 1 is the pure ring and R = 1 pure Ulysses, with no communication of the other
    kind: count the collectives of one forward."""
    import torch.distributed as dist
    counts = {"all_gather": 0, "all_to_all_single": 0, "batch_isend_irecv": 0}
    saved = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return saved[name](*args, **kwargs)
        return call
    (q, k, v, _), _ = _full_inputs(4, 2, 4, 4)  # this rank's shards, S_local = 2
    try:
        for name in counts:
            setattr(dist, name, counting(name))
        hybrid_attention(q, k, v, mesh=m.mesh, is_causal=True)
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    if counts != want:
        failures.append(f"{m.name}: one forward made {counts}, expected {want}")


def ulysses_checks(rank: int, world_size: int) -> tuple[int, list[str]]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    failures: list[str] = []
    meshes = []
    for shape, names in (((4, 1), ("ulysses", "ring")), ((1, 4), ("ulysses", "ring")),
                         ((2, 2), ("ulysses", "ring")), ((2, 2), ("ring", "ulysses"))):
        dm = init_device_mesh("cpu", shape, mesh_dim_names=names)
        u, r = dm.get_local_rank("ulysses"), dm.get_local_rank("ring")
        sizes = dict(zip(names, shape))
        meshes.append(Mesh(f"{sizes['ulysses']}x{sizes['ring']} {names[0]}-major", dm, u,
                           sizes["ulysses"], r, sizes["ring"]))
    # P = 2 on the last two ranks (group ranks differ from global ranks), as a pair.
    pair = dist.new_group([2, 3])
    singles = [dist.new_group([i]) for i in range(world_size)]
    n = 0
    for m in meshes:
        for layout in LAYOUTS if m.r_size > 1 else ("zigzag",):
            for causal in (False, True):
                for hq, hk in ((4, 4), (4, 2), (4, 1)):
                    kinds = ("none", "keypad") if hk != 2 else ("float",)
                    for kind in kinds:
                        _run_case(m, layout, causal, hq, hk, kind, n, failures)
                        n += 1
        _run_dropout(m, failures)
        _run_shard_unshard(m, failures)
    _run_disagreements(meshes[2], rank, failures)
    for m in (meshes[0], meshes[2]):  # Ulysses 4x1, hybrid 2x2
        _run_saturated(m, failures)
    # 4x1: the Ulysses agreement, q/k/v out and out back; 1x4: the ring's agreement, 3 steps.
    _count_collectives(meshes[0], failures, {"all_gather": 1, "all_to_all_single": 2,
                                             "batch_isend_irecv": 0})
    _count_collectives(meshes[1], failures, {"all_gather": 1, "all_to_all_single": 0,
                                             "batch_isend_irecv": 3})
    # strategy_attention: "ring" and "ulysses" on the world group, "hybrid" on a mesh.
    world_ring = Mesh("1x4 world", None, 0, 1, rank, 4)
    world_ulysses = Mesh("4x1 world", None, rank, 4, 0, 1)
    for m, api in ((world_ring, "strategy:ring"), (world_ulysses, "strategy:ulysses"),
                   (meshes[3], "strategy:hybrid")):
        _run_case(m, "striped", True, 4, 2, "keypad", n, failures, api=api)
        n += 1
    for m in meshes[:3]:  # bf16 on the wire and in the kernels
        _run_case(m, "zigzag", True, 4, 1, "keypad", n, failures, dtype=torch.bfloat16)
        n += 1
    if rank >= 2:
        pr = rank - 2
        as_ulysses = Mesh("2x1 pair", (pair, singles[rank]), pr, 2, 0, 1)
        as_ring = Mesh("1x2 pair", (singles[rank], pair), 0, 1, pr, 2)
        for causal in (False, True):
            for hq, hk in ((4, 2), (2, 1)):
                _run_case(as_ulysses, "zigzag", causal, hq, hk, "keypad", n, failures,
                          api="ulysses")
                _run_case(as_ulysses, "zigzag", causal, hq, hk, "none", n + 1, failures)
                for layout in LAYOUTS:
                    _run_case(as_ring, layout, causal, hq, hk, "keypad", n + 2, failures)
                    n += 1
                n += 2
        # Mesh shape disagreement inside a row: rank 3 says the ring is the pair (R = 2)
        # while rank 2 says R = 1; both raise before any transfer.
        bad = (pair, pair if rank == 3 else singles[rank])
        (q, k, v, _), _ = _full_inputs(1, 4, 4, 4)
        _expect_raise(lambda: hybrid_attention(q, k, v, mesh=bad), RuntimeError,
                      ["ring size"], "mesh shape differs", failures)
    dist.barrier()
    return n, failures


def test_check_strategy() -> None:
    for args, words in ((("pipeline", None, None, "zigzag"), "strategy must be one of"),
                        (("ulysses", None, None, "zigzag"), "layout='contiguous'"),
                        (("hybrid", None, None, "zigzag"), "needs mesh="),
                        (("ring", None, (None, None), "zigzag"), "mesh= is for")):
        try:
            check_strategy(*args)
        except ValueError as e:
            assert words in str(e), (args, str(e))
        else:
            raise AssertionError(f"check_strategy{args} did not raise")
    check_strategy("hybrid", None, (None, None), "striped")


def test_head_plans() -> None:
    """GQA routing: K/V heads scattered when Hk % U == 0, each replicated to exactly the
    ranks whose query heads read it when U % Hk == 0; other counts refused."""
    for hq, hk, u in ((8, 8, 4), (8, 4, 4), (8, 2, 4), (8, 1, 4), (4, 1, 2), (6, 3, 3)):
        qp, kp = head_plans(hq, hk, u)
        g = hq // hk
        for j in range(u):
            needed = {h // g for h in range(qp.starts[j], qp.starts[j] + qp.count)}
            assert needed == set(range(kp.starts[j], kp.starts[j] + kp.count)), (hq, hk, u, j)
    for hq, hk, u in ((6, 6, 4), (8, 8, 3), (12, 6, 4)):
        try:
            head_plans(hq, hk, u)
        except RuntimeError as e:
            assert str(u) in str(e)
        else:
            raise AssertionError(f"head_plans({hq}, {hk}, {u}) did not raise")


def test_ulysses_and_hybrid_match_single_device(tmp_path) -> None:
    results = assert_all_ok(run_ranks(ulysses_checks, 4, tmp_path, pg_timeout_s=30,
                                      join_timeout_s=240))
    for rank, (n, failures) in enumerate(results):
        assert n >= 100, f"rank {rank} ran only {n} cases"
        assert not failures, "\n".join(failures)
