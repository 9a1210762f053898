"""Launch the workers of a run and watch them.

- Under torchrun (or any launcher that sets RANK/WORLD_SIZE) this process *is* a worker: train in-process.
- One local worker: train in-process (no process group).
- N local workers: tokenize once here, then start N `megacluster.train.worker` processes with a fresh
  rendezvous port, wait for them, and return rank 0's result. A worker that fails fails the run (exit 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import Config
from ..data import prepare
from .loop import Worker, init_place
from .worker import write_json_atomic


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(cfg: Config) -> dict | None:
    """Train per `cfg`; returns rank 0's result dict (None on other ranks under a launcher)."""
    if under_launcher():
        place = init_place(cfg.run.device)
        result = Worker(cfg, place).run()
        return result if place.is_main else None
    corpus = prepare(cfg.data, cfg.model.vocab_size)  # once, before any worker starts
    if cfg.run.workers == 1:
        return Worker(cfg, init_place(cfg.run.device), corpus=corpus).run()
    return launch_local(cfg)


def launch_local(cfg: Config) -> dict:
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    (run_dir / "result.json").unlink(missing_ok=True)
    port = free_port()
    procs = []
    for rank in range(cfg.run.workers):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(cfg.run.workers), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get(
                       "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.run.workers))))
        procs.append(subprocess.Popen([sys.executable, "-m", "megacluster.train.worker", str(run_dir)], env=env))
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                raise RuntimeError(f"worker rank {failed[0]} exited with code {procs[failed[0]].returncode}")
            time.sleep(0.1)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"worker rank {failed[0]} exited with code {procs[failed[0]].returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads((run_dir / "result.json").read_text())
