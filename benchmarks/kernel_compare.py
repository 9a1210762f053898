"""Two cards, one shape: the kernels both ran, timed side by side, and what a step of one card would take on the other.

    python benchmarks/kernel_compare.py A.txt B.txt [--min-ms 0.3]
    python benchmarks/kernel_compare.py A.txt B.txt --project C.txt --wall MS --mfu PCT

A and B are kernel tables written by `train_mfu.py --profile` (one card each, the same shape). For the kernels
listed in both under the same name, with at least --min-ms per step in B, it prints the median time ratio A / B of
each class: matmul (cuBLAS nvjet, gemm, cutlass), attention (cuDNN or flash forward and backward: compute-bound)
and memory (the rest: elementwise, optimizer, attention's helpers, bound by the card's memory).

With --project, C is a table of B's card (the code may be newer than A's), whose timed run took a wall step of MS
at PCT MFU. Each of C's kernels is scaled by its class's ratio, and the step on A's card is printed twice: with C's
wall-minus-device time kept (gaps between kernels, host time) and with it gone, and the MFU of each. That is a
projection from measured kernels, not a measurement. Pure text, no torch.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROW = re.compile(r"\s*[\d.]+%\s+([\d.]+) ms/step\s+x\d+\s+(.+)")
DEVICE = re.compile(r"device time over \d+ steps: [\d.]+ ms \(([\d.]+) ms/step\)")
CLASSES = ("matmul", "attention", "memory")


def read_table(path: Path) -> tuple[float, dict[str, float]]:
    """(device ms per step, {kernel name: ms per step}) of a train_mfu.py kernel table."""
    text = path.read_text()
    head = DEVICE.match(text)
    if head is None:
        raise ValueError(f"{path}: not a train_mfu.py kernel table (its first line names the device time)")
    kernels = {m.group(2).strip(): float(m.group(1)) for m in map(ROW.match, text.splitlines()) if m}
    return float(head.group(1)), kernels


def kind(name: str) -> str:
    """A kernel's class: matmul, attention (the compute-bound forward and backward), or memory (the rest)."""
    n = name.lower()
    if n.startswith("nvjet") or "gemm" in n or "cutlass" in n:
        return "matmul"
    if ("sdpa" in n or "flash" in n or "fmha" in n) and ("fprop" in n or "bprop" in n or "fwd" in n or "bwd" in n):
        return "attention"
    return "memory"


def ratios(a: dict[str, float], b: dict[str, float], min_ms: float) -> dict[str, tuple[float, int]]:
    """Per class: (median time ratio a / b over the kernels both list, how many); classes with none left out."""
    by_class: dict[str, list[float]] = {}
    for name, ms in b.items():
        if name in a and ms >= min_ms and ms > 0:  # a row printed as 0.000 ms has no ratio
            by_class.setdefault(kind(name), []).append(a[name] / ms)
    return {k: (statistics.median(v), len(v)) for k, v in by_class.items()}


def project(c: dict[str, float], device: float, wall: float, mfu: float,
            scale: dict[str, float]) -> dict[str, float]:
    """C's step on the other card: kernels scaled by class; wall with C's gap kept and gone; the MFU of each."""
    moved = sum(ms * (scale[kind(name)] - 1) for name, ms in c.items())
    on, off = wall + moved, device + moved
    return {"device_ms": device + moved, "wall_ms": on, "wall_no_gap_ms": off,
            "mfu": mfu * wall / on, "mfu_no_gap": mfu * wall / off}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="kernel table of the card to project onto (e.g. an H100's)")
    ap.add_argument("b", type=Path, help="kernel table of the same shape on the other card (e.g. an H200's)")
    ap.add_argument("--min-ms", type=float, default=0.3, help="kernels shorter than this in B are not compared")
    ap.add_argument("--project", type=Path, metavar="C", help="a newer table of B's card to project onto A's")
    ap.add_argument("--wall", type=float, help="C's measured wall step, ms")
    ap.add_argument("--mfu", type=float, help="C's measured MFU, percent")
    args = ap.parse_args(argv)
    if args.project is not None and (args.wall is None or args.mfu is None):
        ap.error("--project needs --wall and --mfu (C's measured step)")
    try:
        (_, a), (_, b) = read_table(args.a), read_table(args.b)
        found = ratios(a, b, args.min_ms)
        for k in CLASSES:
            r, n = found.get(k, (None, 0))
            print(f"{k:10s} {n:3d} kernels in both  " + (f"time ratio A/B {r:.3f}" if r else "no ratio"))
        if args.project is None:
            return 0
        missing = [k for k in CLASSES if k not in found]
        if missing:
            print(f"error: no kernel of class {', '.join(missing)} in both tables: nothing to scale it by",
                  file=sys.stderr)
            return 2
        device, c = read_table(args.project)
        p = project(c, device, args.wall, args.mfu, {k: found[k][0] for k in CLASSES})
        print(f"projected: device {p['device_ms']:.1f} ms/step; wall {p['wall_ms']:.1f} ms ({p['mfu']:.1f}% MFU) "
              f"with C's gap, {p['wall_no_gap_ms']:.1f} ms ({p['mfu_no_gap']:.1f}%) without")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
