"""Fault injection for training runs: parse `--chaos` specs and decide, per rank and step, which fault fires.

Spec grammar (faults separated by ';', keys by ','; spaces are ignored):

    KIND:key=value,key=value[,permanent]; KIND:...
    kill:rank=1,step=60; hang:rank=2,step=120; flap:step=150; slow:rank=0,factor=3; kill:rank=3,step=50,permanent

Kinds and keys:
    kill  rank (optional: all ranks), step (required), permanent (flag: the worker never comes back; needs rank),
          down (seconds its replacement stays down before rejoining, like a rebooting node; default 0)
    hang  rank (optional: all ranks), step (required)       -- the worker stops making progress
    flap  step (required), no rank, times (default 1: how many times in a row the collective breaks at that
          step, each redo of the step breaking again: a link that keeps flapping)
    slow  rank (optional: all ranks), step (default 0), factor (>= 1, default 1) -- compute time x factor from step on

kill/hang/flap are one-shot per run (a flap with times=N: N-shot), across restarts: `Chaos.fire` writes an
fsync'd marker file per (fault, rank, firing)
in the run's marker directory BEFORE the caller acts, so a restarted worker replaying the same step does not fire
again. slow is persistent. Use in the worker:

    chaos = Chaos(parse(spec), rank=rank, marker_dir=run_dir / "chaos")
    if (f := chaos.due(step, "kill")) is not None:
        chaos.fire(f); os.kill(os.getpid(), signal.SIGKILL)
    compute_s *= chaos.slow_factor(step)   # or sleep for the extra time
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from megacluster.errors import InputError
from megacluster.files import write_json

KINDS = ("kill", "hang", "flap", "slow")
ONE_SHOT = ("kill", "hang", "flap")
MAX_FACTOR = 1e6  # slow: beyond this a step outlasts any test (and time.sleep overflows near 1e300)
MAX_DOWN_S = 1e6  # kill down=: seconds a node stays away (~11.6 days)
KEYS = {  # allowed keys per kind; `permanent` is a flag
    "kill": ("rank", "step", "permanent", "down"),
    "hang": ("rank", "step"),
    "flap": ("step", "times"),
    "slow": ("rank", "step", "factor"),
}
GRAMMAR = (
    "grammar: KIND:key=value,...[; KIND:...] with KIND one of kill, hang, flap, slow; keys: "
    "kill: rank, step, permanent, down | hang: rank, step | flap: step, times | slow: rank, step, factor; "
    'e.g. "kill:rank=1,step=60; hang:rank=2,step=120; flap:step=150; slow:rank=0,factor=3"'
)


@dataclass(kw_only=True, slots=True, frozen=True)
class Fault:
    """One injected fault. Validated on construction; `id` is derived when left empty."""

    kind: str  # "kill" | "hang" | "flap" | "slow"
    rank: int | None  # None = every rank (flap always None: it breaks the collective for everyone)
    step: int | None  # optimizer step at which it fires (slow: from this step on)
    factor: float = 1.0  # slow only: compute time multiplier, >= 1
    permanent: bool = False  # kill only: the worker never comes back
    down: float = 0.0  # kill only: seconds the replacement stays down before it rejoins
    times: int = 1  # flap only: how many times it fires (each redo of its step breaks again)
    id: str = ""  # stable and unique within a plan, e.g. "kill-r1-s60"; names the fired markers

    def __post_init__(self) -> None:
        problem = _fault_problem(self.kind, self.rank, self.step, self.factor, self.permanent, self.down, self.times)
        if problem:
            raise InputError(f"--chaos (run.chaos): {problem}. {GRAMMAR}")
        if not self.id:
            object.__setattr__(self, "id", _make_id(self.kind, self.rank, self.step))


def _fault_problem(kind: str, rank: object, step: object, factor: object, permanent: bool,
                   down: object = 0.0, times: object = 1) -> str | None:
    """What is wrong with a fault's fields, or None."""
    if kind not in KINDS:
        return f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})"
    for name, value in (("rank", rank), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{name} must be an integer >= 0, got {value!r}"
    if kind == "flap" and rank is not None:
        return "flap takes no rank: it breaks the collective for every rank"
    if kind in ONE_SHOT and step is None:
        return f"{kind} needs step=N"
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= MAX_FACTOR:
        return f"factor must be a number from 1 to {MAX_FACTOR:g}, got {factor!r}"
    if kind != "slow" and factor != 1.0:
        return f"factor applies to slow only, not {kind}"
    if permanent and kind != "kill":
        return f"permanent applies to kill only, not {kind}"
    if permanent and rank is None:
        return "a permanent kill needs a rank"
    if isinstance(down, bool) or not isinstance(down, (int, float)) or not 0 <= down <= MAX_DOWN_S:
        return f"down must be a number of seconds from 0 to {MAX_DOWN_S:g}, got {down!r}"
    if down and (kind != "kill" or permanent):
        return "down applies to a kill that is not permanent"
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        return f"times must be an integer >= 1, got {times!r}"
    if times != 1 and kind != "flap":
        return f"times applies to flap only, not {kind}"
    return None


def _make_id(kind: str, rank: int | None, step: int | None) -> str:
    parts = [kind] + ([f"r{rank}"] if rank is not None else []) + ([f"s{step}"] if step is not None else [])
    return "-".join(parts)


def parse(spec: str | None) -> list[Fault]:
    """Parse a `--chaos` spec into faults ("" or None -> []). Raises InputError naming the bad part."""
    if spec is None or not spec.strip():
        return []
    faults = [_parse_fault(part.strip()) for part in spec.split(";") if part.strip()]
    _check_unique(faults)
    return faults


def _check_unique(faults: list[Fault]) -> None:
    seen: set[str] = set()
    for f in faults:
        if f.id in seen:
            raise InputError(f"--chaos (run.chaos): duplicate fault {f.id!r} (one fault per kind, rank and step). "
                             f"{GRAMMAR}")
        seen.add(f.id)


def _parse_fault(part: str) -> Fault:
    """One `KIND:key=value,...` part."""
    kind, _, body = part.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        _bad(part, f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    values: dict[str, str | None] = {}
    for item in (x.strip() for x in body.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in KEYS[kind]:
            _bad(part, f"unknown key {key!r} for {kind} (allowed: {', '.join(KEYS[kind])})")
        if key in values:
            _bad(part, f"key {key!r} given twice")
        if (key == "permanent") == bool(eq):
            _bad(part, "permanent is a flag without a value" if eq else f"{key} needs a value ({key}=...)")
        values[key] = value if eq else None
    fields = dict(
        kind=kind,
        rank=_int(part, "rank", values.get("rank")),
        step=_int(part, "step", values.get("step"), default=0 if kind == "slow" else None),
        factor=_float(part, "factor", values.get("factor")),
        permanent="permanent" in values,
        down=_float(part, "down", values.get("down"), default=0.0),
        times=_int(part, "times", values.get("times"), default=1),
    )
    problem = _fault_problem(**fields)
    if problem:
        _bad(part, problem)
    return Fault(**fields)


def _int(part: str, key: str, text: str | None, default: int | None = None) -> int | None:
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]+", text):  # ASCII digits: \d took a full-width "０" as 0
        _bad(part, f"{key} must be an integer >= {1 if key == 'times' else 0}, got {text!r}")
    return int(text)


def _float(part: str, key: str, text: str | None, default: float = 1.0) -> float:
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        _bad(part, f"{key} must be a number, got {text!r}")


def _bad(part: str, why: str):
    raise InputError(f"--chaos (run.chaos): bad fault {part!r}: {why}. {GRAMMAR}")


def check_ranks(faults: list[Fault], world: int) -> None:
    """Refuse a fault aimed at a rank the run does not have, or a flap in a run of one worker (no link to break):
    either would silently never fire."""
    for f in faults:
        if f.kind == "flap" and world < 2:
            raise InputError(f"--chaos (run.chaos): fault {f.id!r} breaks the links between workers, and the run has "
                             f"{world}: a flap needs --workers 2 or more")
        if f.rank is not None and f.rank >= world:
            raise InputError(f"--chaos (run.chaos): fault {f.id!r} names rank {f.rank}, but the run has {world} "
                             f"worker(s): ranks 0-{world - 1}")
    gone = {f.rank for f in faults if f.permanent}
    if len(gone) >= world:
        raise InputError(f"--chaos (run.chaos): permanent kills of rank(s) {', '.join(map(str, sorted(gone)))} leave "
                         f"none of the run's {world} worker(s): at least one must survive")


def format(faults: list[Fault]) -> str:  # noqa: A001 - the inverse of parse, named as in the interface
    """The spec string for `faults`; parse(format(faults)) == faults."""
    return "; ".join(_format_fault(f) for f in faults)


def _format_fault(f: Fault) -> str:
    parts = []
    if f.rank is not None:
        parts.append(f"rank={f.rank}")
    if f.step is not None:
        parts.append(f"step={f.step}")
    if f.kind == "slow":
        parts.append(f"factor={_float_text(f.factor)}")
    if f.permanent:
        parts.append("permanent")
    if f.down:
        parts.append(f"down={_float_text(f.down)}")
    if f.times != 1:
        parts.append(f"times={f.times}")
    return f"{f.kind}:" + ",".join(parts)


def _float_text(x: float) -> str:
    """Shortest text that parses back to exactly x ("3" for 3.0)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


class Chaos:
    """The faults that apply to one rank, with one-shot bookkeeping shared by every process of a run.

    marker_dir: a directory all workers of the run (and their restarts) share; None keeps the record in memory
    only (one process, no restarts: tests and dry runs).
    """

    def __init__(self, faults: list[Fault], rank: int, marker_dir: str | os.PathLike | None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
        _check_unique(list(faults))
        self.faults = list(faults)
        self.rank = rank
        self.marker_dir = Path(marker_dir) if marker_dir is not None else None
        if self.marker_dir is not None:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
        self._fired: set[str] = set()  # marker names fired by this process

    def _applies(self, f: Fault) -> bool:
        return f.rank is None or f.rank == self.rank

    def _marker(self, f: Fault, k: int = 0) -> str:
        """Per rank (a fault on all ranks fires once on each) and per firing k < f.times."""
        return f"{f.id}.r{self.rank}" + (f".{k}" if k else "") + ".fired"

    def _has(self, name: str) -> bool:
        return name in self._fired or (self.marker_dir is not None and (self.marker_dir / name).exists())

    def _firings(self, f: Fault) -> int:
        """How many times this rank fired `f` in this run (this process or an earlier one)."""
        k = 0
        while k < f.times and self._has(self._marker(f, k)):
            k += 1
        return k

    def fired(self, fault: Fault) -> bool:
        """Whether this rank already fired `fault` (all its `times`) in this run."""
        return self._firings(fault) >= fault.times

    def due(self, step: int, kind: str) -> Fault | None:
        """The one-shot fault of `kind` for this rank at exactly `step` that has not fired yet, else None."""
        if kind not in ONE_SHOT:
            raise ValueError(f"due() is for one-shot kinds {', '.join(ONE_SHOT)}; use slow_factor() for slow")
        for f in self.faults:
            if f.kind == kind and f.step == step and self._applies(f) and not self.fired(f):
                return f
        return None

    def fire(self, fault: Fault) -> None:
        """Record that `fault` fired (once more) on this rank. Call BEFORE acting: the marker is on disk when this
        returns."""
        name = self._marker(fault, self._firings(fault))
        self._fired.add(name)
        if self.marker_dir is not None:
            write_json(self.marker_dir / name, {"id": fault.id, "rank": self.rank, "pid": os.getpid()})

    def take(self, step: int, kind: str) -> Fault | None:
        """due() and, if a fault is due, fire() it: the caller then acts on the returned fault."""
        f = self.due(step, kind)
        if f is not None:
            self.fire(f)
        return f

    def slow_factor(self, step: int) -> float:
        """Product of the factors of every slow fault active for this rank at `step` (1.0 when none)."""
        factor = 1.0
        for f in self.faults:
            if f.kind == "slow" and self._applies(f) and step >= (f.step or 0):
                factor *= f.factor
        return factor

    def downtime(self) -> float:
        """Seconds a (re)starting worker must stay down first: a fired `kill ... down=S` of this rank whose
        downtime was not served yet (served once, recorded like a firing)."""
        total = 0.0
        for f in self.faults:
            if f.kind == "kill" and f.down and self._applies(f) and self.fired(f):
                served = Fault(kind="kill", rank=self.rank, step=f.step, id=f"{f.id}-down")
                if not self.fired(served):
                    self.fire(served)
                    total += f.down
        return total

    def node_lost(self) -> bool:
        """Whether a permanent kill of this rank has fired: its slot never comes back."""
        return any(f.kind == "kill" and f.permanent and f.rank == self.rank and self.fired(f) for f in self.faults)
