"""The planner: memory, step time and bubble of ring attention before a run.

    python -m ring_attn.plan --model llama3-8b --seq 1M --devices 8 --device h100
    ring_attn.plan.plan(model="llama3-8b", seq="1M", devices=8, device="h100")

model.py holds every formula; presets.py the models, devices and fabrics; calibrate.py
measures this machine; planner.py assembles the answer.
"""
from .planner import plan, report

__all__ = ["plan", "report"]
