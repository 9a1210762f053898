"""Measure bf16 matmul TFLOP/s over an (m, n, k) grid on the local GPU and write it into the planner's data.

    python benchmarks/matmul_curve.py [--out megacluster/plan/data/kernels.json] [--quick]

Adds ``gpus[<name>]["measured"] = {"m": [...], "n": [...], "k": [...], "tflops": [flat m-major list]}`` for the
detected GPU (megacluster.hardware.detect_local_gpu) and updates the provenance line. The planner then
interpolates this grid (log-space) instead of its physical model. This script imports torch; the planner never does.
"""

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from megacluster.hardware import detect_local_gpu

GRID = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK = [512, 2048, 8192, 32768]


def tflops(m: int, n: int, k: int, iters: int = 20) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * m * n * k * iters / (start.elapsed_time(end) / 1e3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "megacluster/plan/data/kernels.json"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    gpu = detect_local_gpu()
    if gpu is None:
        raise SystemExit("no CUDA GPU from the catalogue found")
    grid = QUICK if args.quick else GRID
    flat = []
    for m in grid:
        for n in grid:
            for k in grid:
                if m * n + n * k + m * k > 2 ** 31:  # keep memory bounded (~4 GB of operands)
                    flat.append(flat[-1] if flat else 0.0)
                    continue
                flat.append(tflops(m, n, k))
    path = Path(args.out)
    data = json.loads(path.read_text())
    data["gpus"][gpu.name]["measured"] = {"m": grid, "n": grid, "k": grid, "tflops": flat}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    data["provenance"] += f" | {gpu.name}: MEASURED bf16 grid by benchmarks/matmul_curve.py on {stamp} (torch {torch.__version__})."
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {len(flat)} points for {gpu.name}; max {max(flat):.0f} TFLOP/s")


if __name__ == "__main__":
    main()
