"""Training through failures (issue 3), on real processes with gloo: kills, hangs, flaps, shrink, resume."""

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megacluster import config
from megacluster.errors import InputError
from megacluster.train import supervisor
from megacluster.train.elastic import NODE_LOST, Membership
from megacluster.train.supervisor import MAX_FLAPS, MAX_RESTARTS, Supervisor, train

# Multi-process runs watched by the clock (hang limits, replacement waits): under pytest-xdist they run one at a
# time on one xdist worker (--dist loadgroup, pyproject.toml), beside the single-process tests on the other.
pytestmark = pytest.mark.xdist_group("supervised")

BASE = ["model.d_model=48", "model.n_layer=2", "model.n_head=4", "model.seq_len=32", "model.vocab_size=384",
        "data.max_bytes=200000", "run.batch_size=12", "run.micro_batch=12", "run.log_every=1",
        "run.eval_batches=1", "run.eval_every=0", "run.progress=false", "optim.warmup_steps=2",
        "run.hang_timeout=8"]


def cfg(tmp_path, name, *extra):
    return config.build("tiny", None, BASE + [f"run.run_dir={tmp_path / name}", *extra])


def losses(run_dir):
    recs = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}  # a redone step: the last record wins


def test_kill_hang_flap_same_digest_as_clean_run(tmp_path, capfd):
    clean = train(cfg(tmp_path, "clean", "run.workers=2", "run.max_steps=14"))
    capfd.readouterr()
    chaos = train(cfg(tmp_path, "chaos", "run.workers=2", "run.max_steps=14",
                      "run.chaos=kill:rank=1,step=4; hang:rank=0,step=8; flap:step=11,times=3"))
    # the hang is called one after run.hang_timeout (8 s; the default is 30)
    waited = [float(x) for x in re.findall(r"worker 0 made no progress for ([0-9.]+) s: hung", capfd.readouterr().err)]
    assert len(waited) == 1 and 8 <= waited[0] < 12, waited
    assert chaos["loss_digest"] == clean["loss_digest"]
    assert chaos["steps"] == 14 and chaos["world"] == 2
    assert chaos["restarts"] == 2 and chaos["recoveries_from_peer"] == 2 and chaos["flaps_survived"] == 3
    assert chaos["recoveries_from_checkpoint"] == 0
    assert chaos["lost_steps"] == 5  # exactly the step in flight, five times
    # the three flaps in a row are one recovery, timed from the first detection: it spans the backoffs
    assert len(chaos["recovery_s"]) == 3 and chaos["max_recovery_s"] <= 10
    assert chaos["recovery_s"][2] >= 0.2 + 0.4 + 0.8
    assert 0 < chaos["goodput"] < clean["goodput"] <= 1


def test_permanent_loss_shrinks_and_matches_a_clean_smaller_run(tmp_path):
    three = train(cfg(tmp_path, "three", "run.workers=3", "run.max_steps=12", "run.ckpt_every=6",
                      "run.ckpt_keep=5", "run.chaos=kill:rank=1,step=7,permanent"))
    assert three["workers_lost"] == [1] and three["world"] == 2 and three["shares"] == [6, 6]
    # a clean 2-worker run from the same step-6 checkpoint
    shutil.copytree(tmp_path / "three" / "checkpoints" / "step_00000006",
                    tmp_path / "two" / "checkpoints" / "step_00000006")
    two = train(cfg(tmp_path, "two", "run.workers=2", "run.max_steps=12", "run.ckpt_every=6", "run.resume=true"))
    # its goodput counts the kept steps it trained (7-12), not those restored from the checkpoint
    costs = json.loads((tmp_path / "two" / "checkpoints" / "step_00000012" / "manifest.json").read_text()
                       )["meta"]["costs"]
    assert two["kept_worker_s"] == pytest.approx(sum(costs[6:]), rel=1e-9) and 0 < two["goodput"] <= 1
    a, b = losses(tmp_path / "three"), losses(tmp_path / "two")
    assert sorted(b) == list(range(7, 13))
    for s in b:
        assert a[s] == pytest.approx(b[s], rel=1e-4)
    assert two["steps"] == three["steps"] == 12


def test_one_vs_three_workers_from_scratch(tmp_path, monkeypatch):
    zygotes = []  # run.worker_start auto on CPU: the workers are forked from the zygote
    monkeypatch.setattr(supervisor, "start_zygote", lambda real=supervisor.start_zygote: zygotes.append(1) or real())
    train(cfg(tmp_path, "one", "run.max_steps=6"))
    train(cfg(tmp_path, "three", "run.workers=3", "run.max_steps=6"))
    assert zygotes == [1]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "three")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == pytest.approx(b[s], rel=1e-4) for s in a)


def test_external_sigkill_is_survived_with_at_most_one_lost_step(tmp_path):
    run_dir = tmp_path / "ext"
    # 400 steps: at ~8 ms a step on a fast CPU, 40 could end before the poll below has killed anything
    args = [sys.executable, "-m", "megacluster", "train", "--workers", "2", "--max-steps", "400", "--json",
            "--run-dir", str(run_dir)] + [a for kv in BASE for a in ("--set", kv)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way, then kill a worker from outside
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 5:
            break
        time.sleep(0.1)
    pid = json.loads((run_dir / "workers.json").read_text())["1"]
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["steps"] == 400 and res["recoveries_from_peer"] == 1 and res["lost_steps"] <= 1
    assert res["max_recovery_s"] <= 10
    assert f"worker 1 exited with code -{signal.SIGKILL.value} (SIGKILL)" in err


def test_a_worker_ended_by_a_signal_is_named_by_it():
    """Negative exit codes name their signal; SIGBUS, which a memory-mapped shard truncated under a worker
    raises, says so (the restarted worker then refuses the changed shard: exit 2)."""
    assert supervisor.describe_exit(3) == "code 3"
    assert supervisor.describe_exit(-signal.SIGTERM.value) == f"code -{signal.SIGTERM.value} (SIGTERM)"
    bus = signal.SIGBUS.value
    assert supervisor.describe_exit(-bus).startswith(f"code -{bus} (SIGBUS: a memory-mapped")
    assert supervisor.describe_exit(-200) == "code -200"  # no such signal


def test_corrupt_newest_checkpoint_falls_back_to_previous_good_one(tmp_path):
    full = train(cfg(tmp_path, "full", "run.max_steps=12", "run.ckpt_every=4"))
    for step in (4, 8):
        shutil.copytree(tmp_path / "full" / "checkpoints" / f"step_0000000{step}",
                        tmp_path / "cut" / "checkpoints" / f"step_0000000{step}")
    weights = tmp_path / "cut" / "checkpoints" / "step_00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    resumed = train(cfg(tmp_path, "cut", "run.max_steps=12", "run.ckpt_every=4", "run.resume=true"))
    assert sorted(losses(tmp_path / "cut")) == list(range(5, 13))  # resumed after step 4, not 8
    assert resumed["loss_digest"] == full["loss_digest"]


def test_whole_world_killed_recovers_from_checkpoint(tmp_path, capfd, monkeypatch):
    """A single supervised worker has no peer: its replacement resumes from the newest good checkpoint. Its
    workers are started with exec (everywhere else in the suite they are forked from the zygote, the CPU default),
    and compute what the in-process run computes."""
    clean = train(cfg(tmp_path, "clean", "run.max_steps=10", "run.ckpt_every=3"))
    capfd.readouterr()
    zygotes = []
    monkeypatch.setattr(supervisor, "start_zygote", lambda real=supervisor.start_zygote: zygotes.append(1) or real())
    res = train(cfg(tmp_path, "solo", "run.max_steps=10", "run.ckpt_every=3", "run.chaos=kill:rank=0,step=8",
                    "run.worker_start=exec"))
    assert zygotes == []  # exec: no zygote started, both workers (first and replacement) exec'd
    assert res["recoveries_from_checkpoint"] == 1 and res["recoveries_from_peer"] == 0
    # Checkpoints are written in the background, so the kill at step 8 may land while step 6's write is still in
    # flight (it did on a loaded CI machine); then the step-3 checkpoint is the newest good one.
    resumed = [int(n) for n in re.findall(r"generation 2 \(failure\): workers \[0\], resuming after step (\d+)",
                                          capfd.readouterr().err)]
    assert resumed in ([6], [3])
    assert res["lost_steps"] == 8 - resumed[0]  # the steps after that checkpoint, and step 8 (in flight)
    assert res["loss_digest"] == clean["loss_digest"]
    # one line per step: those logged after the checkpoint, before the kill, were dropped when they were redone
    logged = [json.loads(x)["step"] for x in open(tmp_path / "solo" / "metrics.jsonl") if '"loss"' in x]
    assert logged == list(range(1, 11))


def test_slow_worker_gets_a_smaller_share(tmp_path):
    res = train(cfg(tmp_path, "het", "run.workers=2", "run.max_steps=16", "run.balance=auto",
                    "run.chaos=slow:rank=0,factor=3"))
    slow, fast = res["shares"]
    assert slow + fast == 12 and slow <= 4 <= 9 <= fast  # ~1:3 split, from measured compute time


def test_torchrun_restart_resumes_exactly(tmp_path, monkeypatch):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    # torchrun gives each worker 1 thread; our supervisor splits torch's default over its workers: on a machine with
    # more than 2 cores they would differ, and CPU kernels may sum in another order with another thread count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sets = [a for kv in BASE for a in ("--set", kv)]
    clean = train(cfg(tmp_path, "clean", "run.max_steps=10", "run.ckpt_every=3", "run.workers=2"))
    args = [torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "-m", "megacluster",
            "train", "--max-steps", "10", "--run-dir", str(tmp_path / "tr"), "--chaos", "kill:rank=1,step=5",
            "--json", "--set", "run.ckpt_every=3", *sets]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-20000:]
    res = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert res["loss_digest"] == clean["loss_digest"] and res["steps"] == 10
    assert (tmp_path / "tr" / "chaos" / "kill-r1-s5.r1.fired").exists()  # the fault did fire: torchrun restarted
    logged = [json.loads(x)["step"] for x in open(tmp_path / "tr" / "metrics.jsonl") if '"loss"' in x]
    assert logged == list(range(1, 11))  # once each: the steps logged before the kill, redone, were dropped

    # two nodes that share no disk (each its own run dir; only rank 0, on node 0, writes checkpoints). Rank 1 is
    # killed in step 7; torchrun restarts both; node 1 finds no checkpoint and takes rank 0's restored step 6
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logs = [(open(tmp_path / f"node{n}.out", "w+"), open(tmp_path / f"node{n}.err", "w+")) for n in (0, 1)]
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                               "--max-restarts", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "megacluster", "train", "--max-steps", "10", "--chaos", "kill:rank=1,step=7",
                               "--run-dir", str(tmp_path / f"node{n}"), "--json", "--set", "run.ckpt_every=3", *sets],
                              stdout=logs[n][0], stderr=logs[n][1]) for n in (0, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    out, err, err1 = ((tmp_path / f).read_text() for f in ("node0.out", "node0.err", "node1.err"))
    assert codes == [0, 0], err[-10000:] + err1[-10000:]
    assert "the ranks restored different steps [6, 0]" in err, err
    assert not list((tmp_path / "node1").glob("checkpoints/step_*"))  # node 1 never had one
    res = json.loads(out.splitlines()[-1])
    assert res["loss_digest"] == clean["loss_digest"] and res["steps"] == 10


def test_slow_replacement_shrinks_then_grows_back(tmp_path):
    """A node that takes 8 s to come back: the run goes on with 2 workers, then the third rejoins.

    The supervisor waits 2 x hang_timeout = 6 s for the replacement, so it forms [0, 2] first; the replacement
    rejoins ~8 s after the kill. The run has steps to spare (the time a step takes varies by machine); it is
    stopped with SIGTERM once a few steps ran with all 3 workers again. The LR schedule is constant, so the steps
    done are the same as a clean run's of that many steps."""
    def grown_back(run_dir):  # worlds logged: 3, then 2, then 3 for a few steps
        path = run_dir / "metrics.jsonl"
        worlds = [json.loads(x).get("world") for x in open(path) if '"loss"' in x] if path.exists() else []
        return 2 in worlds and worlds[worlds.index(2):].count(3) >= 3

    extra = [a for kv in ("run.hang_timeout=3", "optim.schedule=constant", "run.ckpt_every=0") for a in ("--set", kv)]
    code, res, err = _stop_midway(tmp_path, "grow", lambda proc: os.kill(proc.pid, signal.SIGTERM), grown_back,
                                  "--workers", "3", "--chaos", "slow:factor=6; kill:rank=1,step=5,down=8", *extra,
                                  steps=100000)
    assert code == 128 + signal.SIGTERM, err
    assert "(failure): workers [0, 2]" in err, err
    assert "(grow): workers [0, 1, 2]" in err, err
    assert res["world"] == 3 and res["workers_lost"] == [] and res["stopped"] == "SIGTERM"
    # the reference: one in-process worker, not slowed (the world size and the slowdown change no loss beyond
    # the summation order: compared to rel 1e-4)
    train(cfg(tmp_path, "clean", f"run.max_steps={res['steps']}", "optim.schedule=constant"))
    a, b = losses(tmp_path / "grow"), losses(tmp_path / "clean")
    assert sorted(a) == sorted(b) == list(range(1, res["steps"] + 1))
    assert all(a[s] == pytest.approx(b[s], rel=1e-4) for s in a)


def test_a_slot_out_of_restarts_is_dropped_and_the_run_matches_a_clean_one(tmp_path):
    """Worker 1 dies four times: three restarts, then the slot is given up and worker 0 trains alone on the same
    global batch (the sample order and the loss normalisation do not depend on the world size)."""
    train(cfg(tmp_path, "clean", "run.max_steps=10"))  # one in-process worker: the same losses to rel 1e-4
    kills = "; ".join(f"kill:rank=1,step={s}" for s in (3, 4, 5, 6))
    res = train(cfg(tmp_path, "flaky", "run.workers=2", "run.max_steps=10", f"run.chaos={kills}"))
    assert res["restarts"] == MAX_RESTARTS and res["workers_lost"] == [1] and res["world"] == 1
    assert res["steps"] == 10 and res["recoveries_from_peer"] == MAX_RESTARTS + 1
    a, b = losses(tmp_path / "clean"), losses(tmp_path / "flaky")
    assert sorted(b) == list(range(1, 11))
    assert all(a[s] == pytest.approx(b[s], rel=1e-4) for s in a)


def test_restart_is_the_one_place_that_gives_a_slot_up(tmp_path, monkeypatch):
    from megacluster.data import Corpus

    corpus = Corpus(train=[], val=[], vocab_size=384, directory=tmp_path, tokenizer_path=tmp_path / "tok.json")
    sup = Supervisor(cfg(tmp_path, "decide", "run.workers=2"), corpus, "cpu")
    started = []
    monkeypatch.setattr(sup, "spawn", lambda s, init: started.append((s.wid, init)))  # no real processes here
    flaky, gone = sup.slots
    assert all(sup.restart(flaky, "peer") for _ in range(MAX_RESTARTS))
    assert not sup.restart(flaky, "peer") and flaky.state == "lost"
    assert not sup.restart(gone, "checkpoint", exit_code=NODE_LOST) and gone.state == "lost"
    assert started == [(0, "peer")] * MAX_RESTARTS and sup.stats.restarts == MAX_RESTARTS


def test_waiting_blocks_nest():
    """The beat thread heartbeats while `_waiting_step` is set: an inner block must not end the outer one's."""
    m = Membership(store=None, wid=0, pg_timeout_s=30.0)  # no beat thread, no store: the bookkeeping only
    with m.waiting(3):
        with m.waiting(4):
            assert m._waiting_step == 4
        assert m._waiting_step == 3
    assert m._waiting_step is None


@pytest.fixture(scope="module")
def clean_digests(tmp_path_factory):
    """The loss digest of an uninterrupted run per worker count and steps (each computed once per module)."""
    cache = {}

    def digest(workers, steps=120):
        if (workers, steps) not in cache:
            run_dir = tmp_path_factory.mktemp(f"clean{workers}-{steps}")
            cache[workers, steps] = train(config.build("tiny", None, BASE + [
                f"run.run_dir={run_dir}", f"run.max_steps={steps}", f"run.workers={workers}"]))["loss_digest"]
        return cache[workers, steps]
    return digest


def _stop_midway(tmp_path, name, send, started, *extra, steps=120):
    """Start `megacluster train` in its own session, `send(proc)` a signal once `started(run_dir)`; returns
    (exit code, result, stderr). The process group is killed if the run does not end."""
    run_dir = tmp_path / name
    args = [sys.executable, "-m", "megacluster", "train", "--max-steps", str(steps), "--json", "--run-dir",
            str(run_dir), *[a for kv in BASE for a in ("--set", kv)], *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not started(run_dir):
            time.sleep(0.02)
        send(proc)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


def _steps_logged(n):
    return lambda run_dir: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= n


def _workers_started(run_dir):  # before the first generation forms: the workers are still starting up
    return (run_dir / "workers.json").exists()


def _pid(run_dir, wid):
    path = run_dir / "workers.json"
    return json.loads(path.read_text()).get(str(wid)) if path.exists() else None


def _replaced(wid):
    """Started: worker `wid`'s first process has been replaced (workers.json names another process)."""
    first = []

    def started(run_dir):
        pid = _pid(run_dir, wid)
        if not first:
            first.extend([pid] if pid is not None else [])
            return False
        return pid != first[0]
    return started


def _sigkill_worker(wid):
    return lambda proc: os.kill(_pid(Path(proc.args[proc.args.index("--run-dir") + 1]), wid), signal.SIGKILL)


def _to_supervisor_then_workers(sig):
    """As Slurm + an agent: the supervisor first, every worker 50 ms later (two deliveries to some of them)."""
    def send(proc):
        os.kill(proc.pid, sig)
        time.sleep(0.05)
        for pid in json.loads((Path(proc.args[proc.args.index("--run-dir") + 1]) / "workers.json").read_text()
                              ).values():
            with contextlib.suppress(ProcessLookupError):  # it may have stopped and been reaped within 50 ms
                os.kill(pid, sig)
                os.kill(pid, sig)  # the scheduler's copy and the forwarded one: one request, not "again"
    return send


@pytest.mark.parametrize("workers, sig, how, started", [
    ("1", signal.SIGTERM, "process", _steps_logged(5)),  # a scheduler's preemption of a single process
    ("2", signal.SIGTERM, "process", _steps_logged(5)),  # only the supervisor is told (a container's PID 1)
    ("2", signal.SIGINT, "group", _steps_logged(5)),  # Ctrl-C: the supervisor and every worker get it
    ("2", signal.SIGTERM, "process", _workers_started),  # before the first generation has formed
    ("2", signal.SIGINT, "group", _workers_started),  # Ctrl-C while the workers are still starting Python
    ("2", signal.SIGTERM, "twice", _steps_logged(5)),  # supervisor, then each worker twice, 50 ms later
])
def test_a_signal_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(tmp_path, workers, sig, how,
                                                                               started, clean_digests):
    send = {"process": lambda proc: os.kill(proc.pid, sig), "group": lambda proc: os.killpg(proc.pid, sig),
            "twice": _to_supervisor_then_workers(sig)}[how]
    code, res, err = _stop_midway(tmp_path, "cut", send, started, "--workers", workers)
    assert code == 128 + sig.value, err
    assert res["stopped"] == sig.name and 1 <= res["steps"] < 120
    assert f"stopped by {sig.name} after step {res['steps']}" in err
    assert (tmp_path / "cut" / "checkpoints" / f"step_{res['steps']:08d}").is_dir()  # the stop step itself
    resumed = train(cfg(tmp_path, "cut", f"run.workers={workers}", "run.max_steps=120", "run.resume=true"))
    assert resumed["loss_digest"] == clean_digests(workers) and resumed["stopped"] is None


@pytest.mark.parametrize("workers, victim", [(3, 2), (2, 0)])
def test_a_worker_dying_while_a_replacement_is_awaited_is_replaced_and_awaited_too(tmp_path, workers, victim,
                                                                                   clean_digests):
    """Worker 1 dies at step 4 and its replacement stays down 2 s; meanwhile worker `victim` is SIGKILLed too.
    Its replacement is awaited as well, so the world stays whole: with a survivor left (3 workers) it receives
    the survivor's state; with none (2 workers) it loads the checkpoint (none here: step 0), the other
    replacement receives that, and the recovery is counted once."""
    code, res, err = _stop_midway(tmp_path, "twice", _sigkill_worker(victim), _replaced(1), "--workers",
                                  str(workers), "--chaos", "kill:rank=1,step=4,down=2", steps=12)
    assert code == 0, err
    assert "(failure)" in err and "generation 3" not in err, err  # one re-formation, with every worker
    if workers == 3:
        assert "generation 2 (failure): workers [0, 1, 2], resuming after step 3 with the state of worker 0" in err
        assert (res["recoveries_from_peer"], res["recoveries_from_checkpoint"], res["lost_steps"]) == (1, 0, 1)
    else:
        assert "generation 2 (failure): workers [0, 1], resuming after step 0 with the state of worker 0" in err
        assert (res["recoveries_from_peer"], res["recoveries_from_checkpoint"], res["lost_steps"]) == (0, 1, 4)
    assert res["restarts"] == 2 and res["world"] == workers and res["steps"] == 12
    assert res["loss_digest"] == clean_digests(workers, 12)


def test_a_worker_failing_while_a_stop_is_pending_ends_the_run_and_resume_is_exact(tmp_path, clean_digests):
    """SIGTERM while the supervisor waits for the survivor's report (it is slow in step 4) after worker 1 died in
    step 4: no replacement is started while stopping, so the run ends with an error instead of training the stop
    step with one worker; the step-3 checkpoint stands and --resume gives the clean run's digest."""
    fired = lambda run_dir: (run_dir / "chaos" / "kill-r1-s4.r1.fired").exists()  # noqa: E731

    def send(proc):
        time.sleep(0.3)  # the supervisor has seen worker 1 exit and waits for worker 0's report
        os.kill(proc.pid, signal.SIGTERM)
    code, res, err = _stop_midway(tmp_path, "cut", send, fired, "--workers", "2", "--set", "run.ckpt_every=3",
                                  "--chaos", "kill:rank=1,step=4; slow:rank=0,step=4,factor=1000", steps=12)
    assert code == 1 and res is None, err
    assert "stopping on SIGTERM, a worker failed before the stop step: the newest checkpoint stands" in err, err
    assert "cannot come back" not in err and "generation 2" not in err, err
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "step_00000003").is_dir() and not (ckpts / "step_00000004").exists()  # no stop step trained
    resumed = train(cfg(tmp_path, "cut", "run.workers=2", "run.max_steps=12", "run.ckpt_every=3", "run.resume=true"))
    assert resumed["loss_digest"] == clean_digests(2, 12) and resumed["steps"] == 12


def test_a_worker_killed_during_the_evaluation_loses_no_step(tmp_path):
    """Killed while the workers evaluate after step 5 (a long evaluation: many validation batches), step 5 is
    kept; only its logging and evaluation are redone."""
    code, res, err = _kill_during_the_step_5_evaluation(tmp_path, "eval", 1)
    assert code == 0, err
    assert "generation 2 (failure): workers [0, 1], resuming after step 5 with the state of worker 0" in err, err
    assert res["lost_steps"] == 0 and res["recoveries_from_peer"] == 1 and res["steps"] == 6
    evals = [json.loads(line)["step"] for line in open(tmp_path / "eval" / "metrics.jsonl") if "val_loss" in line]
    assert evals == [5, 6]  # step 5's evaluation done once, after the recovery
    logged = [json.loads(line)["step"] for line in open(tmp_path / "eval" / "metrics.jsonl") if '"loss"' in line]
    assert logged == [1, 2, 3, 4, 5, 6]  # rank 0 survived, kept its log and redid step 5's record: once in the file


def _kill_during_the_step_5_evaluation(tmp_path, name, wid):
    def step_5_logged(run_dir):  # rank 0 writes the step's record, then evaluates
        return (run_dir / "metrics.jsonl").exists() and 5 in losses(run_dir)

    return _stop_midway(tmp_path, name, _sigkill_worker(wid), step_5_logged, "--workers", "2",
                        *[a for kv in ("run.eval_every=5", "run.eval_batches=1000", "run.micro_batch=2",
                                       "data.val_fraction=0.5") for a in ("--set", kv)], steps=6)


def test_a_replacement_that_redoes_the_logging_logs_the_transferred_grad_norm(tmp_path):
    """Worker 0 (rank 0, which logs) killed during step 5's evaluation: its replacement redoes step 5's record
    from worker 1's state (the killed worker's record of it dropped: one line a step), and the gradient norm in it
    is that step's, not the replacement's initial 0.0."""
    code, res, err = _kill_during_the_step_5_evaluation(tmp_path, "eval0", 0)
    assert code == 0, err
    assert "resuming after step 5 with the state of worker 1" in err, err
    records = [json.loads(line) for line in open(tmp_path / "eval0" / "metrics.jsonl") if '"grad_norm"' in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["grad_norm"] > 0 and records[4]["grad_norm"] != records[3]["grad_norm"], records


def test_a_link_that_keeps_flapping_escalates_to_the_checkpoint_then_gives_up(tmp_path, monkeypatch):
    """Four breaks in a row at step 6: three re-forms, then a restart of everyone from the step-3 checkpoint,
    and the run still equals a clean one. A link that never recovers ends the run with an error that says so
    (here after one full restart that replays steps 4-5 and breaks at 6 again, to keep the test short)."""
    base = ["run.workers=2", "run.max_steps=9", "run.ckpt_every=3"]
    clean = train(cfg(tmp_path, "clean", *base))
    res = train(cfg(tmp_path, "flappy", *base, "run.chaos=flap:step=6,times=4"))
    assert res["flaps_survived"] == MAX_FLAPS and res["recoveries_from_checkpoint"] == 1
    assert res["loss_digest"] == clean["loss_digest"] and res["steps"] == 9
    assert res["lost_steps"] == MAX_FLAPS + (5 - 3) + 1  # step 6 each time; then steps 4-5 and 6 again
    assert len(res["recovery_s"]) == 1 and res["recoveries_from_peer"] == 0
    monkeypatch.setattr(supervisor, "MAX_ESCALATIONS", 1)
    with pytest.raises(RuntimeError, match="1 restarts from the checkpoint did not get past it"):
        train(cfg(tmp_path, "broken", *base, "run.chaos=flap:step=6,times=1000"))


def test_workers_still_starting_when_the_wait_ends_are_named_not_blamed_on_errors(tmp_path, monkeypatch):
    """A machine too busy to start the workers in ready_timeout: the error says they were still starting (under
    memory pressure a suite once waited 120 s here and said "see the worker errors above", with none above)."""
    monkeypatch.setattr(Supervisor, "ready_timeout", property(lambda self: 0.001))  # no worker is ready so soon
    with pytest.raises(RuntimeError, match=re.escape("no worker became ready within 0.001 s")) as e:
        train(cfg(tmp_path, "busy", "run.workers=2", "run.max_steps=2"))
    assert "worker(s) [0, 1] were still starting" in str(e.value)
    pids = json.loads((tmp_path / "busy" / "workers.json").read_text())
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids.values())  # none left behind


def _text_corpus(directory, files=4, lines=300):
    directory.mkdir()
    for i in range(files):
        (directory / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * lines)
    return directory


def test_workers_read_the_supervisors_corpus_even_if_an_input_changes(tmp_path):
    """An input edited while the workers start (or before a replacement starts) must not give them another
    corpus and tokenizer than the supervisor's: they open the corpus it prepared instead of preparing again."""
    import threading

    corpus = _text_corpus(tmp_path / "src")
    c = cfg(tmp_path, "run", "run.workers=2", "run.max_steps=3", f"data.cache_dir={tmp_path / 'cache'}")
    c.data.paths = [str(corpus)]

    def edit_when_workers_start():
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "run" / "workers.json").exists():
            time.sleep(0.01)
        (corpus / "f3.py").write_text("class Other:\n    pass\n" * 500)

    editor = threading.Thread(target=edit_when_workers_start)
    editor.start()
    result = train(c)
    editor.join()
    assert result["steps"] == 3
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 1  # nobody prepared the edited inputs
    assert "text" in json.loads((tmp_path / "run" / "corpus.json").read_text())  # what they opened (a file: an
    # environment string holds 128 KiB, less than thousands of shard paths)


def test_a_shard_changed_under_the_workers_ends_the_run_without_restarts(tmp_path, capfd):
    """A worker refused its input (InputError) exits 2 and the supervisor ends the run (exit 2) at once: a
    replacement would be refused the same input."""
    import threading

    import numpy as np

    shard = tmp_path / "tokens.npy"
    np.save(shard, np.arange(20000, dtype=np.uint16) % 384)
    c = cfg(tmp_path, "run", "run.workers=2", "run.max_steps=3")
    c.data.paths = [str(shard)]

    def rewrite_when_workers_start():
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "run" / "workers.json").exists():
            time.sleep(0.01)
        np.save(shard, np.arange(30000, dtype=np.uint16) % 384)

    editor = threading.Thread(target=rewrite_when_workers_start)
    editor.start()
    try:
        with pytest.raises(InputError, match="refused its input"):
            train(c)
    finally:
        editor.join()
    err = capfd.readouterr().err
    assert "token shard changed" in err and "Traceback" not in err and "exited with code" not in err


def test_a_split_too_short_is_refused_before_any_worker_starts(tmp_path):
    corpus = _text_corpus(tmp_path / "src", files=1, lines=40)
    c = cfg(tmp_path, "run", "run.workers=2", "run.max_steps=3", "model.seq_len=128", "data.val_fraction=0.02")
    c.data.paths = [str(corpus)]
    with pytest.raises(InputError, match="the validation split has .* tokens, too few .*model.seq_len=128"):
        train(c)
    assert not (tmp_path / "run" / "workers.json").exists()


def test_resume_after_an_input_changed_the_tokenizer_is_refused(tmp_path):
    corpus = _text_corpus(tmp_path / "src")
    c = cfg(tmp_path, "run", "run.max_steps=2")
    c.data.paths = [str(corpus)]
    first = train(c)
    c.run.max_steps, c.run.resume = 4, True
    (corpus / "f3.py").write_text("class Other:\n    pass\n" * 500)
    with pytest.raises(InputError, match="--resume: the tokenizer built from --data now differs"):
        train(c)
    (corpus / "f3.py").write_text("def f3(x):\n    return x * 3 + 1\n" * 300)  # the same text again: resumes
    assert train(c)["steps"] == 4 and first["steps"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_checkpoint_that_cannot_be_written_ends_the_run_in_one_line(tmp_path, workers):
    """A full disk, made real with a file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG; Python
    ignores SIGXFSZ): one line naming the checkpoint, exit 1, and with a supervisor no restarts (a replacement
    would fail the same way)."""
    import resource

    from megacluster.data import prepare
    from megacluster.model import GPT

    c = cfg(tmp_path, "run")
    prepare(c.data, c.model.vocab_size)  # the corpus cache is written here, without the limit
    limit = 2 * sum(p.numel() for p in GPT(c.model).parameters())  # half the fp32 weights file
    args = [sys.executable, "-m", "megacluster", "train", "--run-dir", str(tmp_path / "run"), "--max-steps", "6",
            "--workers", str(workers), *[a for kv in BASE + ["run.ckpt_every=2"] for a in ("--set", kv)]]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "exited with code" not in r.stderr, r.stderr
    assert re.search(r"writing \S*step_00000002 failed \(.*\); the checkpoints already there are untouched", r.stderr)
    if workers > 1:
        assert "could not write or read a checkpoint" in r.stderr and "generation 2" not in r.stderr, r.stderr


DIVERGE = ["run.ckpt_every=1", "optim.lr=1e6", "optim.warmup_steps=0", "optim.grad_clip=0"]  # nan by step 2


def test_a_diverged_run_ends_in_one_line_and_keeps_only_finite_checkpoints(tmp_path):
    """A loss or gradient norm gone nan: the run ends naming the step, without a traceback (it used to crash
    writing nan into the checkpoint's JSON), and the checkpoints written before it are complete and finite.
    Supervised, the run ends at once: a restart would replay the same steps to the same nan."""
    from safetensors.torch import load_file

    with pytest.raises(RuntimeError, match=r"training diverged: (loss|gradient norm) nan at step 2\. The check"):
        train(cfg(tmp_path, "one", "run.max_steps=6", *DIVERGE))
    args = [sys.executable, "-m", "megacluster", "train", "--run-dir", str(tmp_path / "two"), "--max-steps", "6",
            "--workers", "2", *[a for kv in BASE + DIVERGE for a in ("--set", kv)]]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "failed: worker 0: training diverged" in r.stderr or "failed: worker 1: training diverged" in r.stderr
    assert "at step 2" in r.stderr and "generation 2" not in r.stderr and "exited with code" not in r.stderr
    for run in ("one", "two"):
        (ckpt,) = (tmp_path / run / "checkpoints").iterdir()  # step 1's, written in full
        assert ckpt.name == "step_00000001"
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values())


def test_resume_refuses_a_checkpoints_path_that_is_a_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(InputError, match="checkpoints is not a directory of checkpoints"):
        train(cfg(tmp_path, "run", "run.resume=true", "run.max_steps=2"))


def test_stragglers_and_shares_are_reported_by_worker_id_after_a_shrink(tmp_path):
    """The balancer counts ranks; after worker 0 is gone, rank 1 is worker 2, and that is the name to report."""
    res = train(cfg(tmp_path, "shrunk", "run.workers=3", "run.max_steps=20", "run.balance=auto",
                    "run.chaos=kill:rank=0,step=2,permanent; slow:rank=2,step=8,factor=4"))
    assert res["workers_lost"] == [0] and res["workers"] == [1, 2] and res["stragglers"] == [2]
    last = [json.loads(x) for x in open(tmp_path / "shrunk" / "metrics.jsonl") if '"shares"' in x][-1]
    assert last["workers"] == [1, 2] and last["stragglers"] == [2] and last["shares"][1] < last["shares"][0]


def test_long_evaluations_and_slow_checkpoint_writes_are_not_hangs(tmp_path):
    """Each evaluation (tens of batches, each made to take 30 ms more) and each wait for the previous checkpoint
    write (a disk made slow: every write sleeps 1.5 s) lasts longer than run.hang_timeout = 1 s, but the worker
    shows progress throughout: nobody is killed. The slowness is injected by a sitecustomize in the workers, which
    are exec'd (a zygote for this environment would cost its imports twice: for the shim, and after it)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    marks = tmp_path / "marks"  # one line per slowed call, so the test knows the shim took effect
    (shim / "sitecustomize.py").write_text(
        "import os, time, torch\n"
        "from megacluster import model\n"
        "from megacluster.train import checkpoint\n"
        "_write, _forward = checkpoint.CheckpointManager._write, model.GPT.forward\n"
        "def mark(what):\n"
        f"    with open({str(marks)!r}, 'a') as f:\n"
        "        f.write(f'{what} {os.getpid()}\\n')\n"
        "def slow_write(self, *a, **k):\n"
        "    mark('write')\n"
        "    time.sleep(1.5)\n"
        "    return _write(self, *a, **k)\n"
        "def slow_eval(self, *a, **k):\n"
        "    if not torch.is_grad_enabled():\n"
        "        mark('eval')\n"
        "        time.sleep(0.03)\n"
        "    return _forward(self, *a, **k)\n"
        "checkpoint.CheckpointManager._write, model.GPT.forward = slow_write, slow_eval\n")
    c = cfg(tmp_path, "slow", "run.workers=2", "run.max_steps=4", "run.hang_timeout=1", "run.eval_every=2",
            "run.ckpt_every=1", "run.ckpt_keep=10", "data.val_fraction=0.5", "run.eval_batches=1000",
            "run.worker_start=exec")
    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), str(Path(__file__).resolve().parents[2]), env])
    try:
        t0 = time.monotonic()
        res = train(c)
    finally:
        os.environ["PYTHONPATH"] = env
    assert res["restarts"] == 0 and res["steps"] == 4, res
    assert sorted(p.name for p in (tmp_path / "slow" / "checkpoints").iterdir()) == [
        f"step_0000000{s}" for s in range(1, 5)]
    assert time.monotonic() - t0 > 4 * 1.5  # the slow writes did happen (each save waits for the one before)
    calls = [line.split() for line in marks.read_text().splitlines()]
    assert [what for what, _ in calls].count("write") == 4  # rank 0's four saves
    evals = collections.Counter(pid for what, pid in calls if what == "eval")  # batches per worker process
    assert len(evals) == 2 and all(n * 0.03 > 2 * 1.0 for n in evals.values())  # two evaluations, each > 1 s


def test_a_replacement_rank_0_knows_the_checkpoints_the_resume_rejected(tmp_path):
    """Resumed past a corrupt step 6 (from 4, keep=2), then rank 0 is killed: its replacement takes its state from
    worker 1, with the steps worker 1's loader rejected, so its saves keep 4, the one good older checkpoint."""
    keys = ["run.workers=2", "run.ckpt_every=4", "run.ckpt_keep=2"]
    train(cfg(tmp_path, "r", *keys, "run.max_steps=6", "run.ckpt_every=2"))
    ckpts = tmp_path / "r" / "checkpoints"
    model = ckpts / "step_00000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    res = train(cfg(tmp_path, "r", *keys, "run.max_steps=8", "run.resume=true", "run.chaos=kill:rank=0,step=7"))
    assert res["recoveries_from_peer"] == 1 and res["steps"] == 8
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]


def test_a_torchrun_restart_refuses_shards_changed_since_its_checkpoint(tmp_path):
    from megacluster.data import prepare
    from megacluster.train.supervisor import check_data

    shard = tmp_path / "a.npy"
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 300)
    run = cfg(tmp_path, "r", f"data.paths=['{shard}']", "run.max_steps=2", "run.ckpt_every=2", "run.resume=true")
    train(run)
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 200)  # the same size
    corpus = prepare(run.data, run.model.vocab_size)
    check_data(run, corpus)  # a user's --resume may give other shards
    with pytest.raises(InputError, match="a token shard changed since the checkpoint this torchrun restart"):
        check_data(run, corpus, restarted=True)


SIGNAL_AT = """
import os, signal, sys, time
from megacluster import cli, data, files
from megacluster.train import loop
def signalled(real, sigs):
    def stage(*a, **k):
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM, signal.SIGINT}})
        for s in sigs:  # delivered together on unblocking: a burst (Ctrl-C, then torchrun's SIGINT and SIGTERM)
            os.kill(os.getpid(), getattr(signal, s))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGTERM, signal.SIGINT}})
        time.sleep(1.5)  # past signals.REPEAT_S: a handler that only records it lets this end
        return real(*a, **k)
    return stage
where, sigs = {where!r}, {sigs!r}
if where == "tokenizing":
    data._build = signalled(data._build, sigs)
elif where == "building":  # Worker(...) is built right after init_place, once the run dir's files are written
    loop.init_place = signalled(loop.init_place, sigs)
else:  # "result": the finished run's result.json
    loop.write_json = signalled(loop.write_json, sigs)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where, sigs", [("tokenizing", ["SIGTERM"]), ("tokenizing", ["SIGINT"]),
                                         ("tokenizing", ["SIGINT", "SIGTERM", "SIGTERM"]), ("building", ["SIGTERM"])])
def test_a_signal_before_the_first_step_stops_at_once_and_leaves_no_dir_it_made(tmp_path, where, sigs):
    """A SIGTERM while the text is tokenized (or torch imported, the model built) ended the process with no word
    (143) and left the run dir it had made, with its lock. Now: one line, 128 + N, and the run dir and the half-built
    cache entry are removed again (train/signals.py `outside_steps`), also after a burst of signals (a second one
    raised again inside the cleanup, leaving the entry's lock) and once the run dir holds config.json (a review)."""
    _write_text(tmp_path / "a.txt")
    run, cache = tmp_path / "new" / "run", tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT.format(where=where, sigs=sigs), "train", "--run-dir", str(run),
                        "--data", str(tmp_path / "a.txt"), "--set", f"data.cache_dir={cache}", "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120)
    sig = min(sigs, key=lambda s: signal.Signals[s].value)  # of signals pending together, the lowest number runs first
    assert r.returncode == 128 + signal.Signals[sig].value, r.stderr
    assert f"megacluster train: {sig} before the first step or after the last: stopped at once" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))
    if where == "tokenizing":
        assert not list(cache.glob("*/*")), list(cache.rglob("*"))  # no cache entry left (its parent may stay)


def test_a_signal_while_a_finished_run_writes_its_result_is_recorded_not_a_stop(tmp_path):
    """The result.json of a one-process run was written under the start's handler: a SIGTERM there ended a finished
    run with 143, "stopped at once", and no result.json (a review). Now the worker's handler records it."""
    _write_text(tmp_path / "a.txt")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT.format(where="result", sigs=["SIGTERM"]), "train",
                        "--run-dir", str(run), "--data", str(tmp_path / "a.txt"), "--set",
                        f"data.cache_dir={tmp_path / 'cache'}", "--max-steps", "2", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["steps"] == 2 and result["stopped"] is None
    assert json.loads((run / "result.json").read_text()) == result


BUILD_THEN_STOP = """
import os, signal, sys, time
from pathlib import Path
from megacluster import config, data
from megacluster.train.signals import StoppedAtOnce, outside_steps
here = Path(sys.argv[1])
def build(*a, **k):  # the builder: holds the entry's lock until the test lets it go, then is stopped
    (here / "building").touch()
    while not (here / "go").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
if sys.argv[2] == "builder":
    data._build = build
cfg = config.build("tiny", None, [f"data.paths=['{here / 'a.txt'}']", f"data.cache_dir={here / 'cache'}"])
try:
    with outside_steps():
        corpus = data.prepare(cfg.data, cfg.model.vocab_size)
except StoppedAtOnce:
    sys.exit(143)
print(len(corpus.train))
"""


def test_a_run_waiting_on_a_cache_entry_whose_builder_is_stopped_builds_it_itself(tmp_path):
    """The builder stopped by a signal removes the entry it made, lock included: the run that waited on that lock
    then wrote into a directory that was gone (exit 1, a review); now it sees its lock file gone, and builds."""
    _write_text(tmp_path / "a.txt")
    cmd = [sys.executable, "-c", BUILD_THEN_STOP, str(tmp_path)]
    builder = subprocess.Popen([*cmd, "builder"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (tmp_path / "building").exists(), 60)
        waiter = subprocess.Popen([*cmd, "waiter"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _blocked_on_a_lock(waiter.pid), 60)
        (tmp_path / "go").touch()
        assert builder.wait(timeout=60) == 143, builder.stderr.read()
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0 and int(out.strip()) > 0, err
    finally:
        for proc in (builder, locals().get("waiter")):
            if proc is not None and proc.poll() is None:
                proc.kill()


def _write_text(path: Path) -> None:
    """Enough text for the tiny preset's two splits (a validation sequence of 129 tokens)."""
    path.write_text("\n".join(f"line {i}: the {i % 7} quick {i % 11} foxes jump over {i % 13} dogs" for i in range(3000)))


def _wait_for(ready, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether `pid` waits in flock(2): /proc/locks lists a blocked request as "N: -> FLOCK ... pid"."""
    rows = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    return any(len(f) > 5 and f[1] == "->" and f[2] == "FLOCK" and f[5] == str(pid) for f in rows)
