"""plan(): the planner's answer for one configuration, and its readable table.

Memory is the attention's (model.py): inputs, outputs, lse and the ring's buffers, per
layer and for the whole model at the given checkpointing. Weights, optimizer state, MLP
activations and logits are not counted: pass them as `reserve` (bytes kept back from
the budget) to get the maximum context of the whole job.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from . import model as M
from .presets import DEVICES, FABRICS, GiB, load_preset, lookup, model_shape

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_BYTES = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}


def parse_tokens(text: str) -> int:
    """'1M' -> 1048576, '128k' -> 131072, '4096' -> 4096 (K and M are powers of 2, as in
    '128K context')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"ring_attn.plan: --seq must be a token count like 4096, 128K or "
                         f"1M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_bytes(text: str) -> float:
    """'80GiB' -> 80 * 2**30, '80GB' -> 80e9."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTES:
        raise ValueError(f"ring_attn.plan: --budget must be a size like 80GiB or 80GB, "
                         f"got {text!r}")
    return float(m.group(1)) * _BYTES[m.group(2).lower()]


def plan(model: str = "llama3-8b", seq: int | str = "1M", devices: int = 8,
         device: str = "h100", fabric: str = "nvlink4", train: bool = True,
         checkpointing: bool = False, budget: Optional[float | str] = None,
         reserve: float | str = 0, causal: bool = True, batch: int = 1,
         dtype_bytes: int = 2, preset: Optional[str] = None,
         efficiency: Optional[float] = None, shape: Optional[M.Shape] = None) -> dict[str, Any]:
    """The planner's answer as a dict (what --json prints)."""
    seq = parse_tokens(seq) if isinstance(seq, str) else int(seq)
    sh = shape or model_shape(model, batch, dtype_bytes)
    if preset:
        dev, fab, _ = load_preset(preset)
    else:
        dev, fab = lookup(DEVICES, device, "device"), lookup(FABRICS, fabric, "fabric")
    if efficiency is not None:
        dev = M.Device(dev.name, dev.flops, dev.memory, efficiency, dev.flops_bwd, dev.cores,
                       dev.core_flops, dev.core_flops_bwd, dev.table, dev.source)
    if devices < 1:
        raise ValueError(f"ring_attn.plan: --devices must be >= 1, got {devices}")
    multiple = 2 * devices   # zigzag needs 2P chunks (layout.required_multiple)
    if seq % multiple:
        raise ValueError(f"ring_attn.plan: --seq must be a multiple of 2 * devices = "
                         f"{multiple} (zigzag), got {seq}")
    budget_b = parse_bytes(budget) if isinstance(budget, str) else (budget or dev.memory)
    reserve_b = parse_bytes(reserve) if isinstance(reserve, str) else float(reserve)
    s_local = seq // devices
    # ring_attn's CPU kernels allocate a workspace per call (model.cpu_workspace)
    threads = (max(1, dev.cores // devices) if fab.shared_host else dev.cores) if dev.cores else 0
    layer = M.layer_memory(sh, s_local, devices, train, threads)
    whole = M.model_memory(sh, s_local, devices, train, checkpointing, threads)
    opts = M.options(sh, seq, devices, causal, dev, fab, train)
    key = (lambda o: o.fwd + o.bwd)
    best = min(opts, key=key)
    ring_best = min((o for o in opts if o.ulysses == 1), key=key)
    overlap = {ph: M.min_tokens_for_overlap(sh, dev, fab, ph, causal, devices)
               for ph in (("fwd", "bwd") if train else ("fwd",))}
    c, c6 = M.paper_min_block(dev.flops, fab.bandwidth)
    max_ctx = M.max_context(sh, devices, budget_b - reserve_b, train, checkpointing, multiple,
                            threads)
    fits = whole.peak + reserve_b <= budget_b
    return {
        "model": model if shape is None else "custom", "shape": sh.__dict__,
        "seq": seq, "devices": devices, "s_local": s_local, "train": train,
        "checkpointing": checkpointing, "causal": causal,
        "device": dev.__dict__, "fabric": fab.__dict__,
        "memory_layer": {"items": layer.items, "peak": layer.peak, "phase": layer.peak_phase},
        "memory_model": {"items": whole.items, "peak": whole.peak},
        "budget": budget_b, "reserve": reserve_b, "fits": fits, "max_context": max_ctx,
        "options": [o.as_dict() for o in opts],
        "min_tokens_per_device_for_overlap": overlap,
        "paper_rule": {"block": c, "min_seq_per_device": c6,
                       "note": "Liu et al. 2023: c >= F/B (peak FLOP/s over one-direction "
                               "bytes/s), minimal sequence per device 6c"},
        "recommendation": {"strategy": best.strategy, "layout": best.layout,
                           "ulysses": best.ulysses, "ring": best.ring,
                           "seconds_per_layer": key(best),
                           "ring_layout": ring_best.layout,
                           "block": f"S_local = {s_local} (the ring sends whole shards)",
                           "max_context": max_ctx},
    }


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2 ** 20:.1f} MiB"


def _fmt_tokens(n: float) -> str:
    if n >= 2 ** 20:
        return f"{n / 2 ** 20:.2f}M"
    return f"{n / 1024:.1f}K" if n >= 1024 else f"{n:.0f}"


def report(p: dict[str, Any]) -> str:
    """The readable table."""
    sh, dev, fab = p["shape"], p["device"], p["fabric"]
    mode = "training" if p["train"] else "inference (prefill)"
    lines = [
        f"{p['model']}: {sh['layers']} layers, {sh['heads']} heads / {sh['kv_heads']} KV "
        f"heads x {sh['head_dim']}, batch {sh['batch']}, {sh['dtype_bytes']}-byte inputs; "
        f"{mode}, {'causal' if p['causal'] else 'non-causal'}"
        f"{', checkpointing' if p['checkpointing'] else ''}",
        f"S = {_fmt_tokens(p['seq'])} tokens on {p['devices']} x {dev['name']} "
        f"({dev['flops'] / 1e12:.3g} TFLOP/s x {dev['efficiency']:.2f}), {fab['name']} "
        f"({fab['bandwidth'] / 1e9:.3g} GB/s, {fab['latency'] * 1e6:.0f} us): "
        f"S_local = {p['s_local']}",
        "",
        f"Memory per device, one layer's attention (peak in its {p['memory_layer']['phase']}):",
    ]
    for k, v in p["memory_layer"]["items"].items():
        lines.append(f"  {k:<42} {_fmt_bytes(v):>12}")
    lines.append(f"  {'peak (buffers live at different times)':<42} "
                 f"{_fmt_bytes(p['memory_layer']['peak']):>12}")
    lines.append("Whole model's attention per device:")
    for k, v in p["memory_model"]["items"].items():
        lines.append(f"  {k:<42} {_fmt_bytes(v):>12}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':<42} {_fmt_bytes(p['memory_model']['peak']):>12}   "
                 f"{verdict} in {_fmt_bytes(p['budget'])}"
                 + (f" less {_fmt_bytes(p['reserve'])} reserved" if p["reserve"] else ""))
    lines += ["", "Time per layer (ms) and bubble (worst rank idle, % of the pass):",
              f"  {'strategy':<14} {'layout':<11} {'fwd ms':>9} {'bubble':>7} "
              f"{'bwd ms':>9} {'bubble':>7}  {'first steps fwd (ms)'}"]
    for o in sorted(p["options"], key=lambda o: o["fwd"] + o["bwd"]):
        steps = " ".join(f"{s * 1e3:.2f}" for s in o["fwd_steps"][:4])
        bwd = (f"{o['bwd'] * 1e3:>9.2f} {100 * o['bwd_bubble']:>6.1f}%" if p["train"]
               else f"{'-':>9} {'-':>7}")
        lines.append(f"  {o['strategy']:<14} {o['layout']:<11} {o['fwd'] * 1e3:>9.2f} "
                     f"{100 * o['fwd_bubble']:>6.1f}% {bwd}  {steps}"
                     + (f"  ({o['note']})" if o["note"] else ""))
    ov = p["min_tokens_per_device_for_overlap"]
    lines += ["", "Minimum tokens per device for full overlap (balanced causal step):"
              if p["causal"] else "Minimum tokens per device for full overlap:"]
    for ph, n in ov.items():
        lines.append(f"  {ph}: S_local >= {n:,.0f}   (this run: {p['s_local']:,})")
    pr = p["paper_rule"]
    lines.append(f"  Ring Attention paper's rule on this device and fabric: block c = F/B = "
                 f"{pr['block']:,.0f}, per device 6c = {pr['min_seq_per_device']:,.0f}")
    r = p["recommendation"]
    lines += ["", f"Recommendation: {r['strategy']}"
              + (f", {r['layout']} layout" if r["ring"] > 1 else "")
              + f" ({r['seconds_per_layer'] * 1e3:.2f} ms per layer"
              + (" fwd+bwd" if p["train"] else " fwd") + f"); pure ring: {r['ring_layout']}; "
              f"{r['block']}.",
              f"Maximum context whose attention fits {_fmt_bytes(p['budget'] - p['reserve'])}"
              f" per device on {p['devices']} devices: {_fmt_tokens(r['max_context'])} tokens "
              f"({r['max_context']:,})."]
    return "\n".join(lines)
