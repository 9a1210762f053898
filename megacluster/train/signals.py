"""SIGTERM / SIGINT: stop at a step boundary with a checkpoint, shared by the worker and the supervisor.

Schedulers preempt with SIGTERM and a grace period (Slurm signals every process of the job step, Kubernetes the
container's first process, torchrun forwards it to its workers), users press Ctrl-C (SIGINT to the whole
foreground group). The handler only records the signal; the training loop acts on it at the next step boundary.
A process signalled *again* more than REPEAT_S seconds after its first signal stops at once (KeyboardInterrupt):
copies that arrive together (the scheduler's SIGTERM and torchrun's forwarded one, milliseconds apart) are one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 1.0  # seconds: a repeat sooner than this is the same request delivered twice


class StoppedAtOnce(KeyboardInterrupt):
    """A SIGTERM/SIGINT outside the training steps (importing torch, tokenizing, building the model, writing the
    result): nothing is cut short there that a checkpoint would keep, so the process stops at once."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} before the first step or after the last: stopped at once")
        self.signum = signum


def _stop_at_once(signum: int, frame=None) -> None:
    for s in SIGNALS:  # once: a burst (Ctrl-C, then torchrun's forwarded SIGINT and SIGTERM) raising again inside
        signal.signal(s, _stopping)  # the cleanup left a cache entry's lock behind (`outside_steps` restores)
    raise StoppedAtOnce(signum)


def _stopping(signum: int, frame=None) -> None:
    """Signals after the first, while the stop cleans up: nothing more to do. (Not SIG_IGN: Python prints "Signal
    N ignored due to race condition" for one already pending when the handler became SIG_IGN.)"""


@contextlib.contextmanager
def outside_steps():
    """SIGTERM and SIGINT raise StoppedAtOnce in the block, which the CLI reports in one line with 128 + N. Before,
    a SIGTERM while torch was imported or the text tokenized ended the process with no word and left the run dir
    it had made. The training loop and the supervisor install their own handlers over these (`installed`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _stop_at_once) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def exit_code(result: dict | None) -> int:
    """The exit code of a run's process: 128 + N when the result says it stopped on signal N (as a shell reports
    a process that signal ended), else 0."""
    return 128 + signal.Signals[result["stopped"]].value if result and result.get("stopped") else 0


class StopSignals:
    """What this process was asked to stop for: its own signal, or one relayed (by the supervisor or a peer)."""

    def __init__(self, announce: Callable[[int], None] | None = None):
        self.signum: int | None = None  # the first signal asked for (own or relayed); None = keep going
        self._own_at: float | None = None  # monotonic time of this process's own first signal
        self.announce = announce  # called once, on the first own signal (e.g. to print what happens next)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def relay(self, signum: int) -> None:
        """A stop asked for elsewhere: stop after the agreed step, but a later own signal is not a repeat."""
        if self.signum is None:
            self.signum = signum

    def on_signal(self, signum: int, frame=None) -> None:
        """The handler: record the first signal; a repeat after REPEAT_S raises KeyboardInterrupt."""
        now = time.monotonic()
        if self._own_at is not None:
            if now - self._own_at > REPEAT_S:
                raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopping at once, without a checkpoint")
            return
        self._own_at = now
        self.relay(signum)
        if self.announce is not None:
            self.announce(signum)

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM and SIGINT inside the block (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.on_signal) for s in SIGNALS}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
