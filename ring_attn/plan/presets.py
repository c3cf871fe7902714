"""Presets: model attention shapes, devices and fabrics, each with the public figure used.

Devices: peak DENSE bf16 tensor FLOP/s (datasheets quote 2x "with sparsity") and memory
as the datasheet states it in GB (taken as 1e9 bytes: conservative against GiB).
`efficiency` is the fraction of that peak an attention kernel reaches: 0.6 for GPUs, from
FlashAttention-2 (50-73% of A100 peak forward, Dao 2023) and FlashAttention-3 (~75% of
H100 bf16 peak forward, Shah et al. 2024), rounded down for the backward. It is NOT a
measurement of ring_attn's own CUDA kernels (no GPU here); pass --efficiency to change it.

Fabrics: the bandwidth per direction between two ring neighbours (one link of the ring)
and a per-message latency. Bandwidths are the vendors' figures; latencies are typical
small-message values (a few microseconds on NVLink, ~5-10 us on InfiniBand/RoCE), an
assumption that matters only at small S_local.

"this CPU" (`cpu`) and `gloo` (loopback between local processes) come from
`python -m ring_attn.plan --calibrate` on the machine the planner runs on; the defaults
below are what it measured on the 2-core development VM (see calibrate.py), and
`--preset path.json` loads a fresh calibration.
"""
from __future__ import annotations

import json
from typing import Any

from .model import Device, Fabric, Shape

GB = 1e9
GiB = 1024 ** 3

# name: (heads, kv_heads, head_dim, layers, hidden), from each model's config.json on the
# Hugging Face hub (num_attention_heads, num_key_value_heads, hidden_size / heads,
# num_hidden_layers, hidden_size).
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "llama3-8b": (32, 8, 128, 32, 4096),        # meta-llama/Meta-Llama-3-8B
    "llama3-70b": (64, 8, 128, 80, 8192),       # meta-llama/Meta-Llama-3-70B
    "llama3-405b": (128, 8, 128, 126, 16384),   # meta-llama/Llama-3.1-405B
    "qwen2.5-7b": (28, 4, 128, 28, 3584),       # Qwen/Qwen2.5-7B
    "qwen2.5-72b": (64, 8, 128, 80, 8192),      # Qwen/Qwen2.5-72B
    "mistral-7b": (32, 8, 128, 32, 4096),       # mistralai/Mistral-7B-v0.1
}

DEVICES: dict[str, Device] = {
    "a100": Device("A100 SXM 80GB", 312e12, 80 * GB, 0.6,
                   source="NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e"),
    "h100": Device("H100 SXM5 80GB", 989e12, 80 * GB, 0.6,
                   source="NVIDIA H100 datasheet: 1979 TFLOPS bf16 with sparsity "
                          "(989 dense), 80 GB HBM3"),
    "h200": Device("H200 SXM 141GB", 989e12, 141 * GB, 0.6,
                   source="NVIDIA H200 datasheet: 1979 TFLOPS bf16 with sparsity "
                          "(989 dense), 141 GB HBM3e"),
    "b200": Device("B200 180GB", 2.25e15, 180 * GB, 0.6,
                   source="NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 training / 8 GPUs, "
                          "4.5 PFLOPS FP16/BF16 with sparsity per GPU (2.25 dense), "
                          "1440 GB / 8 = 180 GB HBM3e"),
    # Measured by calibrate.py on the 2-core development VM (AMD EPYC, AVX-512, torch
    # 2.15), ring_attn's own CPU kernels, fp32, B=1 H=8 D=64, whole S = 2048 blocks, at a
    # load average of ~3 (2026-11-28 17:03 UTC): 182 / 201 GFLOP/s forward / backward on
    # 2 threads, 98 / 103 on one. At a load of 10-18 the same calibration gave 5-7x less:
    # calibrate on the machine, at the time, you plan for.
    "cpu": Device("this CPU (2-core VM, calibrated)", 182e9, 25e9, 1.0,
                  flops_bwd=201e9, cores=2, core_flops=98e9, core_flops_bwd=103e9,
                  source="python -m ring_attn.plan --calibrate (2-core VM, 17:03 UTC)"),
}

FABRICS: dict[str, Fabric] = {
    "nvlink3": Fabric("NVLink 3 (A100)", 300 * GB, 5e-6,
                      source="NVIDIA A100: 600 GB/s NVLink per GPU, both directions"),
    "nvlink4": Fabric("NVLink 4 (H100/H200)", 450 * GB, 5e-6,
                      source="NVIDIA H100: 900 GB/s NVLink per GPU, both directions"),
    "nvlink5": Fabric("NVLink 5 (B200)", 900 * GB, 5e-6,
                      source="NVIDIA Blackwell: 1.8 TB/s NVLink per GPU, both directions"),
    "ib-hdr": Fabric("InfiniBand HDR (1 NIC/GPU)", 25 * GB, 10e-6,
                     source="HDR 200 Gb/s per port = 25 GB/s per direction"),
    "ib-ndr": Fabric("InfiniBand NDR (1 NIC/GPU)", 50 * GB, 10e-6,
                     source="NDR 400 Gb/s per port = 50 GB/s per direction"),
    "ib-xdr": Fabric("InfiniBand XDR (1 NIC/GPU)", 100 * GB, 10e-6,
                     source="XDR 800 Gb/s per port = 100 GB/s per direction"),
    "pcie4": Fabric("PCIe 4.0 x16", 32 * GB, 10e-6,
                    source="16 GT/s x 16 lanes, 128b/130b: 31.5 GB/s per direction"),
    "pcie5": Fabric("PCIe 5.0 x16", 64 * GB, 10e-6,
                    source="32 GT/s x 16 lanes, 128b/130b: 63 GB/s per direction"),
    "ethernet": Fabric("Ethernet 100 GbE (RoCE)", 12.5 * GB, 20e-6,
                       source="100 Gb/s = 12.5 GB/s per direction"),
    # Measured by calibrate.py: 2 local processes, gloo send/recv of 4 KiB-16 MiB, fitted
    # in relative error (2-core VM, 2026-11-28 17:03 UTC).
    "gloo": Fabric("gloo loopback (calibrated)", 2.6 * GB, 79e-6, shared_host=True,
                   source="python -m ring_attn.plan --calibrate (2-core VM, 17:03 UTC)"),
}


def model_shape(name: str, batch: int = 1, dtype_bytes: int = 2) -> Shape:
    if name not in MODELS:
        raise ValueError(f"ring_attn.plan: --model must be one of {sorted(MODELS)}, "
                         f"got {name!r}")
    h, hk, d, layers, hidden = MODELS[name]
    return Shape(h, hk, d, layers, batch, None, dtype_bytes,
                 8 if dtype_bytes == 8 else 4, 8, hidden)


def lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"ring_attn.plan: --{what} must be one of {sorted(table)}, "
                         f"got {name!r}")
    return table[name]


def load_preset(path: str) -> tuple[Device, Fabric, dict]:
    """A calibration file (calibrate.py) -> (device, fabric, the raw record)."""
    with open(path) as f:
        rec = json.load(f)
    d, fb = rec["device"], rec["fabric"]
    device = Device(d["name"], d["flops"], d["memory"], d.get("efficiency", 1.0),
                    d.get("flops_bwd"), d.get("cores", 0), d.get("core_flops"),
                    d.get("core_flops_bwd"), tuple(d.get("table", ())),
                    source=f"calibrated: {path}")
    fabric = Fabric(fb["name"], fb["bandwidth"], fb["latency"], fb.get("shared_host", True),
                    source=f"calibrated: {path}")
    return device, fabric, rec
