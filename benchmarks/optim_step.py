"""Time the optimizer step alone (clip + AdamW update) of the two implementations in train/optim.py.

    python benchmarks/optim_step.py                         # GPT-2 1.5B's parameters on CUDA, both optimizers
    python benchmarks/optim_step.py --preset gpt2-124m --steps 50
    python benchmarks/optim_step.py --device cpu --preset tiny   # CPU check of this script
    python benchmarks/optim_step.py --device cpu --preset gpt2-124m --compile on   # compiled update on CPU

The model is built for real (its parameters, the decay split, tied weights); gradients are random, in the
dtype the trainer would hand over (fp32 for torch's AdamW over fp32 weights, bf16 for MasterAdamW with bf16
weights, gathered from p.grad as with one worker). Reports ms per step and the bytes per parameter each
implementation must move (torch: norm 4 + fused AdamW 28; master: gather 4 + norm 2 + update 28), as GB/s.
Warm-up steps (compilation) are excluded. One JSON line per implementation on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from megacluster import config
from megacluster.model import GPT
from megacluster.train import optim

BYTES_PER_PARAM = {"off": 4 + 28, "on": 4 + 2 + 28}  # see the module docstring


def bench(preset: str, master: str, device: torch.device, steps: int, warmup: int, compiled: bool) -> dict:
    cfg = config.build(preset, None, [f"optim.master_weights={master}"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opt = optim.build(model, cfg.optim, device, dtype, compiled)
    n = sum(p.numel() for p in opt.params)
    grads = [torch.randn_like(p) * 1e-3 for p in opt.params]  # kept: each step hands the same values over

    def step(i: int) -> None:
        for p, g in zip(opt.params, grads):
            p.grad = g
        opt.step(1e-4)

    for i in range(warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / steps
    return {"preset": preset, "master_weights": master, "params": n, "grad_dtype": str(grads[0].dtype),
            "ms_per_step": 1e3 * dt, "bytes_per_param": BYTES_PER_PARAM[master],
            "gb_per_s": BYTES_PER_PARAM[master] * n / dt / 1e9, "device": str(device), "compiled": compiled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-1.5b", choices=sorted(config.PRESETS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="compile MasterAdamW's update (auto: on CUDA, as the trainer's run.compile=auto)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    for master in ("off", "on"):
        compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        row = bench(args.preset, master, device, args.steps, args.warmup, compiled)
        print(f"master_weights={master:3s}  {row['ms_per_step']:8.2f} ms/step  {row['gb_per_s']:8.1f} GB/s "
              f"({row['bytes_per_param']} B/param x {row['params']:,})", file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
