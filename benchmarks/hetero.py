"""Heterogeneous workers: throughput with `--balance auto` vs `equal` vs the sum of solo throughputs.

    OMP_NUM_THREADS=1 python benchmarks/hetero.py [--steps 80] [--factor 3]

Worker 0 is made `factor` times slower with chaos `slow` (its compute time is stretched, as a slower GPU
would be). Four runs of the tiny preset, each worker with one CPU thread:
  solo-fast, solo-slow (one worker each), equal (2 workers, equal shares), auto (2 workers, shares from the
  measured compute throughput). Throughput is the steady state: tokens per median step time over the second half
of the run (the median, not the mean: these are shared, noisy machines).
Acceptance (issue 3): auto >= 0.9 x (solo-fast + solo-slow) and auto >= 1.6 x equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from megacluster import config
from megacluster.train.supervisor import train


def steady_tokens_per_s(run_dir: Path, tokens_per_step: int) -> float:
    recs = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    recs = [r for r in recs if "loss" in r]
    half = recs[len(recs) // 2:]  # log_every=1: one record per step, tokens_per_s of that step
    seconds = sorted(tokens_per_step / r["tokens_per_s"] for r in half)
    return tokens_per_step / seconds[len(seconds) // 2]  # median step: robust to a noisy shared machine


def run(tmp: Path, name: str, workers: int, balance: str, chaos: str, steps: int, sets: list[str]) -> float:
    cfg = config.build("tiny", None, sets + [f"run.run_dir={tmp / name}", f"run.workers={workers}",
                                             f"run.balance={balance}", f"run.chaos={chaos}",
                                             f"run.max_steps={steps}", "run.progress=false", "run.log_every=1",
                                             "run.eval_every=0", "run.ckpt_every=0"])
    train(cfg)
    return steady_tokens_per_s(tmp / name, cfg.run.batch_size * cfg.model.seq_len)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 so every worker has one thread in every run", file=sys.stderr)
    slow = f"slow:rank=0,factor={args.factor:g}"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        r = {"solo_fast": run(tmp, "sf", 1, "equal", "", args.steps, args.set),
             "solo_slow": run(tmp, "ss", 1, "equal", slow, args.steps, args.set),
             "equal": run(tmp, "eq", 2, "equal", slow, args.steps, args.set),
             "auto": run(tmp, "au", 2, "auto", slow, args.steps, args.set)}
    r["auto_vs_solo_sum"] = r["auto"] / (r["solo_fast"] + r["solo_slow"])
    r["auto_vs_equal"] = r["auto"] / r["equal"]
    for k, v in r.items():
        print(f"{k:18s} {v:10.2f}", file=sys.stderr)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
