"""Data-parallel scaling of ViT-B/16 MixedAE pretraining: a model, not a measurement.

Counts the gradient bytes DDP all-reduces per optimizer step (the parameters of configs/vit_base.yaml's
model, built on the CPU), and from a measured one-GPU step time and assumed link bandwidths gives the
all-reduce time of a ring (``2 (W-1)/W x bytes / bus bandwidth``) and the expected efficiency with
and without overlap with backward. BENCHMARKS.md ("Scaling") prints its table and states the
assumptions. Run: ``python -m mixedae_fast.benchmarks.scaling_model``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

STEP_FILE = Path(__file__).resolve().parent / "results" / "2026-11-26_H200" / "bench_step_reference.json"
BUCKET_MB = 25.0  # DDP's bucket (dist.bucket_mb), in fp32 gradient bytes; the last one cannot overlap
BACKWARD_SHARE = 2 / 3  # backward ~ 2x forward FLOPs: the window in which buckets are all-reduced
EFF = 0.8  # a ring reaches ~80% of the line rate of its slowest link
NVLINK_GBS = 450.0  # NVLink 4 (H100/H200 SXM), one direction, per GPU
NIC_GBS = 50.0  # InfiniBand NDR, 400 Gb/s, one direction
ALPHA_US = {"nvlink": 1.0, "ib": 5.0}  # per-hop latency of a ring step


def fabric(nodes: int, nics: int) -> tuple[int, float, float]:
    """(ranks, bus bandwidth GB/s, per-hop latency us) of ``nodes`` x 8 GPUs. Across nodes NCCL runs
    one ring per NIC, so the bus bandwidth is the node's NICs together, capped by NVLink."""
    if nodes == 1:
        return 8, EFF * NVLINK_GBS, ALPHA_US["nvlink"]
    return 8 * nodes, EFF * min(NVLINK_GBS, nics * NIC_GBS), ALPHA_US["ib"]


FABRICS = {"1 node, NVLink": (1, 0), **{f"{n} nodes, {k}x400 Gb/s": (n, k) for k in (8, 4) for n in (2, 4, 16)}}


def gradient_parameters() -> int:
    """Trainable parameters of the vit_base preset (all of them receive a gradient each step)."""
    from mixedae_fast.config import load_config
    from mixedae_fast.model.mixedae import build_model

    model = build_model(load_config("vit_base"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def allreduce_ms(nbytes: float, world: int, busbw_gbs: float, alpha_us: float, buckets: int = 1) -> float:
    """A ring all-reduce of ``nbytes`` in ``buckets`` pieces: ``2(W-1)`` steps of latency per piece,
    and ``2(W-1)/W x bytes`` through each rank's link."""
    steps = 2 * (world - 1)
    return buckets * steps * alpha_us * 1e-3 + steps / world * nbytes / (busbw_gbs * 1e9) * 1e3


def efficiency(step_ms: float, comm_ms: float, last_ms: float) -> tuple[float, float]:
    """(no overlap, overlap): the step stretched by all of the all-reduce, or by what backward cannot hide."""
    exposed = last_ms + max(0.0, comm_ms - BACKWARD_SHARE * step_ms)
    return step_ms / (step_ms + comm_ms), step_ms / (step_ms + exposed)


def main() -> None:
    params = gradient_parameters()
    buckets = math.ceil(params * 4 / (BUCKET_MB * 1e6))
    rows = json.loads(STEP_FILE.read_text())["rows"]
    steps = {"topk": rows["topk"]["ms_per_step"], "mae": rows["mae"]["ms_per_step"]}
    print(f"parameters with gradients: {params:,}; per step fp32 {params * 4 / 1e6:.1f} MB, bf16 "
          f"{params * 2 / 1e6:.1f} MB, in {buckets} buckets")
    print(f"one-GPU step (H200, batch 256, {STEP_FILE.name}): TopK+HC {steps['topk']:.1f} ms, MAE mode "
          f"{steps['mae']:.1f} ms")
    print("| fabric (8 GPUs a node) | ranks | bus GB/s | all-reduce ms, fp32 / bf16 | TopK step: no overlap fp32 / "
          "bf16, overlapped fp32 | MAE-mode step: same |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (nodes, nics) in FABRICS.items():
        world, busbw, alpha = fabric(nodes, nics)
        comm = {b: allreduce_ms(params * b, world, busbw, alpha, buckets) for b in (4, 2)}
        last = allreduce_ms(BUCKET_MB * 1e6, world, busbw, alpha)
        cells = []
        for step in (steps["topk"], steps["mae"]):
            (fp32, over), (bf16, _) = efficiency(step, comm[4], last), efficiency(step, comm[2], last)
            cells.append(f"{100 * fp32:.1f}% / {100 * bf16:.1f}%, {100 * over:.1f}%")
        print(f"| {name} | {world} | {busbw:.0f} | {comm[4]:.1f} / {comm[2]:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
