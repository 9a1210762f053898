"""The MFU experiments of one device call: variants of benchmarks/train_mfu.py, each in its own process (the
--sdpa and --inductor settings are process-wide) under a time limit, every finished shape appended at once to
OUT/mfu.jsonl as one JSON line tagged with its variant, so a call cut short keeps what finished.

    python benchmarks/mfu_variants.py --shapes gpt2-124m gpt2-1.5b default plain
    python benchmarks/mfu_variants.py --parallel default@gpt2-774m master@gpt2-124m ...

A job is VARIANT (run on every --shapes) or VARIANT@SHAPE. Serially (the default) each variant is one process
over its shapes, with --limit seconds. With --parallel each job is its own process and all of them start at
once: they compile side by side (compiling is CPU work, one core per process plus Inductor's workers; the
device machine has 16 cores), then each times its steps alone, holding the GPU through train_mfu's Gate.
Compile is most of a benchmark's wall time (1.5-2 min a shape), so a call measures several jobs in the time
of one; the jobs must fit in GPU memory together (peak GB per shape at its batch, H100: 16 / 22 / 33 / 47).
--limit is then the whole wave's: a job not warmed up when only --reserve seconds per waiting job are left is
killed, so the ones ready can still time. --memory GIB cuts the jobs, in order, into waves that fit (JOB_GIB per
job, read on the H200): four jobs from 124M to 1.5B did not fit the H200 together.

--args "..." is passed on (e.g. --args "--device cpu --smoke --steps 2 --warmup 1" checks this on a CPU).
Exit status: 0 when every job finished, 1 when one failed or ran out of time (its finished shapes are still in
mfu.jsonl), 2 for a bad job name. Logs: OUT/mfu-<job>.log. Record figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b")
VARIANTS = {  # "default" is the trainer's own (on CUDA: master weights and the fused loss, config "auto")
    "default": [],
    "plain": ["--set", "optim.master_weights=off", "--set", "run.fused_loss=off"],
    "master": ["--set", "optim.master_weights=on", "--set", "run.fused_loss=off"],
    "fused": ["--set", "optim.master_weights=off", "--set", "run.fused_loss=on"],
    "swap": ["--rope", "swap"],
    "cdt": ["--inductor", "coordinate_descent_tuning=True"],
    "2pass": ["--inductor", "online_softmax=False"],  # the loss reduction as two loops: max, then sum
    "autotune": ["--compile-mode", "max-autotune-no-cudagraphs"],
    "graphs": ["--compile-mode", "reduce-overhead"],
    "flash": ["--sdpa", "flash"],
    "nokernel": ["--set", "run.swiglu_kernel=off"],  # the SwiGLU backward as Inductor writes it
    "norope": ["--set", "run.rope_kernel=off"],  # RoPE's backward + the dqkv cat as Inductor writes them
    "gather": ["--set", "optim.update_kernel=off"],  # gradients gathered flat for the norm and the update
    "lossk": ["--set", "run.loss_kernel=auto"],  # the loss's softmax as one Triton kernel (kernels.softmax_xent)
}
PROFILE = "--profile"  # a train_mfu.py flag the driver gives each job its own directory for
# GPU memory one job's process held while waiting at the gate, GiB: its peak (RESULTS.md: 19.6 / 23.9 / 35.6 /
# 50.1 GB) plus the CUDA context and the allocator's cache; 124M and 1.5B read off an out-of-memory report on the
# H200 (22.2 and 46.2-49.2 GiB), the middle two scaled from their peaks
JOB_GIB = {"gpt2-124m": 23, "gpt2-350m": 27, "gpt2-774m": 38, "gpt2-1.5b": 50}
# and what a variant may add: lossk writes the (N, V) logits gradient beside the logits, where Inductor's
# reduction may write over them (3.3 GB at 124M, batch 32; not yet measured)
VARIANT_GIB = {"lossk": 4}


@dataclass(slots=True)
class Job:
    variant: str
    shapes: list[str]
    proc: subprocess.Popen | None = None
    rc: int | None = None
    killed: str = ""  # why the driver stopped it ("time limit", "not warm in time")
    rows: list[dict] = field(default_factory=list)

    @property
    def gib(self) -> int:  # the memory estimate of its first shape (in --parallel, its only one)
        return JOB_GIB[self.shapes[0]] + VARIANT_GIB.get(self.variant, 0)

    @property
    def tag(self) -> str:  # a file-name-safe name (the device tool returns only [A-Za-z0-9._-] names)
        name = self.variant if len(self.shapes) > 1 else f"{self.variant}_{self.shapes[0]}"
        return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def parse_jobs(names: list[str], shapes: list[str], parallel: bool) -> list[Job]:
    """VARIANT or VARIANT@SHAPE -> jobs (serial: one per variant, its shapes in order; parallel: one per shape).
    Raises ValueError naming the first unknown variant or shape."""
    pairs: list[tuple[str, str]] = []
    for name in names:
        variant, _, shape = name.partition("@")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant '{variant}'; known: {' '.join(VARIANTS)}")
        if shape and shape not in SHAPES:
            raise ValueError(f"unknown shape '{shape}' in '{name}'; known: {' '.join(SHAPES)}")
        pairs += [(variant, s) for s in ([shape] if shape else shapes)]
    if parallel:
        return [Job(v, [s]) for v, s in pairs]
    jobs: dict[str, Job] = {}
    for v, s in pairs:
        jobs.setdefault(v, Job(v, [])).shapes.append(s)
    return list(jobs.values())


def start(job: Job, out: Path, args: list[str], gate: list[str], env: dict) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_mfu.py"), "--shapes", *job.shapes,
           *VARIANTS[job.variant], *args, *gate]
    if PROFILE in args:  # a kernel table per job, not one file per shape that the variants overwrite
        cmd[cmd.index(PROFILE) + 1] = str(Path(args[args.index(PROFILE) + 1]) / job.tag)
    job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,  # its own group: kill compile workers
                                stdout=open(out / f"mfu-{job.tag}.json", "w"),
                                stderr=open(out / f"mfu-{job.tag}.log", "w"))


def kill(job: Job, why: str) -> None:
    job.killed = why
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(job.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            job.proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def finish(job: Job, out: Path) -> None:
    """Collect a finished job's rows into OUT/mfu.jsonl and say how it ended."""
    job.rc = job.proc.wait()
    with open(out / "mfu.jsonl", "a") as f:
        for line in (out / f"mfu-{job.tag}.json").read_text().splitlines():
            if line.startswith('{"row"'):
                row = {**json.loads(line)["row"], "variant": job.variant}
                job.rows.append(row)
                f.write(json.dumps(row) + "\n")
    how = f"exit {job.rc}" + (f": {job.killed}" if job.killed else "")
    print(f"== {job.variant} {' '.join(job.shapes)} ({how})", flush=True)
    log = (out / f"mfu-{job.tag}.log").read_text(errors="replace").splitlines()
    for line in [x for x in log if re.search(r"tok/s|Error|error", x)][-8:]:
        print("   " + line, flush=True)


def run_serial(jobs: list[Job], out: Path, args: list[str], limit: float, env: dict) -> None:
    for job in jobs:
        start(job, out, args, [], env)
        try:
            job.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill(job, "time limit")
        finish(job, out)


def run_parallel(jobs: list[Job], out: Path, args: list[str], limit: float, reserve: float, env: dict) -> None:
    env = {**env, "TORCHINDUCTOR_COMPILE_THREADS": env.get("TORCHINDUCTOR_COMPILE_THREADS")
           or str(max(1, (os.cpu_count() or 1) // len(jobs)))}  # the cores shared out, not each job taking all
    gate_dir = Path(tempfile.mkdtemp(prefix="mfu-gate-", dir=out))
    t0 = time.monotonic()
    for job in jobs:
        start(job, out, args, ["--gate", str(gate_dir), job.tag, str(len(jobs))], env)
    running = list(jobs)
    while running:
        time.sleep(0.5)
        now = time.monotonic() - t0
        waiting = [j for j in running if not (gate_dir / f"ready.{j.tag}").exists()]
        for job in list(running):
            if job.proc.poll() is None and now > limit:
                kill(job, "time limit")
            elif job.proc.poll() is None and job in waiting and now > limit - reserve * len(running):
                kill(job, "not warm in time")  # the ready ones need the rest of the time to take their turn
            if job.proc.poll() is not None:
                (gate_dir / f"exit.{job.tag}").touch()  # the others stop waiting for it
                finish(job, out)
                running.remove(job)


def waves(jobs: list[Job], memory_gib: float) -> list[list[Job]]:
    """Jobs in order, cut into waves whose JOB_GIB sum fits `memory_gib` (0: one wave). A job too large alone
    still gets a wave of its own."""
    if memory_gib <= 0:
        return [jobs]
    out: list[list[Job]] = [[]]
    for job in jobs:
        if out[-1] and sum(j.gib for j in out[-1]) + job.gib > memory_gib:
            out.append([])
        out[-1].append(job)
    return out


def table(jobs: list[Job]) -> str:
    rows = sorted((r for j in jobs for r in j.rows), key=lambda r: (SHAPES.index(r["shape"]), -r["tokens_per_s"]))
    lines = [f"{'shape':10s} {'variant':14s} {'tok/s':>11s} {'MFU':>6s} {'ms/step':>8s} {'peak GB':>8s}"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        lines.append(f"{r['shape']:10s} {r['variant']:14s} {r['tokens_per_s']:>11,.0f} {mfu:>6s} "
                     f"{r['step_ms']:>8.1f} {mem:>8s}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", nargs="+", metavar="VARIANT[@SHAPE]", help=f"variants: {' '.join(VARIANTS)}")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES, help="for jobs without @SHAPE")
    ap.add_argument("--parallel", action="store_true", help="compile all jobs at once, time one at a time")
    ap.add_argument("--limit", type=float, default=280, help="seconds per variant (serial) or per wave (parallel)")
    ap.add_argument("--memory", type=float, default=0, metavar="GIB",
                    help="parallel: GPU memory the jobs of one wave may hold together (JOB_GIB each); more jobs "
                         "run in further waves, in order. 0: all in one wave. H200: 135, H100 80GB: 75")
    ap.add_argument("--reserve", type=float, default=20, help="parallel: seconds kept per job for its timed turn")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="default: $OUT or out/")
    ap.add_argument("--args", default="", help="passed on to train_mfu.py (one string)")
    a = ap.parse_args()
    try:
        jobs = parse_jobs(a.jobs, a.shapes, a.parallel)
    except ValueError as e:
        ap.error(str(e))  # exit 2, before anything runs
    a.out.mkdir(parents=True, exist_ok=True)
    # the jobs run in sessions of their own (so a kill reaches their compile workers): if this driver is
    # stopped, stop them too rather than leave them holding the GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "build" / "inductor-cache"))}
    try:
        if a.parallel:
            planned = waves(jobs, a.memory)
            for i, wave in enumerate(planned, 1):
                if len(planned) > 1:
                    print(f"== wave {i}/{len(planned)}: {' '.join(f'{j.variant}@{j.shapes[0]}' for j in wave)}",
                          flush=True)
                run_parallel(wave, a.out, shlex.split(a.args), a.limit, a.reserve, env)
        else:
            run_serial(jobs, a.out, shlex.split(a.args), a.limit, env)
    finally:  # stopped (SIGTERM: the device call's budget) or done: what the jobs measured is still collected
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                kill(job, "driver stopped")
                finish(job, a.out)
        print(table(jobs), flush=True)
    return 0 if all(j.rc == 0 and not j.killed for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
