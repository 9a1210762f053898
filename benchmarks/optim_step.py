"""Time the optimizer step alone (clip + AdamW update) of the two implementations in train/optim.py.

    python benchmarks/optim_step.py                         # GPT-2 1.5B's parameters on CUDA, every implementation
    python benchmarks/optim_step.py --tiles 2048x8 4096x8     # also the in-place kernels at other BLOCK x warps
    python benchmarks/optim_step.py --tiles 1024x4x4 1024x4x16  # ... x blocks a program in the sum of squares
    python benchmarks/optim_step.py --preset gpt2-124m --steps 50
    python benchmarks/optim_step.py --device cpu --preset tiny   # CPU check of this script
    python benchmarks/optim_step.py --device cpu --preset gpt2-124m --compile on   # compiled update on CPU

The model is built for real (its parameters, the decay split, tied weights); gradients are random, in the
dtype the trainer would hand over (fp32 for torch's AdamW over fp32 weights, bf16 for MasterAdamW with bf16
weights, with one worker: gathered from p.grad, or read in place by kernels.BlockTable where Triton runs:
`optim.update_kernel`). Reports ms per step and, as GB/s, the bytes per parameter
each implementation must move at the least (`bytes_per_param`: on CUDA torch 4 + 28 = 32; master, with the
norm's read of the bf16 gradients and the update's 28 (bf16 weights written too): gathered 2 + 4 + 28 = 34, in
place 2 + 28 = 30).
Warm-up steps (compilation) are excluded. One JSON line per implementation on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from megacluster import config, kernels
from megacluster.model import GPT
from megacluster.train import optim



def bytes_per_param(opt, grad_bytes: int) -> int:
    """The least bytes per parameter one step must move: 4 fp32 weight (or master) + grad + 8 moments read,
    4 + 8 written, plus the norm's read of the grads; torch's non-fused path divides the grads for the clip
    (read + write), MasterAdamW gathers them (read + write) and writes the bf16 weights when they are a copy."""
    update = 4 + grad_bytes + 8 + 12
    if isinstance(opt, optim.TorchAdamW):
        return grad_bytes + update + (0 if opt.opt.defaults.get("fused") else 2 * grad_bytes)
    gather = 0 if opt.table is not None else 2 * grad_bytes
    return gather + grad_bytes + update + (0 if opt.flat is opt.master else opt.flat.element_size())


def bench(preset: str, master: str, kernel: str, device: torch.device, steps: int, warmup: int,
          compiled: bool) -> dict:
    cfg = config.build(preset, None, [f"optim.master_weights={master}", f"optim.update_kernel={kernel}"])
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it lives (1.5B parameters initialise slowly on a CPU)
        model = GPT(cfg.model)
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
    moved = bytes_per_param(opt, grads[0].element_size())
    return {"preset": preset, "master_weights": master, "in_place": getattr(opt, "table", None) is not None,
            "tile": f"{kernels.BlockTable.BLOCK}x{kernels.BlockTable.WARPS}x{kernels.BlockTable.SUMSQ_GROUP}",
            "params": n, "grad_dtype": str(grads[0].dtype),
            "ms_per_step": 1e3 * dt, "bytes_per_param": moved, "gb_per_s": moved * n / dt / 1e9,
            "device": str(device), "compiled": compiled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-1.5b", choices=sorted(config.PRESETS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="compile MasterAdamW's update (auto: on CUDA, as the trainer's run.compile=auto)")
    ap.add_argument("--tiles", nargs="*", default=[], metavar="BLOCKxWARPS[xGROUP]",
                    help="also time the in-place kernels with these elements per program x warps (x blocks per "
                         "program in the sum of squares, default 1)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    table = kernels.BlockTable
    default = (table.BLOCK, table.WARPS, table.SUMSQ_GROUP)
    runs = [("off", "auto", default), ("on", "off", default), ("on", "auto", default)]
    for tile in args.tiles:
        sizes = tile.split("x")
        if len(sizes) not in (2, 3) or not all(x.isdigit() and int(x) > 0 for x in sizes):
            ap.error(f"--tiles: '{tile}' is not BLOCKxWARPS or BLOCKxWARPSxGROUP (positive integers)")
        runs.append(("on", "auto", (int(sizes[0]), int(sizes[1]), int(sizes[2]) if len(sizes) == 3 else 1)))
    for master, kernel, (table.BLOCK, table.WARPS, table.SUMSQ_GROUP) in runs:
        row = bench(args.preset, master, kernel, device, args.steps, args.warmup, compiled)
        if master == "on" and kernel == "auto" and not row["in_place"]:
            continue  # no Triton or no CUDA here: the same as the gathered row
        print(f"master_weights={master:3s} in_place={row['in_place']!s:5s} tile={row['tile']:9s} "
              f"{row['ms_per_step']:8.2f} ms/step  {row['gb_per_s']:8.1f} GB/s "
              f"({row['bytes_per_param']} B/param x {row['params']:,})", file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
