"""Time the fused loss's softmax pass alone: Inductor's reduction (model.xent_with_grad compiled, what the trainer
runs with run.loss_kernel=off) against the Triton kernel (kernels.softmax_xent, run.loss_kernel=auto) at tiles.

    python benchmarks/loss_kernel.py                         # GPT-2 124M at nanoGPT's batch: 32,768 x 50,304 bf16
    python benchmarks/loss_kernel.py --tiles 8192x16x2 4096x8x4 16384x32x1   # BLOCK x warps x programs an SM
    python benchmarks/loss_kernel.py --rows 8192             # 1.5B's batch (8 x 1024 tokens)
    TRITON_INTERPRET=1 python benchmarks/loss_kernel.py --device cpu --rows 8 --vocab 1000 --iters 1 --compile off

One JSON line per implementation: ms per call (mean of --iters after one warm-up call), GB/s by the least bytes
the pass must move (the logits read once, their gradient written once: 2 x rows x vocab x 2 B in bf16), and the
largest difference of the loss sum (relative) and of the gradient from the reference's. The kernel's design asks
its second read of each row to come from L2; a figure near the reference's means it does not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megacluster import kernels
from megacluster.model import xent_with_grad


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.HeadLoss's path without the kernel, from the head matmul's output on: the upcast inside the compiled
    region, as in the trainer's graph, so Inductor reads the logits in their own dtype."""
    return xent_with_grad(logits.to(torch.float32, copy=True), targets, logits.dtype)  # a copy: it writes over it
    # (fp32 logits' .float() is the tensor itself: the reference overwrote the benchmark's only input)


def timed(fn, iters: int, device: torch.device) -> tuple[float, tuple]:
    out = fn()  # warm-up: compiles
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters, out
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return (time.perf_counter() - t0) * 1e3 / iters, out


def resources(logits: torch.Tensor, targets: torch.Tensor, tile: tuple[int, int, int]) -> dict:
    """Registers and spills a thread of the compiled kernel, and whether `tile`'s programs an SM fit the register
    file at once (65,536 a SM): if not, the rest start only as others finish, and the kernel runs at the
    resident count, whatever L2 does. Empty in the interpreter (nothing compiled)."""
    block, warps, per_sm = tile
    loss, grad = torch.empty(1, device=logits.device), torch.empty_like(logits[:1])
    compiled = kernels._xent_kernel[(1,)](logits, targets, loss, grad, 0, logits.shape[1], BLOCK=block,
                                          num_warps=warps)  # 0 rows: compiled, nothing done
    regs = getattr(compiled, "n_regs", None)
    if regs is None:
        return {}
    return {"regs": regs, "spills": compiled.n_spills, "resident": per_sm * 32 * warps * regs <= 65536}


def parse_tile(text: str) -> tuple[int, int, int]:
    try:
        block, warps, per_sm = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile '{text}': want BLOCKxWARPSxPROGRAMS_PER_SM, e.g. 8192x16x2")
    if block < 1 or block & (block - 1) or warps < 1 or warps & (warps - 1) or per_sm < 1:
        raise argparse.ArgumentTypeError(f"tile '{text}': BLOCK and warps must be powers of two, programs >= 1")
    return block, warps, per_sm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32 * 1024, help="tokens (batch x seq): 32,768 = 124M at batch 32")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the logits' (the head matmul's)")
    ap.add_argument("--tiles", type=parse_tile, nargs="+", default=[kernels.XENT_TILE])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="the reference through Inductor")
    args = ap.parse_args()
    if not hasattr(kernels, "softmax_xent"):
        ap.error("the kernel needs Triton: a CUDA build of torch, or TRITON_INTERPRET=1 on a CPU")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=gen, device=device) * 2).to(dtype)  # (N, V)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen, device=device)
    gb = 2 * logits.numel() * logits.element_size() / 1e9

    ref = torch.compile(reference) if args.compile == "on" else reference
    ms, (loss_ref, grad_ref) = timed(lambda: ref(logits, targets), args.iters, device)
    print(json.dumps({"impl": "inductor" if args.compile == "on" else "eager", "rows": args.rows,
                      "vocab": args.vocab, "ms": round(ms, 4), "GB_per_s": round(gb / ms * 1e3, 1)}), flush=True)
    for tile in args.tiles:
        kernels.XENT_TILE = tile
        ms, (rows, grad) = timed(lambda: kernels.softmax_xent(logits, targets), args.iters, device)
        print(json.dumps({"impl": "kernel", "tile": "x".join(map(str, tile)), "rows": args.rows, "vocab": args.vocab,
                          "ms": round(ms, 4), "GB_per_s": round(gb / ms * 1e3, 1), **resources(logits, targets, tile),
                          "loss_rel_diff": abs(float(rows.sum() - loss_ref)) / abs(float(loss_ref)),
                          "grad_max_diff": float((grad.float() - grad_ref.float()).abs().max())}), flush=True)


if __name__ == "__main__":
    main()
