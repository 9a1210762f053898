"""Run metrics: RUN_DIR/metrics.jsonl (+ TensorBoard if installed), the rich progress bar, throughput timing."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..files import atomic_write


class StepTimer:
    """Throughput bookkeeping: per log interval (training only: evaluation and checkpoint time is left out),
    and for the whole run, end to end, with the first step (compile) excluded."""

    def __init__(self, first_step: int):
        self.first_step = first_step  # steps already done when this process started training
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.last_t, self.last_step = self.t0, first_step

    def first_done(self, t: float) -> None:
        self.t_first = t

    def interval(self, step: int, tokens_per_step: int) -> float:
        now = time.perf_counter()
        tps = (step - self.last_step) * tokens_per_step / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, step
        return tps

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint) out of the current interval."""
        self.last_t += seconds

    def tokens_per_s(self, step: int, tokens_per_step: int, t_end: float) -> float:
        """Tokens per second of the steps up to `step` this process trained (the last logged step may be older:
        a run stopped by a signal ends between log steps)."""
        timed = step - self.first_step - 1
        if self.t_first is not None and timed > 0:
            return timed * tokens_per_step / max(t_end - self.t_first, 1e-9)
        return max(step - self.first_step, 0) * tokens_per_step / max(t_end - self.t0, 1e-9)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per line), and TensorBoard scalars if tensorboard is installed.

    `step` is the step the run continues from here. Lines of later steps were logged before a failure that sent
    the run back to an earlier checkpoint: they are dropped (TensorBoard purges them too), and the redone steps
    logged again, so the file reads as the one run that made the model, one line per logged step."""

    def __init__(self, run_dir: Path, step: int = 0):
        self.run_dir = run_dir
        self._open(step)

    def _open(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        drop_lines_after(path, step)
        self.file = open(path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1 if step else None)
        except ImportError:  # tensorboard is optional
            pass

    def rewind(self, step: int) -> None:
        """Continue from `step`: the lines of later steps go (as when opened at `step`)."""
        self.close()
        self._open(step)

    def write(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def drop_lines_after(path: Path, step: int) -> None:
    """Rewrite the metrics file `path` (atomically, only if anything goes) without its lines of steps after
    `step`, and without a torn line (a process killed as it wrote)."""
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return
    keep = [line for line in lines if _logged_step(line) <= step]
    if len(keep) < len(lines):
        atomic_write(path, b"".join(keep))


def _logged_step(line: bytes) -> float:
    """The step of a metrics line; infinity for a line that is not a whole record."""
    try:
        rec = json.loads(line)
        return rec["step"] if line.endswith(b"\n") and isinstance(rec["step"], int) else math.inf
    except (ValueError, TypeError, KeyError):
        return math.inf


class Progress:
    """rich progress bar on stderr with loss, tok/s, MFU and ETA (rank 0 only)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, step: int, rec: dict) -> None:
        if self.bar is None:
            return
        mfu = f" mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else ""
        info = f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:,.0f} tok/s{mfu}"
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
