"""How often `balance.Balancer` names a straggler that is none, and whether it names one that slows gradually.

    python benchmarks/stragglers.py [--steps 3000] [--seeds 2]

Pure Python, no device, no torch: the balancer is fed simulated per-rank compute times, step time =
(fixed + 0.01 s x share) x lognormal(0, sigma) noise, optionally with a share of a rank's steps 3x longer (a
pause). Prints one JSON line per case:
  - noise: no rank ever slows; `flagged_steps` counts the steps after which any rank was named (false flags);
  - drift: rank 1 slows by `drift` per estimate (every `every` steps) to the run's end; `first_flag` is the
    step at which it was first named and its speed then (null: never named); `common` drifts every rank.
  - recover: rank 1 runs at half speed for the first 100 steps, then at full speed to step 600; the shares at the
    end, the step time against an equal split's and the steps until the shares were even again (they should
    come back to equal; with large fixed costs only the balancer's probes bring them back, see docs/train.md
    "Heterogeneous workers"); then with 5% noise on each step time, to step 5,100.
The balancer's settings are its defaults (every 5, ema 0.5, straggler_ratio 0.8, patience 2).
"""

from __future__ import annotations

import argparse
import json
import random

from megacluster.train.balance import Balancer

NOISE_CASES = [  # (ranks, global batch, fixed seconds per step, share of a rank's steps 3x longer)
    (2, 16, 0.0, 0.0), (2, 16, 0.25, 0.0), (4, 64, 0.0, 0.0), (4, 64, 0.25, 0.0), (4, 64, 0.0, 0.05),
]
DRIFT_CASES = [(2, 16), (4, 64), (8, 256)]  # (ranks, global batch)


def false_flags(world: int, batch: int, fixed: float, pauses: float, sigma: float, steps: int, seed: int) -> int:
    """Steps after which some rank was named, in a run where no rank ever slows."""
    rng = random.Random(seed)
    bal = Balancer(world=world, global_batch=batch)
    flagged = 0
    for _ in range(steps):
        shares = bal.shares()
        times = []
        for n in shares:
            seconds = (fixed + 0.01 * n) * rng.lognormvariate(0, sigma) if n else 0.0
            times.append(seconds * 3 if rng.random() < pauses else seconds)
        bal.observe(times, shares)
        flagged += bool(bal.stragglers())
    return flagged


def first_flag(world: int, batch: int, fixed: float, drift: float, steps: int, common: bool) -> list | None:
    """[step, speed] when rank 1 (drifting `drift` per estimate) was first named; None if never."""
    bal = Balancer(world=world, global_batch=batch)
    for step in range(steps):
        shares = bal.shares()
        speed = (1 - drift) ** (step // bal.every)
        times = [(fixed + 0.01 * n) / (speed if rank == 1 or common else 1.0) if n else 0.0
                 for rank, n in enumerate(shares)]
        bal.observe(times, shares)
        if bal.stragglers():
            return [step, round(speed, 3)]
    return None


def recovery(world: int, batch: int, fixed: float, slow_steps: int = 100, steps: int = 600, sigma: float = 0.0,
             seed: int = 0) -> dict:
    """Shares at the end of a run in which rank 1 was at half speed for its first `slow_steps` steps, the step
    time they give against the equal split's (all ranks at full speed by then), and the steps after the slowdown
    until the shares were within one sample of each other (null: not in this run). `sigma`: lognormal noise."""
    rng = random.Random(seed)
    bal = Balancer(world=world, global_batch=batch)
    back = None
    for step in range(steps):
        shares = bal.shares()
        if back is None and step >= slow_steps and max(shares) - min(shares) <= 1:
            back = step - slow_steps
        factor = [0.5 if rank == 1 and step < slow_steps else 1.0 for rank in range(world)]
        noise = [rng.lognormvariate(0, sigma) if sigma else 1.0 for _ in shares]
        bal.observe([(fixed + 0.01 * n) / f * e if n else 0.0 for n, f, e in zip(shares, factor, noise)], shares)
    shares = bal.shares()
    equal = fixed + 0.01 * batch / world
    return {"shares": shares, "step_vs_equal": round(max(fixed + 0.01 * n for n in shares) / equal, 3),
            "steps_to_even": back}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="steps per noise run")
    ap.add_argument("--seeds", type=int, default=2, help="noise runs per case")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="lognormal noise sigmas")
    ap.add_argument("--drift", type=float, default=0.02, help="speed lost per estimate in the drift cases")
    ap.add_argument("--drift-steps", type=int, default=400, help="steps per drift run")
    args = ap.parse_args()
    for world, batch, fixed, pauses in NOISE_CASES:
        for sigma in args.sigmas:
            counts = [false_flags(world, batch, fixed, pauses, sigma, args.steps, s) for s in range(args.seeds)]
            print(json.dumps({"case": "noise", "ranks": world, "batch": batch, "fixed_s": fixed, "pauses": pauses,
                              "sigma": sigma, "steps": args.steps, "flagged_steps": counts}))
    for world, batch in DRIFT_CASES:
        for fixed in (0.0, 0.25):
            for common in (False, True):
                hit = first_flag(world, batch, fixed, args.drift, args.drift_steps, common)
                print(json.dumps({"case": "drift", "ranks": world, "batch": batch, "fixed_s": fixed,
                                  "drift": args.drift, "common": common, "first_flag": hit}))
    for world, batch in DRIFT_CASES[:2]:
        for fixed in (0.0, 0.05, 0.1, 0.25):
            print(json.dumps({"case": "recover", "ranks": world, "batch": batch, "fixed_s": fixed,
                              **recovery(world, batch, fixed)}))
    for seed in range(args.seeds):  # the same with 5% noise on every step time, over a longer run
        for fixed in (0.1, 0.25):
            print(json.dumps({"case": "recover", "ranks": 4, "batch": 64, "fixed_s": fixed, "sigma": 0.05,
                              "seed": seed, **recovery(4, 64, fixed, steps=5100, sigma=0.05, seed=seed)}))


if __name__ == "__main__":
    main()
