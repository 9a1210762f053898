"""Launch the workers of a run, watch them, and keep the run going through their failures.

- Under torchrun (or any launcher that sets RANK/WORLD_SIZE) this process *is* a worker: it trains in-process
  and, on a restart by the launcher (TORCHELASTIC_RESTART_COUNT > 0), resumes from the newest good checkpoint.
- One local worker and no fault injection: train in-process (no process group, nothing to supervise).
- Otherwise: the `Supervisor` starts one process per worker slot and runs the membership protocol of
  `elastic.py`. It watches process exit and per-worker heartbeats (no progress for `hang_timeout` s = hung,
  killed), and recovers:
    (a) from a live peer: the survivors keep their in-memory state; a restarted replacement receives the
        state of the most advanced survivor; only the step in flight is lost;
    (b) from the newest good checkpoint when no worker survived (or after repeated collective failures);
  A slot that cannot come back (exit NODE_LOST, or out of restarts) is dropped: the run continues with fewer
  workers (shrink) and the global batch is re-split; a replacement that becomes ready later joins at the next
  step boundary (grow). A collective failure with every worker alive (a link flap) re-forms the process group
  after a backoff, without touching the disk; `max_flaps` such failures in a row without progress escalate
  to restarting every worker from the checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..config import Config, ModelConfig, ffn_hidden
from ..data import Corpus, prepare
from ..errors import InputError
from ..files import RUN_OUTPUTS, fsync_dir, run_outputs, under_launcher, write_json
from .checkpoint import CheckpointError, check_max_steps, meta_of, newest_meta
from .elastic import CHECKPOINT_FAILED, DIVERGED, INPUT_REFUSED, NODE_LOST, Plan
from .inputs import check, check_fits, refused_runs_leave_no_dir, run_dir_lock
from .signals import SIGNALS, StopSignals, exit_code
from .zygote import Forked, Zygote, ZygoteFailed, base_env, forks, start_zygote, supervised

POLL_S = 0.05  # seconds between supervisor checks
MAX_RESTARTS = 3  # restarts per worker slot before it is given up
MAX_FLAPS = 3  # consecutive collective failures without progress before escalating to a full restart
MAX_ESCALATIONS = 2  # full restarts that do not get past the failing step before the run gives up


def hb_step(value: str) -> int:
    """The completed step in a heartbeat value ("<step> [wait] <time>"; "" = none yet)."""
    return int(value.split()[0]) if value else 0


def train(cfg: Config, *, checked: bool = False) -> dict | None:
    """Train per `cfg`; returns rank 0's result dict (None on other ranks under a launcher). checked: the caller
    ran `inputs.check(cfg)` and holds `run_dir_lock` already (the CLI does both before importing torch, inside
    `refused_runs_leave_no_dir`)."""
    if checked:
        return _train(cfg)
    with refused_runs_leave_no_dir(cfg.run.run_dir):
        check(cfg)  # the torch-free checks: the run dir, the data paths, ...
        with run_dir_lock(cfg):
            return _train(cfg)


def _train(cfg: Config) -> dict | None:
    from .loop import Worker, init_place, resolve_device  # torch is imported only when training

    restarted = under_launcher() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted:
        cfg.run.resume = True  # restarted by torchrun: continue exactly from the newest good checkpoint
    run_dir = Path(cfg.run.run_dir)
    device = resolve_device(cfg.run.device)  # refuses cuda without a GPU
    check_fits(cfg, device)
    note = check_resume(cfg) if cfg.run.resume else None
    if under_launcher():
        corpus = prepare(cfg.data, cfg.model.vocab_size, [run_outputs(run_dir)])  # each rank (one tokenizes)
        note = _joined(note, check_data(cfg, corpus, restarted=restarted))
        if int(os.environ["RANK"]) == 0:  # rank 0 speaks and writes for all
            begin_unsupervised(cfg, note)
        place = init_place(cfg.run.device, timeout_s=max(60.0, cfg.run.hang_timeout))
        result = Worker(cfg, place, corpus=corpus).run(result_to=run_dir / "result.json" if place.is_main else None)
        if place.is_main:
            return result
        if result["stopped"]:  # every rank stopped after the same step: exit as rank 0 does (note: torchrun
            from .worker import hard_exit  # restarts on any non-zero exit unless it was signalled itself)

            hard_exit(exit_code(result))
        return None
    if device == "cuda" and cfg.run.workers > 1:
        import torch

        if cfg.run.workers > torch.cuda.device_count():
            raise InputError(f"run.workers={cfg.run.workers}: one GPU per worker, and this machine has "
                             f"{torch.cuda.device_count()}; use --device cpu for more workers than GPUs")
    corpus = prepare(cfg.data, cfg.model.vocab_size, [run_outputs(run_dir)])  # once, before any worker starts
    note = _joined(note, check_data(cfg, corpus))
    if not supervised(cfg.run):
        begin_unsupervised(cfg, note)
        return Worker(cfg, init_place(cfg.run.device), corpus=corpus).run(result_to=run_dir / "result.json")
    begin(cfg, note)
    return Supervisor(cfg, corpus, device).run()


def begin(cfg: Config, note: str | None) -> None:
    """Past every input check (a refused run moves, deletes or rewrites nothing): a fresh run sets an earlier
    one aside, a resume says which keys changed. The run dir's result.json is then this invocation's to write."""
    run_dir = Path(cfg.run.run_dir)
    if not cfg.run.resume:
        set_aside_earlier_run(run_dir)
    if note:
        print(note, file=sys.stderr, flush=True)
    (run_dir / "result.json").unlink(missing_ok=True)


def begin_unsupervised(cfg: Config, note: str | None) -> None:
    """`begin` for a run without a supervisor (one process; rank 0 under torchrun): it writes config.json as the
    supervisor does, and removes workers.json and corpus.json, which only a supervised invocation writes: after
    --resume they named the processes and corpus of the one before (a user audit)."""
    begin(cfg, note)
    run_dir = Path(cfg.run.run_dir)
    for name in ("workers.json", "corpus.json"):
        (run_dir / name).unlink(missing_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())


def check_fatal(wid: int, code: int | None) -> None:
    """End the run on an exit no restart would cure."""
    if code == CHECKPOINT_FAILED:
        raise RuntimeError(f"worker {wid} could not write or read a checkpoint (its message above); the checkpoints "
                           "already there stand: fix the cause (a full disk?), then --resume")
    if code == INPUT_REFUSED:
        raise InputError(f"worker {wid} refused its input (its message above)")
    if code == DIVERGED:
        raise RuntimeError(f"worker {wid}: training diverged (its message above names the step)")


def describe_exit(code: int) -> str:
    """'code -7 (SIGBUS: ...)': a worker's exit code, with the signal that ended it named."""
    if code >= 0:
        return f"code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"code {code}"
    if name == "SIGBUS":  # the usual cause in a trainer: a memory-mapped file shrank under it
        name += ": a memory-mapped input (a token shard) truncated or rewritten?"
    return f"code {code} ({name})"


def check_resume(cfg: Config) -> str | None:
    """--resume with model keys other than the checkpoint's would fail deep inside load_state_dict (or, for keys
    that change no shape, silently train another model): refuse it before anything starts, as a --max-steps below
    the checkpoint's step. Other sections may change on resume (a longer run, another learning rate, more
    workers; then it is no longer exact), except data.val_fraction (`_changed_keys`). Returns the note naming the
    changed keys, said once every check has passed (a refused resume said first that it would go on)."""
    directory = Path(cfg.run.run_dir) / "checkpoints"
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--resume: {directory} is not a directory of checkpoints; give the run dir of the run "
                         "to resume (run.run_dir, --run-dir)")
    meta = newest_meta(directory) or {}
    saved_cfg = meta.get("config") or {}
    note = _changed_keys(saved_cfg, cfg)
    _check_same_model(saved_cfg.get("model"), cfg, directory)
    if meta.get("step", 0) > cfg.run.max_steps:  # refused only for a checkpoint the loader would take
        check_max_steps((newest_meta(directory, hashed=True) or {}).get("step"), cfg.run.max_steps, directory)
    return note


def _check_same_model(saved: dict | None, cfg: Config, directory: Path) -> None:
    if not saved:
        return
    try:
        saved, current = _resolved_model(saved), _resolved_model(cfg.to_dict()["model"])
    except (TypeError, ValueError) as e:
        raise InputError(f"--resume: unreadable model config in the newest checkpoint in {directory}: {e}") from e
    diffs = [f"model.{k} = {saved[k]!r} there, {current[k]!r} here" for k in sorted(saved)
             if saved[k] != current[k] and k != "init_std"]  # init_std acts only before step 1
    if diffs:
        raise InputError(f"--resume: the newest checkpoint in {directory} is of another model ({'; '.join(diffs)}); "
                         "resume with the same model keys (and preset), or start in a new --run-dir")


RESUME_QUIET = {"run.resume", "run.run_dir", "run.progress", "data.cache_dir"}  # no bearing on what is trained


def _changed_keys(saved: dict, cfg: Config) -> str | None:
    """--resume continues with the config given now: the note naming the keys that differ from the checkpoint's
    run (a forgotten --max-steps would otherwise stretch the schedule without a word). A changed
    data.val_fraction is refused: it would move tokens already trained on into the validation split."""
    now = cfg.to_dict()
    changed = {f"{section}.{key}": (old, now[section][key]) for section in ("data", "optim", "run")
               for key, old in (saved.get(section) or {}).items()
               if key in now.get(section, {}) and old != now[section][key]
               and f"{section}.{key}" not in RESUME_QUIET}
    if "data.paths" in changed and [_norm(p) for p in changed["data.paths"][0]] == \
            [_norm(p) for p in changed["data.paths"][1]]:
        del changed["data.paths"]  # the same inputs, spelt otherwise ("d" and "/abs/d/")
    if "data.val_fraction" in changed:
        old, new = changed["data.val_fraction"]
        raise InputError(f"--resume: data.val_fraction is {new} here, {old} in the checkpoint's run: the validation "
                         "split would take in tokens already trained on; resume with the same value")
    if not changed:
        return None
    return ("--resume: the run goes on with the values given now, where they differ from the checkpoint's run: "
            + "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())))


def _norm(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _joined(*notes: str | None) -> str | None:
    return "\n".join(n for n in notes if n) or None


def check_data(cfg: Config, corpus: Corpus, *, restarted: bool = False) -> str | None:
    """Before any worker starts: both splits hold a sequence, and a resumed run reads its checkpoint's tokens.
    An input edited since the checkpoint gives a text corpus another tokenizer, whose ids mean other text to the
    model's embeddings: refused. (Changed split sizes with the same tokenizer, data added, only make the run no
    longer exact, as other changed sections do.) A torchrun restart (`restarted`) continues the same run: a
    token shard changed since the checkpoint is refused there (a shard changed mid-run is what ended the
    previous attempt), where a user's --resume may give other shards: the note returned says so."""
    corpus.check(cfg.model.seq_len, cfg.data.val_fraction)
    if not cfg.run.resume:
        return None
    data = (newest_meta(Path(cfg.run.run_dir) / "checkpoints") or {}).get("data") or {}
    ours = corpus.identity()  # (hashes the tokenizer file)
    if restarted and data.get("shards_key") and data["shards_key"] != ours["shards_key"]:
        raise InputError("--data: a token shard changed since the checkpoint this torchrun restart resumes; every "
                         "attempt of a run must read the same shards, unchanged (--resume in a new command may "
                         "give other ones)")
    saved = data.get("tokenizer_sha256")
    if saved and saved != ours["tokenizer_sha256"]:
        raise InputError(f"--resume: the tokenizer built from --data now differs from the one the checkpoint in "
                         f"{cfg.run.run_dir} was trained with (an input, data.max_bytes or the file list changed): "
                         "token ids would mean other text; resume with the same inputs, or start in a new --run-dir")
    if data.get("shards_key") and data["shards_key"] != ours["shards_key"]:  # a user's --resume (above: a restart)
        return ("--resume: the token shards differ from those the checkpoint was trained on (other files, or the same "
                "paths of another size or time): the run goes on with them, no longer as an uninterrupted run would")
    return None


def set_aside_earlier_run(run_dir: Path) -> None:
    """A fresh run in a run dir that holds any of the files a run writes: move them into RUN_DIR/earlier-<UTC
    time>/ (nothing is deleted). Left in place, a later --resume of this run could pick the earlier run's newer
    checkpoint, metrics.jsonl would mix two runs, and the run would overwrite a config.json or result.json that
    may not even be a run's (a project directory given as --run-dir)."""
    # chaos markers left in place: a fresh run under torchrun, which has no supervisor to clear them, would not fire
    # its faults again; workers.json: a fresh run's would otherwise name the earlier run's processes until its start
    found = [run_dir / n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    found = [p for p in found if not (p.is_dir() and not p.is_symlink() and not any(p.iterdir()))]  # empty: no loss
    if not found:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = run_dir / f"earlier-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / f"earlier-{stamp}-{n}"
    try:
        dest.mkdir()
        for p in found:
            os.replace(p, dest / p.name)
        fsync_dir(run_dir)
    except OSError as e:
        raise InputError(f"run.run_dir (--run-dir) {run_dir}: cannot set the earlier run aside ({e}); resume it "
                         "with --resume, or use another --run-dir") from e
    print(f"a fresh run in {run_dir}: the earlier run's {', '.join(p.name for p in found)} moved to {dest} "
          "(use --resume to continue a run instead)", file=sys.stderr, flush=True)


def _resolved_model(d: dict) -> dict:
    """Every model key (defaults for keys `d` lacks, keys ModelConfig no longer has dropped), with the derived
    defaults resolved: n_kv_head 0 = n_head, ffn_hidden 0 = the width derived from d_model."""
    known = {f.name for f in fields(ModelConfig)}
    m = ModelConfig(**{k: v for k, v in d.items() if k in known})
    return {**asdict(m), "n_kv_head": m.n_kv_head or m.n_head, "ffn_hidden": ffn_hidden(m)}


@dataclass(kw_only=True, slots=True)
class Slot:
    """One worker slot (stable worker id) and the process currently filling it."""

    wid: int
    proc: subprocess.Popen | Forked | None = None
    state: str = "joining"  # joining | member | failed (dead or killed, not yet replaced) | lost | done
    restarts: int = 0
    started: float = 0.0  # monotonic time the current process started
    hb: str = ""  # last heartbeat value seen
    hb_changed: float = 0.0  # monotonic time it last changed


@dataclass(kw_only=True, slots=True, frozen=True)
class Resumed:
    """Where a newly formed generation resumes."""

    step: int  # the source's completed steps
    from_checkpoint: bool  # the source is no survivor: its state was loaded from a checkpoint


@dataclass(kw_only=True, slots=True)
class Stats:
    restarts: int = 0
    recoveries_from_peer: int = 0
    recoveries_from_checkpoint: int = 0
    flaps_survived: int = 0
    lost_steps: int = 0
    recovery_s: list[float] = field(default_factory=list)  # failure detected -> next step done, seconds


class Supervisor:
    def __init__(self, cfg: Config, corpus: Corpus, device: str):
        """device: the run's, resolved ("cpu" or "cuda")."""
        import torch.distributed as dist

        self.cfg = cfg
        self.run_dir = Path(cfg.run.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.run.resume:  # a fresh run: old one-shot chaos markers do not apply
            shutil.rmtree(self.run_dir / "chaos", ignore_errors=True)
        write_json(self.run_dir / "config.json", cfg.to_dict())
        self.corpus_ref = self.run_dir / "corpus.json"  # every worker reads this corpus (data.reopen): a file, as
        write_json(self.corpus_ref, corpus.reference())  # thousands of shard paths exceed an environment string
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60))
        self.store.set("gen_counter", "0")
        self.slots = [Slot(wid=w) for w in range(cfg.run.workers)]
        self.gen = 0
        self.plan: Plan | None = None
        self.stats = Stats()
        self.worker_s = 0.0  # worker-seconds of every process that ran (the goodput denominator)
        self.kept_before_s = 0.0  # worker-seconds of the steps restored on --resume: trained by an earlier
        # invocation, so not in worker_s; the result's kept_worker_s (the numerator) leaves them out
        self.t_last = time.monotonic()
        self.recovering: tuple[float, int] | None = None  # (failure detected at, step to beat)
        self.flaps_in_a_row = 0
        self.escalations = 0  # full restarts since a step beyond `escalation_mark` was last completed
        self.escalation_mark = -1  # the newest step completed before the last full restart
        self.stop = StopSignals()  # SIGTERM/SIGINT received: the workers checkpoint and stop (signals.py)
        self.stop_sent_gen = -1  # the generation the stop request was posted in
        self.fork = forks(cfg.run, device)  # workers forked from the zygote (zygote.py), else exec'd
        self.zygote: Zygote | None = None  # started at the first spawn

    # ---- processes ----
    def spawn(self, slot: Slot, init: str) -> None:
        """Start a process for `slot`; init: 'config' (first start), 'checkpoint' or 'peer' (state from a survivor)."""
        env = base_env()
        import torch

        # torch's own default (physical cores, or OMP_NUM_THREADS), split: a single supervised worker computes with
        # the threads an unsupervised run has, so it sums in the same order (MKL's AVX2 kernels sum differently
        # with 1 thread than with 2: on a 2-vCPU, 1-core VM a chaos run would get another digest than a clean one)
        threads = max(1, torch.get_num_threads() // len(self.slots))
        env.update(MC_STORE_PORT=str(self.store.port), MC_WORKER_ID=str(slot.wid), MC_INIT=init,
                   MC_CORPUS=str(self.corpus_ref),  # the supervisor's corpus, not the inputs prepared again
                   MC_PG_TIMEOUT=str(max(30.0, 5 * self.cfg.run.hang_timeout)),  # a backstop (elastic.py)
                   TORCH_NCCL_BLOCKING_WAIT="1",  # NCCL: a failed collective raises here instead of aborting us
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)))
        if self.cfg.run.device != "cpu":
            env.setdefault("LOCAL_RANK", str(slot.wid))
        self.store.delete_key(f"ready/{slot.wid}")
        self.store.delete_key(f"hb/{slot.wid}")
        slot.proc = None
        if self.fork:
            self.zygote = self.zygote or start_zygote()
            try:
                slot.proc = self.zygote.spawn(env, str(self.run_dir), ready_timeout=self.ready_timeout)
            except ZygoteFailed as e:  # the zygote keeps watching the workers it forked, if it still can
                self.log(f"cannot fork workers ({e}); starting them with exec from now on")
                self.fork = False
        if slot.proc is None:
            # the child starts with SIGTERM/SIGINT blocked (the mask survives exec) and unblocks them once its
            # handler is set (worker.py): a Ctrl-C while it is still starting Python is recorded, not fatal
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            try:
                slot.proc = subprocess.Popen([sys.executable, "-m", "megacluster.train.worker", str(self.run_dir)],
                                             env=env)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.state, slot.started, slot.hb, slot.hb_changed = "joining", time.monotonic(), "", time.monotonic()
        pids = {s.wid: s.proc.pid for s in self.slots if s.proc is not None}
        write_json(self.run_dir / "workers.json", pids)  # for operators (and tests) to find the processes

    def kill(self, slot: Slot) -> None:
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.send_signal(signal.SIGKILL)
            slot.proc.wait()

    def members(self) -> list[Slot]:
        return [s for s in self.slots if s.state == "member"]

    # ---- watching ----
    def poll(self) -> list[Slot]:
        """Account worker-seconds, read heartbeats; returns members that died or hung (hung ones are killed)."""
        now = time.monotonic()
        self.worker_s += (now - self.t_last) * sum(1 for s in self.slots if s.proc and s.proc.poll() is None)
        self.t_last = now
        failed = []
        for s in self.members():
            code = s.proc.poll()
            if code == 0:
                s.state = "done"
                continue
            check_fatal(s.wid, code)
            if code is not None:
                self.log(f"worker {s.wid} exited with {describe_exit(code)}")
                s.state = "failed"
                failed.append(s)
                continue
            hb = self.read_hb(s)
            if hb != s.hb:
                s.hb, s.hb_changed = hb, now
                self.note_progress(hb_step(hb), now)
            elif now - s.hb_changed > self.hang_limit(s):
                self.log(f"worker {s.wid} made no progress for {now - s.hb_changed:.1f} s: hung, killing it")
                self.kill(s)
                s.state = "failed"
                failed.append(s)
        return failed

    def hang_limit(self, s: Slot) -> float:
        """No-progress limit; the first step of a generation may also compile, so it gets more time."""
        step = hb_step(s.hb)
        first = self.plan is not None and step <= self.plan.step
        return self.cfg.run.hang_timeout * (5 if first else 1)

    def read_hb(self, s: Slot) -> str:
        """The heartbeat value `s` last wrote ("" if none yet)."""
        key = f"hb/{s.wid}"
        return self.store.get(key).decode() if self.store.check([key]) else ""

    def last_step(self, s: Slot) -> int:
        """The newest completed step `s` reported (read from the store: the last poll may be older)."""
        return hb_step(self.read_hb(s))

    @property
    def ready_timeout(self) -> float:
        """How long a new worker process may take to become ready (imports, data, CUDA context)."""
        return max(120.0, 4 * self.cfg.run.hang_timeout)

    def note_progress(self, step: int, now: float) -> None:
        if self.recovering is not None and step > self.recovering[1]:
            self.stats.recovery_s.append(now - self.recovering[0])
            self.log(f"recovered: step {step} done {now - self.recovering[0]:.2f} s after the failure was detected")
            self.recovering = None
            self.flaps_in_a_row = 0
        if step > self.escalation_mark:
            self.escalations = 0  # got past where the collectives kept failing

    def joiners_ready(self) -> list[Slot]:
        return [s for s in self.slots if s.state == "joining" and self.store.check([f"ready/{s.wid}"])]

    def check_joiners(self) -> None:
        """Joiners that exited: NODE_LOST = gone for good; otherwise restart while restarts remain."""
        for s in self.slots:
            if s.state != "joining" or s.proc is None:
                continue
            if s.proc.poll() is None:  # still starting
                if time.monotonic() - s.started > self.ready_timeout:
                    self.log(f"worker {s.wid} did not become ready in time; killing it")
                    self.kill(s)
                continue
            check_fatal(s.wid, s.proc.returncode)
            self.restart(s, "peer" if self.members() else "checkpoint", exit_code=s.proc.returncode)

    def restart(self, s: Slot, init: str, exit_code: int | None = None) -> bool:
        """Start a new process for slot `s`, or give the slot up: the one place that decides.

        A slot is given up (state 'lost', the run continues without it) when its process exited with NODE_LOST,
        it has used its MAX_RESTARTS restarts, or the run is stopping. Returns whether a process was started."""
        if exit_code == NODE_LOST or s.restarts >= MAX_RESTARTS or self.stop.signum is not None:
            why = ("its node is gone" if exit_code == NODE_LOST else f"{s.restarts} restarts used"
                   if self.stop.signum is None else f"stopping on {self.stop.name}")
            self.log(f"worker {s.wid} cannot come back ({why}): continuing without it")
            s.state = "lost"
            return False
        s.restarts += 1
        self.stats.restarts += 1
        self.spawn(s, init)
        return True

    # ---- generations ----
    def run(self) -> dict:
        """On SIGTERM/SIGINT the workers are asked to stop after the same step with a checkpoint (`ask_stop`) and
        their result is returned; the same signal again stops at once (the workers are killed)."""
        with self.stop.installed():
            return self._run()

    def ask_stop(self) -> None:
        """Post the stop request and end the generation: the workers see it at their next step, agree in that
        step's all-reduce, and rank 0 checkpoints. Posted again if a new generation formed meanwhile."""
        if self.stop_sent_gen == self.gen:
            return
        self.log(f"{self.stop.name}: asking the workers to checkpoint and stop")
        self.store.set("stop", str(self.stop.signum))
        self.store.add("gen_counter", 1)
        self.stop_sent_gen = self.gen

    def _run(self) -> dict:
        try:
            for s in self.slots:
                self.spawn(s, "checkpoint" if self.cfg.run.resume else "config")
            self.wait_ready(self.slots, timeout=self.ready_timeout)
            if not self.joiners_ready():
                raise RuntimeError(self.none_ready())
            if self.cfg.run.resume:  # before the plan: until then no worker writes (or prunes) a checkpoint
                self.kept_before_s = self.kept_in_checkpoint(max(int(self.store.get(f"ready/{s.wid}"))
                                                                 for s in self.joiners_ready()))
            self.form(reason="start")
            while True:
                failed = self.poll()
                self.check_joiners()
                if any(s.state == "done" for s in self.slots):
                    self.finish()  # a member finished the last step: the run is over, no more generations
                    break
                if self.stop.signum is not None:
                    if failed or self.reported():
                        raise self.failed_while_stopping()
                    self.ask_stop()
                elif failed:
                    self.transition(failed, "failure")
                elif self.reported():
                    self.transition([], "error")
                elif self.joiners_ready() and self.members():
                    self.transition([], "grow")
                time.sleep(POLL_S)
        finally:
            for s in self.slots:
                self.kill(s)
            self.store = None
        return self.result()

    def none_ready(self) -> str:
        """Why no generation can form: workers still starting when the wait for them ended, or none left."""
        starting = [s.wid for s in self.slots if s.state == "joining" and s.proc is not None and s.proc.poll() is None]
        if starting:
            return (f"no worker became ready within {self.ready_timeout:g} s (max(120 s, 4 x run.hang_timeout)): "
                    f"worker(s) {starting} were still starting (imports, data, model): is the machine overloaded?")
        return "no worker is left to continue the run; see the worker errors above"

    def finish(self) -> None:
        """A member is done: let the others exit (they end after the same step). Rank 0 may be writing a large
        final checkpoint (heartbeating while it does), so the wait is long: max(600 s, 10 x hang_timeout). One
        that stops heartbeating is killed by `poll` like any hung worker; one that reports for a next generation
        (its collective failed after the last step) waits for a plan that will not come, and is killed."""
        deadline = time.monotonic() + max(600.0, 10 * self.cfg.run.hang_timeout)
        while any(s.state == "member" and s.proc.poll() is None for s in self.slots):
            self.poll()
            for wid in self.reported():
                self.kill(self.slots[wid])
            if time.monotonic() > deadline:
                self.log("workers still running long after the last step: killing them")
                break
            time.sleep(POLL_S)

    def reported(self) -> list[int]:
        return [s.wid for s in self.members() if self.store.check([f"status/{self.gen}/{s.wid}"])]

    def wait_ready(self, slots: list[Slot], timeout: float) -> None:
        """Wait until each of `slots` is ready to join (or gone); those still starting `timeout` s after the first of
        them started join later. Counted from the start (as `check_joiners` counts): with timeout = ready_timeout,
        none is killed for being late while we wait, so the caller sees every late one still starting."""
        deadline = min((s.started for s in slots if s.state == "joining"), default=time.monotonic()) + timeout
        while any(s.state == "joining" for s in slots) and time.monotonic() < deadline:
            self.poll()
            self.check_joiners()
            if all(s.state != "joining" or self.store.check([f"ready/{s.wid}"]) for s in slots):
                return
            time.sleep(POLL_S)

    def transition(self, failed: list[Slot], cause: str) -> None:
        """End generation `gen` (everyone stops at a step boundary), repair, and form the next one.

        cause: 'failure' (members died or hung), 'error' (a member reported a failed collective), 'grow'."""
        t_detect = time.monotonic()
        self.store.add("gen_counter", 1)  # healthy members stop after their current step
        max_step = max((self.last_step(s) for s in self.members() + failed), default=0)  # before the failure
        dead = {s.wid for s in failed}
        failed = list(failed)
        # wait until every member has reported its state or died. A member that keeps waiting on its peers
        # (heartbeating) for hang_timeout after the generation ended is stuck in a collective the transport did
        # not fail: it is killed and replaced like a dead one (the members that reported hold the state).
        deadline = time.monotonic() + self.cfg.run.hang_timeout
        while True:
            newly = self.poll()
            waiting = [s for s in self.members() if not self.store.check([f"status/{self.gen}/{s.wid}"])]
            if waiting and time.monotonic() > deadline and len(waiting) < len(self.members()):
                for s in waiting:
                    self.log(f"worker {s.wid} is still blocked {self.cfg.run.hang_timeout:.0f} s after the "
                             "generation ended: killing it")
                    self.kill(s)
                    s.state = "failed"
                newly += waiting
                waiting = []
            failed += newly
            dead |= {s.wid for s in newly}
            self.end_if_stopping(dead)
            self.check_joiners()
            if not waiting:
                break
            time.sleep(POLL_S)
        survivors = self.members()
        # a step was in flight unless the most advanced survivor had completed its step and not yet its
        # logging/eval (its collective failed there: only that is redone); with no survivor, assume one was
        in_flight = not survivors or max(self.status(s) for s in survivors)[1]
        for s in failed:
            self.restart(s, "peer" if survivors else "checkpoint")
        flap = not dead and cause == "error"  # a collective failed and yet every worker is alive
        if flap:
            self.flaps_in_a_row += 1
            if self.flaps_in_a_row > MAX_FLAPS:
                self.escalate(max_step, t_detect, in_flight)
                return
            backoff = 0.2 * 2 ** (self.flaps_in_a_row - 1)  # seconds: let a flapping link settle
            self.log(f"collective failed with every worker alive (flap #{self.flaps_in_a_row}): "
                     f"re-forming the process group in {backoff:.1f} s")
            time.sleep(backoff)
            self.stats.flaps_survived += 1
        if dead:
            survivors = self.await_replacements(survivors, dead)
        resumed = self.form(reason="failure" if dead else ("flap" if flap else "grow"), survivors=survivors)
        if dead or flap:
            self.count_recovery(t_detect, max_step, resumed, in_flight, failure=bool(dead))

    def end_if_stopping(self, dead: set[int]) -> None:
        """A stop pending while failed slots await their replacements: the next generation would lack them
        (nothing is restarted while stopping) and train its stop step with fewer workers, a state no clean run
        has. End the run instead: the newest checkpoint stands, and --resume continues exactly from it."""
        if dead and self.stop.signum is not None:
            raise self.failed_while_stopping()

    def failed_while_stopping(self) -> RuntimeError:
        return RuntimeError(f"stopping on {self.stop.name}, a worker failed before the stop step: the newest "
                            "checkpoint stands (--resume)")

    def await_replacements(self, survivors: list[Slot], dead: set[int]) -> list[Slot]:
        """Wait until the replacements of the slots in `dead` are ready (each up to 2 x hang_timeout from its
        start), so the world (and the exact batch split) stays the same. A survivor that dies or hangs meanwhile
        is replaced too (from a peer while one is left, else from the checkpoint), added to `dead` and waited
        for. With no survivor left, nothing can run meanwhile: the replacements get `ready_timeout` (loading a
        large checkpoint may take longer than 2 x hang_timeout). Returns the survivors still alive."""
        while True:
            timeout = 2 * self.cfg.run.hang_timeout if survivors else self.ready_timeout
            for s in self.poll():  # members are the survivors here: the replacements are still joining
                dead.add(s.wid)
                self.end_if_stopping(dead)
                survivors = [m for m in survivors if m.state == "member"]
                self.restart(s, "peer" if survivors else "checkpoint")
            self.end_if_stopping(dead)
            self.check_joiners()  # a replacement that exited is restarted (its wait starts again)
            if not any(s.wid in dead and s.state == "joining" and not self.store.check([f"ready/{s.wid}"])
                       and time.monotonic() - s.started < timeout for s in self.slots):
                return [s for s in survivors if s.state == "member"]
            time.sleep(POLL_S)

    def count_recovery(self, t_detect: float, max_step: int, resumed: Resumed, in_flight: bool,
                       failure: bool) -> None:
        """The one place a recovery is counted, once the next generation has formed: the steps lost (those
        completed before the failure that are redone, and the step in flight, if any), where the state came
        from (for a failure, or a restart of everyone from the checkpoint) and, for recovery_s, the first
        detection of a failure since the last progress (failures in a row are one recovery)."""
        self.stats.lost_steps += max(max_step - resumed.step, 0) + (1 if in_flight else 0)
        if resumed.from_checkpoint:
            self.stats.recoveries_from_checkpoint += 1
        elif failure:
            self.stats.recoveries_from_peer += 1
        first = self.recovering[0] if self.recovering is not None else t_detect
        self.recovering = (first, resumed.step)

    def status(self, s: Slot) -> tuple[int, bool]:
        """The state member `s` reported at the end of the generation: (completed step, its after-step work
        done)."""
        st = json.loads(self.store.get(f"status/{self.gen}/{s.wid}"))
        return st["step"], not st["pending"]

    def form(self, reason: str, survivors: list[Slot] | None = None) -> Resumed:
        """Publish the plan of the next generation: survivors (their reported state) + ready joiners."""
        survivors = survivors if survivors is not None else []
        states = {s.wid: self.status(s) for s in survivors}
        ready = self.joiners_ready()
        for s in ready:
            states[s.wid] = (int(self.store.get(f"ready/{s.wid}")), True)  # step -1: no state of its own
        if not states:
            raise RuntimeError(self.none_ready())
        source = max(states, key=lambda w: (states[w], -w))
        if states[source][0] < 0:  # nobody holds a consistent state (all replacements, or half-synced)
            return self.restart_from_checkpoint("no worker holds a consistent state")
        members = sorted(states)
        sync = bool(ready and survivors) or len(set(states.values())) > 1
        self.gen += 1
        self.plan = Plan(gen=self.gen, members=members, source=source, step=states[source][0], sync=sync)
        for s in self.slots:
            if s.wid in states:
                s.state, s.hb_changed = "member", time.monotonic()
        self.store.add("gen_counter", self.gen - self.store.add("gen_counter", 0))  # = gen: no bump pending
        self.store.set(f"plan/{self.gen}", json.dumps({"gen": self.gen, "members": members, "source": source,
                                                       "step": self.plan.step, "sync": sync}))
        self.store.add("gen_latest", 1)  # = gen: where a process started from now on begins waiting
        self.log(f"generation {self.gen} ({reason}): workers {members}, resuming after step {self.plan.step}"
                 + (f" with the state of worker {source}" if sync else ""))
        return Resumed(step=self.plan.step, from_checkpoint=source not in {s.wid for s in survivors})

    def escalate(self, max_step: int, t_detect: float, in_flight: bool) -> None:
        """Repeated collective failures: restart every worker from the newest good checkpoint. If that already
        happened MAX_ESCALATIONS times without getting past `max_step`, the failure is not transient: give up."""
        self.escalations += 1
        self.escalation_mark = max(self.escalation_mark, max_step)
        if self.escalations > MAX_ESCALATIONS:
            raise RuntimeError(f"collectives keep failing with every worker alive after step {max_step}: "
                               f"{MAX_ESCALATIONS} restarts from the checkpoint did not get past it; check the "
                               "network between the workers (interfaces, firewall, NCCL/gloo settings)")
        resumed = self.restart_from_checkpoint(f"{self.flaps_in_a_row} collective failures in a row")
        self.flaps_in_a_row = 0
        self.count_recovery(t_detect, max_step, resumed, in_flight, failure=False)

    def restart_from_checkpoint(self, why: str) -> Resumed:
        """Kill every worker process and restart all live slots from the newest good checkpoint.

        This is the supervisor's decision, not a failure of any one slot (the failures that led here were
        counted when they happened), so it uses none of a slot's MAX_RESTARTS."""
        self.log(f"{why}: restarting every worker from the newest good checkpoint")
        for s in self.slots:
            if s.state in ("member", "joining", "failed"):
                self.kill(s)
                self.stats.restarts += 1
                self.spawn(s, "checkpoint")
        self.wait_ready(self.slots, timeout=self.ready_timeout)
        return self.form(reason="restart from checkpoint")  # counted by the caller's count_recovery

    def kept_in_checkpoint(self, step: int) -> float:
        """The worker-seconds of the kept steps 1..`step` as recorded in the checkpoint of `step` (the one the
        workers restored; 0 for step 0). Summed in the order the workers sum their history (the same floats
        first), so their total less this is the steps trained since: 0.0 exactly when there were none."""
        if step <= 0:
            return 0.0
        try:
            return sum(meta_of(self.run_dir / "checkpoints", step).get("costs") or [])
        except CheckpointError as e:
            self.log(f"cannot read the costs of the resumed steps ({e}): goodput counts them as this run's")
            return 0.0

    def log(self, msg: str) -> None:
        print(f"supervisor: {msg}", file=sys.stderr, flush=True)

    def result(self) -> dict:
        path = self.run_dir / "result.json"
        if not path.exists():
            raise RuntimeError("the run ended without a result (every worker failed); see the log above")
        res = json.loads(path.read_text())
        res["kept_worker_s"] -= self.kept_before_s  # the kept steps this invocation trained, as worker_s counts
        st = self.stats
        res.update(restarts=st.restarts, recoveries_from_peer=st.recoveries_from_peer,
                   recoveries_from_checkpoint=st.recoveries_from_checkpoint, flaps_survived=st.flaps_survived,
                   lost_steps=st.lost_steps, recovery_s=st.recovery_s,
                   max_recovery_s=max(st.recovery_s) if st.recovery_s else None,
                   worker_s=self.worker_s, goodput=res["kept_worker_s"] / self.worker_s if self.worker_s else None,
                   workers_lost=[s.wid for s in self.slots if s.state == "lost"], generations=self.gen)
        write_json(path, res)
        return res
