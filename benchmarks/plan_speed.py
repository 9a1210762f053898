"""Planner speed: 1M-GPU 90-day Monte Carlo (1000 trials), search configs/s, `megacluster plan` wall time.

    python benchmarks/plan_speed.py      # prints one JSON line; figures go to benchmarks/RESULTS.md (## Planner)
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from megacluster.plan import load_scenario
from megacluster.plan import reliability as rel
from megacluster.plan.scenario import ReliabilitySpec
from megacluster.plan.search import rank

REPO = Path(__file__).resolve().parents[1]
SEARCH = {"model": {"layers": 126, "hidden": 16384, "ffn_hidden": 53248, "heads": 128, "kv_heads": 8,
                    "vocab": 128256, "seq_len": 8192},
          "train": {"global_batch": 2048}, "parallel": {"search": True},
          "fleet": {"gpu": "H100-SXM", "count": 16384}}


def best_of(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    spec = ReliabilitySpec(trials=1000)
    mc_s = best_of(lambda: rel.analyse(spec, 1_048_576 // 8, 90.0))
    sc = load_scenario(SEARCH)
    n = len(rank(sc))
    search_s = best_of(lambda: rank(sc))
    cli_s = best_of(lambda: subprocess.run([sys.executable, "-m", "megacluster", "plan"], cwd=REPO,
                                           capture_output=True, check=True), repeat=3)
    print(json.dumps({"mc_1m_gpus_90d_1000_trials_s": mc_s, "search_configs": n,
                      "search_configs_per_s": n / search_s, "plan_no_arg_wall_s": cli_s}))


if __name__ == "__main__":
    main()
