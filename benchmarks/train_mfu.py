"""Training throughput and MFU of the real trainer on the GPT-2 shapes (random tokens, seq 1024, bf16).

    python benchmarks/train_mfu.py                      # the four shapes at nanoGPT's batch sizes, on CUDA
    python benchmarks/train_mfu.py --shapes gpt2-124m --steps 30
    python benchmarks/train_mfu.py --device cpu --smoke # CPU smoke test of this script (tiny shapes)
    python benchmarks/train_mfu.py --profile out/       # also kernel-time table, trace, idle gaps per shape
    python benchmarks/train_mfu.py --sdpa cudnn         # force one attention backend (default: torch's choice)
    python benchmarks/train_mfu.py --compile-mode max-autotune-no-cudagraphs   # a torch.compile mode to try
    python benchmarks/train_mfu.py --set optim.master_weights=on     # any trainer key (here: bf16 weights)
    python benchmarks/train_mfu.py --inductor coordinate_descent_tuning=True   # a torch._inductor.config knob
    python benchmarks/train_mfu.py --rope swap          # RoPE in another form (an experiment)
    python benchmarks/train_mfu.py --shapes gpt2-124m --gate DIR TAG N  # compile beside others, time alone

It drives `megacluster.train.loop.Worker.train_step` (the same code `megacluster train` runs: torch.compile,
bf16 autocast, fused AdamW, flat-buffer gradients, grad clipping) on a pre-tokenized shard of uniform random
tokens, excludes `--warmup` steps (compilation, allocator warm-up), and prints one line per shape (stderr, and
as JSON `{"row": ...}` on stdout as soon as the shape is done) plus a JSON summary as the last stdout line.
MFU = flops_per_token (model.py) x tok/s / dense bf16 peak of the local GPU (hardware.py). Record results in
benchmarks/RESULTS.md with the command, device and date.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacluster import config
from megacluster import model as model_mod
from megacluster.train.loop import Worker, init_place

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_gaps  # noqa: E402 (a sibling script)

# the GPT-2 presets carry nanoGPT's batch sizes on one H100 (32/16/12/8 sequences of 1024 tokens, issue 2)
SHAPES = {name: config.PRESETS[name]["run"]["batch_size"]
          for name in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b")}
REWARM = 2  # untimed steps after a gate opens: the GPU may have idled (clocks down) while others compiled


class Gate:
    """Several benchmark processes compile at once (one each, on a many-core host) and then time one at a time.

    Entering writes `DIR/ready.<tag>`, waits until `expect` distinct tags have a `ready.` or an `exit.` file
    (the driver, benchmarks/mfu_variants.py, writes `exit.<tag>` when a process ends, so a crashed compile does
    not stall the rest), then holds an exclusive lock on `DIR/gpu.lock` until exit: the timed steps never share
    the GPU, nor the CPU with a compile.
    """

    def __init__(self, directory: Path, tag: str, expect: int):
        self.dir, self.tag, self.expect = directory, tag, expect
        self.lock = None

    def arrived(self) -> int:
        return len({f.name.partition(".")[2] for f in self.dir.iterdir() if f.name.startswith(("ready.", "exit."))})

    def __enter__(self):
        (self.dir / f"ready.{self.tag}").touch()
        while self.arrived() < self.expect:
            time.sleep(0.5)
        self.lock = open(self.dir / "gpu.lock", "w")  # noqa: SIM115 (held across __exit__)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def _row(w: Worker, cfg, preset: str, batch: int, steps: int, dt: float, loss: torch.Tensor) -> dict:
    tps = steps * batch * cfg.model.seq_len / dt
    mem = torch.cuda.max_memory_allocated() / 1e9 if w.place.device.type == "cuda" else None
    return {"shape": preset, "batch": batch, "seq": cfg.model.seq_len, "params": w.model.num_params(),
            "tokens_per_s": tps, "mfu": w.mfu(tps), "step_ms": 1e3 * dt / steps, "loss": float(loss),
            "peak_mem_gb": mem}


def kernel_table(w: Worker, step0: int, steps: int, path: Path, trace: Path | None = None) -> None:
    """Profile `steps` more steps; write the kernels sorted by device time, and their share by kind. With `trace`
    (a .json.gz path) also the chrome trace, and beside it the GPU's idle gaps (trace_gaps.py: gaps-<...>.txt)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for step in range(step0, step0 + steps):
            w.train_step(step)
        w._sync()
    cuda = torch.cuda.is_available()
    # kernels only: user ranges such as "Optimizer.step#AdamW.step" also carry device time (their kernels')
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA" or not cuda) and "#" not in e.key]
    us = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events}  # microseconds
    total = sum(us.values()) or 1.0
    kinds: dict[str, float] = {}
    for e in events:
        n = e.key.lower()
        kind = ("optimizer" if ("lerp" in n or "addcmul" in n) else  # optim.adamw_update, compiled
                "attention" if ("flash" in n or "fmha" in n or "sdpa" in n or "cudnn" in n) else
                # Inductor's, then kernels.py's
                "elementwise (triton)" if n.startswith(("triton", "_swiglu", "_rope", "_xent")) else
                "matmul" if ("gemm" in n or "nvjet" in n or "cutlass" in n) else
                "optimizer" if ("adam" in n or "multi_tensor" in n or "sumsq" in n) else  # kernels.BlockTable too
                "copy" if ("memcpy" in n or "memset" in n) else
                "nccl" if "nccl" in n else "other")
        kinds[kind] = kinds.get(kind, 0.0) + us[e.key]
    lines = [f"device time over {steps} steps: {total / 1e3:.1f} ms ({total / 1e3 / steps:.1f} ms/step)"]
    lines += [f"  {k:20s} {100 * v / total:5.1f}%  {v / 1e3 / steps:8.2f} ms/step"
              for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append("")
    for e in sorted(events, key=lambda e: -us[e.key])[:40]:
        lines.append(f"{100 * us[e.key] / total:5.1f}%  {us[e.key] / 1e3 / steps:8.3f} "
                     f"ms/step  x{e.count // steps:<4d} {e.key[:140]}")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(kinds) + 1]), file=sys.stderr, flush=True)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
        gap_text = trace_gaps.summary(trace_gaps.load(trace), steps)
        trace.with_name(trace.name.replace("trace-", "gaps-").replace(".json.gz", ".txt")).write_text(gap_text)
        print(gap_text.splitlines()[0], file=sys.stderr, flush=True)


def bench(preset: str, batch: int, steps: int, warmup: int, device: str, shard: Path, smoke: bool,
          extra: list[str], profile_dir: Path | None = None, compile_mode: str = "default",
          gate: Gate | None = None) -> dict:
    rewarm = REWARM if gate is not None else 0
    sets = [f"run.batch_size={batch}", f"run.micro_batch={batch}", f"run.device={device}",
            "run.progress=false", "run.eval_every=0", "run.ckpt_every=0",
            f"run.max_steps={warmup + rewarm + steps}",
            f"data.paths={shard}", "data.val_fraction=0.01"]
    if smoke:  # a shape that runs in seconds on a CPU
        sets += ["model.d_model=64", "model.n_layer=2", "model.n_head=2", "model.seq_len=128"]
    cfg = config.build(preset, None, sets + extra)
    torch._dynamo.reset()  # each shape compiles from scratch: no recompile limit shared across shapes
    with tempfile.TemporaryDirectory() as run_dir:
        w = Worker(cfg, init_place(device), run_dir=run_dir)
        if compile_mode != "default":  # an experiment: the trainer itself compiles with torch's default mode
            w.forward = torch.compile(w.model, mode=compile_mode)
        for step in range(1, warmup + 1):
            w.train_step(step)
        w._sync()
        with gate or contextlib.nullcontext():  # parallel warm-ups: the GPU to ourselves from here on
            for step in range(warmup + 1, warmup + rewarm + 1):  # clocks back up after the wait
                w.train_step(step)
            w._sync()
            t0 = time.perf_counter()
            for step in range(warmup + rewarm + 1, warmup + rewarm + steps + 1):
                loss = w.train_step(step)
            w._sync()
            dt = time.perf_counter() - t0
            row = _row(w, cfg, preset, batch, steps, dt, loss)
            if profile_dir is not None:
                profile_dir.mkdir(parents=True, exist_ok=True)
                kernel_table(w, warmup + rewarm + steps + 1, 3, profile_dir / f"kernels-{preset}.txt",
                             profile_dir / f"trace-{preset}.json.gz")
        if w.ckpt is not None:
            w.ckpt.close()
        del w
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return row


def rope_swap(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The experiment `--rope swap`: model.apply_rope written as x * cos + swap_halves(x) * signed_sin (the same
    products and sums; a pointwise backward that Inductor merges with the q/k/v gradient cat). cos/sin: (T, hs/2)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    cos, sin = torch.cat((cos, cos), -1)[None, :, None, :], torch.cat((-sin, sin), -1)[None, :, None, :]
    return (xf * cos + swapped * sin).type_as(x)


def set_inductor(item: str) -> None:
    """KEY=VALUE onto torch._inductor.config; raises ValueError for an unknown key or a value that is not a
    Python literal (a typo would otherwise be a silent no-op)."""
    import torch._inductor.config as inductor

    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"--inductor {item!r}: expected KEY=VALUE")
    target, *path = [inductor, *key.split(".")]
    try:
        for part in path[:-1]:
            target = getattr(target, part)
        getattr(target, path[-1])
        value = ast.literal_eval(text)
    except (AttributeError, ValueError, SyntaxError):
        raise ValueError(f"--inductor {item!r}: expected KEY=VALUE, KEY a torch._inductor.config setting and VALUE "
                         "a Python literal (True, 4, 'name')") from None
    setattr(target, path[-1], value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per shape")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (compile, autotune)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script itself)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. run.compile=off")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="write kernel tables here")
    ap.add_argument("--sdpa", default="default", choices=("default", "flash", "cudnn", "efficient"),
                    help="only this scaled_dot_product_attention backend (an experiment, not a trainer option)")
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
                    help="torch.compile mode for the model (an experiment, not a trainer option)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (dotted) to a Python literal (an experiment)")
    ap.add_argument("--rope", default="cat", choices=("cat", "swap"),
                    help="swap: RoPE in the swap-halves form (an experiment; cat is model.apply_rope's)")
    ap.add_argument("--gate", nargs=3, default=None, metavar=("DIR", "TAG", "EXPECT"),
                    help="warm up, then wait for EXPECT processes and time alone (see Gate; one shape only)")
    args = ap.parse_args()
    gate = None
    if args.gate is not None:
        directory, tag, expect = args.gate
        if len(args.shapes) != 1 or not expect.isdigit() or not Path(directory).is_dir():
            ap.error("--gate DIR TAG EXPECT: an existing DIR, EXPECT a count, and a single --shapes")
        gate = Gate(Path(directory), tag, int(expect))
    if args.rope == "swap":
        model_mod.apply_rope = rope_swap  # Attention.forward looks it up at call time
    for item in args.inductor:
        try:
            set_inductor(item)
        except ValueError as e:
            ap.error(str(e))  # exit 2
    if args.sdpa != "default":  # only the named backend stays enabled (math too is off: no silent fallback)
        only = {"flash": "flash", "cudnn": "cudnn", "efficient": "mem_efficient"}[args.sdpa]
        for name in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == only)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "random.npy"  # uniform random tokens, as nanoGPT's benchmark uses
        np.save(shard, np.random.default_rng(0).integers(0, 50257, size=4_000_000, dtype=np.uint16))
        for name in args.shapes:
            batch = 4 if args.smoke else SHAPES[name]
            row = bench(name, batch, args.steps, args.warmup, args.device, shard, args.smoke, args.set, args.profile,
                        args.compile_mode, gate)
            row |= {"rope": args.rope, "sdpa": args.sdpa, "compile_mode": args.compile_mode, "set": args.set, "inductor": args.inductor}
            rows.append(row)
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            print(f"{name:10s} batch {batch:3d}  {row['tokens_per_s']:>11,.0f} tok/s  MFU {mfu:>6s}  "
                  f"{row['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
            print(json.dumps({"row": row}), flush=True)  # each shape at once: a run cut short keeps its rows
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
