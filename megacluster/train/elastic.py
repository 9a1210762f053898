"""The membership protocol between the supervisor and its workers, over one TCPStore the supervisor hosts.

A run is a sequence of *generations*. In each, a fixed set of workers (by stable worker id = slot) forms one
process group (rendezvous on the store under the prefix `pg/<gen>`) and trains. Any change — a worker died
or hung (the supervisor kills it; the survivors' collective fails), a collective failed on its own (a link
flap), or a restarted worker is ready to rejoin — ends the generation at a step boundary:

    worker                                   supervisor
    collective error, or gen bump seen  ->   (bumps `gen_counter` to ask healthy workers to stop at a step)
    destroy its process group
    set  status/<gen>/<wid> = {step}    ->   waits until every member reported or is dead,
                                             restarts dead ones (replacements announce ready/<wid>),
    wait for plan/<gen+1>               <-   publishes plan/<gen+1> = {members, source, step, sync}
    join pg/<gen+1>, rank = index in members; if sync: receive model + optimizer + history from `source`

Healthy workers see the bump in `gen_counter` at the start of a step and put a flag in the step's all-reduce,
so all of them stop after the *same* step. The source is the member with the most completed steps (its state
is a complete, correct step: nothing is lost but the step in flight). Heartbeats: `hb/<wid>` = completed
step, written after every step, and every 0.5 s by a background thread while the worker waits on its peers
(inside a collective, a rendezvous or a state transfer): a member whose heartbeat does not change for
`hang_timeout` seconds is hung in its *own* work, and the peers waiting on it are not mistaken for hung too.
The process-group timeout is only a backstop (5 x hang_timeout, at least 30 s).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

NODE_LOST = 3  # exit code of a replacement worker whose slot is permanently gone (chaos `permanent`)
CHECKPOINT_FAILED = 4  # exit code of a worker that could not write or read a checkpoint: a replacement would
# fail the same way (a full disk), so the supervisor ends the run instead of restarting it
INPUT_REFUSED = 2  # exit code of a worker whose input was refused (InputError, e.g. a shard changed mid-run): the
# same as the CLI's for bad input, and as final
DIVERGED = 5  # exit code of a worker whose loss or gradient norm went nan/inf (loop.Diverged): a restart would
# replay the same steps to the same end, so the supervisor ends the run


@dataclass(kw_only=True, slots=True)
class Plan:
    gen: int
    members: list[int]  # worker ids, in rank order
    source: int  # worker id whose state everyone adopts (when sync): the most progress (step, then not pending)
    step: int  # the source's completed steps
    sync: bool  # whether members must receive state from the source


def connect(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


class Membership:
    """Worker side of the protocol. Created from the environment the supervisor sets (MC_* variables)."""

    def __init__(self, store: dist.TCPStore, wid: int, pg_timeout_s: float, beat_store: dist.TCPStore | None = None):
        self.store, self.wid, self.gen = store, wid, 0
        self.pg_timeout_s = pg_timeout_s
        self._waiting_step: int | None = None  # set while blocked on peers: the beat thread heartbeats for us
        if beat_store is not None:  # its own connection: store clients are not shared across threads
            threading.Thread(target=self._beat_while_waiting, args=(beat_store,), daemon=True).start()

    @classmethod
    def from_env(cls) -> Membership | None:
        if "MC_STORE_PORT" not in os.environ:
            return None
        host, port = os.environ.get("MC_STORE_HOST", "127.0.0.1"), int(os.environ["MC_STORE_PORT"])
        return cls(connect(host, port), int(os.environ["MC_WORKER_ID"]),
                   float(os.environ.get("MC_PG_TIMEOUT", "60")), beat_store=connect(host, port))

    def heartbeat(self, step: int) -> None:
        self.store.set(f"hb/{self.wid}", f"{step} {time.time():.3f}")

    @contextlib.contextmanager
    def waiting(self, step: int):
        """Around code that blocks on peers: keeps our heartbeat alive so only the stuck peer counts as hung."""
        outer, self._waiting_step = self._waiting_step, step
        try:
            yield
        finally:
            self._waiting_step = outer  # nested blocks: the outer one is still waiting

    def _beat_while_waiting(self, store: dist.TCPStore) -> None:
        while True:
            step = self._waiting_step
            if step is not None:
                try:
                    store.set(f"hb/{self.wid}", f"{step} wait {time.time():.3f}")
                except Exception:  # keep trying: one failed write must not silence us for good (if the
                    pass  # supervisor is gone, the main thread finds out; this daemon thread dies with it)
            time.sleep(0.5)

    def announce_ready(self, step: int) -> None:
        """A new process: skip the generations formed before it existed, then tell the supervisor it can join."""
        self.gen = int(self.store.add("gen_latest", 0))
        self.heartbeat(step)
        self.store.set(f"ready/{self.wid}", str(step))

    def bump_seen(self) -> bool:
        """True when the supervisor asked the current generation to end (cheap: one store round trip)."""
        return self.store.add("gen_counter", 0) > self.gen

    def stop_asked(self) -> int | None:
        """The signal number the supervisor was stopped with (it then also bumps `gen_counter`), else None."""
        return int(self.store.get("stop")) if self.store.check(["stop"]) else None

    def report(self, step: int, pending: bool) -> None:
        """Our state: `step` completed steps; `pending` = that step's logging/eval/checkpoint not yet done."""
        self.store.set(f"status/{self.gen}/{self.wid}", json.dumps({"step": step, "pending": pending}))

    def wait_plan(self, step: int, timeout_s: float) -> Plan:
        """Block (the beat thread heartbeats for us) until the plan of the next generation this worker belongs to
        is published."""
        deadline = time.monotonic() + timeout_s
        with self.waiting(step):
            while True:
                key = f"plan/{self.gen + 1}"
                if self.store.check([key]):
                    plan = Plan(**json.loads(self.store.get(key)))
                    self.gen = plan.gen
                    if self.wid in plan.members:
                        return plan
                    continue  # a generation formed without us (we were too late); wait for the next one
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {self.wid}: no plan for generation {self.gen + 1} in "
                                       f"{timeout_s:.0f} s")
                time.sleep(0.05)

    def join(self, plan: Plan, backend: str) -> tuple[int, int]:
        """Form the process group of `plan`; returns (rank, world).

        First every member posts `joined/<gen>/<wid>` and waits for the others (heartbeating), giving up with
        RuntimeError as soon as the supervisor ends this generation (a member died before it formed), so a
        dead member costs a re-plan, not a rendezvous timeout."""
        rank, world = plan.members.index(self.wid), len(plan.members)
        self.store.set(f"joined/{plan.gen}/{self.wid}", "1")
        keys = [f"joined/{plan.gen}/{w}" for w in plan.members]
        with self.waiting(plan.step):
            while not self.store.check(keys):
                if self.bump_seen() and self.stop_asked() is None:  # a stop is acted on after the first step
                    raise RuntimeError(f"generation {plan.gen} was ended before it formed")
                time.sleep(0.02)
            dist.init_process_group(backend, store=dist.PrefixStore(f"pg/{plan.gen}", self.store), rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=self.pg_timeout_s))
        return rank, world

    def leave(self) -> None:
        """Drop the current process group. After a failed collective the group is aborted, not shut down
        gracefully: a graceful NCCL shutdown can wait forever on work queued for a dead peer."""
        if not dist.is_initialized():
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None and dist.get_backend() == "nccl":
            abort()
        else:
            dist.destroy_process_group()
