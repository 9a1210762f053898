"""Where the GPU waits: idle gaps between kernels in a torch.profiler chrome trace, and what the host did meanwhile.

    python benchmarks/trace_gaps.py TRACE.json[.gz] [--steps N] [--min-gap US]

train_mfu.py --profile DIR writes DIR/trace-<shape>.json.gz and this summary beside it (gaps-<shape>.txt).
A gap is time inside the traced span with no kernel, copy or memset running. It is *host-late* when the launch
call of the kernel after it started after the GPU went idle: the GPU waited for the host, and the summary names
the host operations (torch.profiler cpu_op and CUDA runtime calls) that overlapped those waits. Other gaps are
the device's own time between queued kernels (launch latency, stream waits). Short kernels and memsets are counted
by the host op that launched them: each brings such a gap, so many of them (628 memsets per step at 1.5B on the
H200) are worth tracing to their source. Pure JSON, no torch: runs anywhere.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
NOT_HOST = ("Trace", "gpu_user_annotation")  # the profiler's own whole-trace span; ranges drawn on the GPU track
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
HOST_OPS = ("cpu_op", "user_annotation")  # what a launch call is attributed to
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaHostAlloc", "cudaFreeHost", "cudaMalloc", "cudaFree")


@dataclass(slots=True)
class Gap:
    start: float  # microseconds (trace clock)
    end: float
    before: str  # the GPU event that ended at `start`
    after: str  # the GPU event that started at `end`
    launched: float | None  # when the host started the launch call of `after` (None: no runtime event found)

    @property
    def us(self) -> float:
        return self.end - self.start

    @property
    def host_late(self) -> bool:
        return self.launched is not None and self.launched > self.start


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def gaps(events: list[dict]) -> tuple[list[Gap], float, float]:
    """Idle gaps between GPU events (any stream: the GPU is idle when none runs); returns (gaps, span_us, busy_us)."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return [], 0.0, 0.0
    launch = {e["args"]["correlation"]: e["ts"] for e in events
              if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    out, busy = [], 0.0
    cur_start, cur_end, cur_name = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]["name"]
    for e in gpu[1:]:
        end = e["ts"] + e["dur"]
        launched = launch.get(e.get("args", {}).get("correlation"))
        if e["ts"] > cur_end:  # idle from cur_end to e["ts"]
            busy += cur_end - cur_start
            out.append(Gap(cur_end, e["ts"], cur_name, e["name"], launched))
            cur_start = e["ts"]
        elif out and e["ts"] == out[-1].end and launched is not None and out[-1].launched is not None:
            out[-1].launched = min(out[-1].launched, launched)  # kernels starting together: the earliest launch
        if end >= cur_end:
            cur_end, cur_name = end, e["name"]
    busy += cur_end - cur_start
    return out, cur_end - gpu[0]["ts"], busy


def host_during(events: list[dict], windows: list[tuple[float, float]]) -> dict[str, float]:
    """Microseconds each host event name (cpu_op, runtime call, user range) overlaps the given windows. Nested
    events each count their own overlap, so a parent and its child both appear."""
    windows = sorted(windows)
    totals: dict[str, float] = {}
    starts = [w[0] for w in windows]
    for e in events:
        if e.get("ph") != "X" or e.get("cat") in GPU_CATS + NOT_HOST or "dur" not in e \
                or e["name"].startswith("ProfilerStep#"):
            continue
        lo, hi = e["ts"], e["ts"] + e["dur"]
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        overlap = 0.0
        while i < len(windows) and windows[i][0] < hi:
            overlap += max(0.0, min(hi, windows[i][1]) - max(lo, windows[i][0]))
            i += 1
        if overlap > 0:
            totals[e["name"]] = totals.get(e["name"], 0.0) + overlap
    return totals


def runtime_calls(events: list[dict]) -> dict[str, tuple[int, float]]:
    """CUDA runtime/driver call name -> (count, total microseconds)."""
    out: dict[str, tuple[int, float]] = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS and e.get("ph") == "X":
            n, us = out.get(e["name"], (0, 0.0))
            out[e["name"]] = (n + 1, us + e.get("dur", 0.0))
    return out


def issuers(events: list[dict]) -> dict[int, str]:
    """GPU event correlation id -> the host op that launched it: the innermost op or range (cpu_op, or a
    user_annotation such as Inductor's "## Call CompiledFxGraph ##") around its runtime call on the same thread,
    with that op's parent ("aten::zero_ < aten::zeros"); "(no op)" when none encloses it."""
    ops: dict[object, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_OPS and "dur" in e and not e["name"].startswith("ProfilerStep#"):
            ops.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    calls = sorted((e["ts"], e.get("tid"), e["args"]["correlation"]) for e in events
                   if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}))
    for spans in ops.values():
        spans.sort(key=lambda o: (o[0], -o[1]))  # parents before the children they start with
    out, stacks, nexts = {}, {tid: [] for tid in ops}, dict.fromkeys(ops, 0)
    for ts, tid, corr in calls:  # one sweep per thread: the ops open at ts, outermost first
        spans, stack = ops.get(tid, []), stacks.get(tid, [])
        while nexts.get(tid, 0) < len(spans) and spans[nexts[tid]][0] <= ts:
            op = spans[nexts[tid]]
            while stack and stack[-1][1] < op[0]:  # ops closed before this one opened
                stack.pop()
            stack.append(op)
            nexts[tid] += 1
        while stack and stack[-1][1] < ts:  # nested ops close inner first: what is left is open, innermost on top
            stack.pop()
        out[corr] = " < ".join(o[2] for o in stack[::-1][:2] if o[1] >= ts) or "(no op)"
    return out


def small_kernels(events: list[dict], below_us: float) -> dict[tuple[str, str], tuple[int, float]]:
    """GPU events shorter than `below_us` (memsets are named as one): (name, issuer) -> (count, microseconds).
    Each such kernel costs little itself but brings the ~1-2 us gap every launch has."""
    who = issuers(events)
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATS and e.get("dur", 0.0) < below_us:
            name = "Memset" if e.get("cat") == "gpu_memset" else e["name"][:50]
            key = (name, who.get(e.get("args", {}).get("correlation"), "(no launch call)"))
            n, us = out.get(key, (0, 0.0))
            out[key] = (n + 1, us + e["dur"])
    return out


def summary(events: list[dict], steps: int = 1, min_gap_us: float = 5.0, top: int = 15,
            small_us: float = 3.0) -> str:
    every, span, busy = gaps(events)
    late = [g for g in every if g.host_late]
    lines = [f"per step ({steps} traced): span {span / 1e3 / steps:.2f} ms, GPU busy {busy / 1e3 / steps:.2f} ms, "
             f"idle {(span - busy) / 1e3 / steps:.2f} ms in {len(every) / steps:.1f} gaps; host-late "
             f"{sum(g.us for g in late) / 1e3 / steps:.2f} ms in {len(late) / steps:.1f} gaps"]
    edges = (0, 2, 5, 20, 100, 1000, float("inf"))
    for lo, hi in zip(edges, edges[1:]):
        sel = [g for g in every if lo <= g.us < hi]
        if sel:
            lines.append(f"  gaps {lo:>4}-{hi:<4} us: {len(sel) / steps:7.1f}/step {sum(g.us for g in sel) / 1e3 / steps:7.3f} "
                         f"ms/step (host-late {sum(g.us for g in sel if g.host_late) / 1e3 / steps:.3f})")
    lines.append(f"\nlargest gaps (>= {min_gap_us:g} us): us, host-late, kernel before -> kernel after")
    for g in sorted((g for g in every if g.us >= min_gap_us), key=lambda g: -g.us)[:top]:
        lines.append(f"  {g.us:9.1f}  {'late' if g.host_late else '    '}  {g.before[:60]} -> {g.after[:60]}")
    lines.append("\nhost activity during host-late gaps (ms/step, nested events each counted):")
    during = host_during(events, [(g.start, g.end) for g in late])
    for name, us in sorted(during.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {us / 1e3 / steps:8.3f}  {name[:110]}")
    lines.append(f"\nGPU events under {small_us:g} us by the host op that launched them (count/step, device ms/step):")
    for (name, who), (n, us) in sorted(small_kernels(events, small_us).items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {n / steps:7.1f}  {us / 1e3 / steps:8.3f}  {name}  <-  {who[:90]}")
    lines.append("\nCUDA runtime calls that can block the host (count/step, ms/step):")
    for name, (n, us) in sorted(runtime_calls(events).items(), key=lambda kv: -kv[1][1]):
        if any(s in name for s in SYNC_CALLS):
            lines.append(f"  {n / steps:7.1f}  {us / 1e3 / steps:8.3f}  {name}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, default=1, help="steps in the trace (figures are per step)")
    ap.add_argument("--min-gap", type=float, default=5.0, help="list gaps of at least this many microseconds")
    args = ap.parse_args()
    sys.stdout.write(summary(load(args.trace), args.steps, args.min_gap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
