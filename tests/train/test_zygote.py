"""Workers forked from a zygote (train/zygote.py): what an exec'd worker would be, and an exec fallback."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from megacluster import config
from megacluster.train import zygote
from megacluster.train.supervisor import train
from megacluster.train.zygote import start_zygote

# Multi-process runs watched by the clock (hang limits, replacement waits): under pytest-xdist they run one at a
# time on one xdist worker (--dist loadgroup, pyproject.toml), beside the single-process tests on the other.
pytestmark = pytest.mark.xdist_group("supervised")

BASE = ["model.d_model=48", "model.n_layer=2", "model.n_head=4", "model.seq_len=32", "model.vocab_size=384",
        "data.max_bytes=200000", "run.batch_size=12", "run.micro_batch=12", "run.log_every=1", "run.eval_batches=1",
        "run.eval_every=0", "run.progress=false", "optim.warmup_steps=2", "run.hang_timeout=8"]


def steps_logged(run_dir):
    return sum('"loss"' in line for line in open(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0


def test_the_zygote_outlives_a_stop_signal_to_the_process_group():
    """Ctrl-C reaches every process of the foreground group: the zygote keeps SIGINT/SIGTERM blocked, so it is
    there to fork replacements while the run stops (a dead zygote would silently cost every later worker the
    seconds of its imports)."""
    z = start_zygote()
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(z.proc.pid, sig)
    time.sleep(0.5)
    assert z.proc.poll() is None and z.gone is None


def test_no_fork_from_a_process_with_threads():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert "threads after its imports" in zygote.unsafe_to_fork()
    finally:
        stop.set()
        t.join()


def test_a_zygote_killed_mid_run_hands_over_to_exec_and_the_run_stays_exact(tmp_path, capfd):
    """The OOM killer takes the zygote: its workers, which nobody could watch any more, are killed; they are
    replaced from the checkpoint by exec'd workers, and the loss digest is the uninterrupted run's."""
    base = BASE + ["run.workers=2", "run.max_steps=40", "run.ckpt_every=10", "run.chaos=slow:factor=3"]
    clean = train(config.build("tiny", None, base + [f"run.run_dir={tmp_path / 'clean'}"]))
    run_dir = tmp_path / "cut"

    forked = []

    def kill_the_zygote():
        deadline = time.time() + 120
        while time.time() < deadline:
            if steps_logged(run_dir) >= 12:
                forked.extend(json.loads((run_dir / "workers.json").read_text()).values())
                os.kill(zygote.Zygote._shared.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_zygote)
    killer.start()
    res = train(config.build("tiny", None, base + [f"run.run_dir={run_dir}"]))
    killer.join()
    err = capfd.readouterr().err
    assert "cannot fork workers (the worker zygote exited with code -9); starting them with exec" in err, err
    assert res["recoveries_from_checkpoint"] == 1 and res["restarts"] == 2 and res["steps"] == 40
    assert res["loss_digest"] == clean["loss_digest"]
    assert len(forked) == 2 and not any(os.path.exists(f"/proc/{pid}") for pid in forked)  # died with the zygote


def test_workers_of_a_closed_zygote_are_reported_killed():
    """Closing the zygote kills its workers (it does on the socket's end): a caller still holding one sees it
    killed instead of waiting forever (it used to spin at full CPU in wait)."""
    z = zygote.Zygote(zygote.base_env())
    z.live.add(7)  # a worker it forked (bookkeeping only: no such process is signalled)
    z.close()
    assert zygote.Forked(z, 7, 2 ** 22 + 1).wait() == -signal.SIGKILL and z.live == set()


def test_one_zygote_serves_runs_whose_environment_is_the_same(monkeypatch):
    """Import-time state follows the environment, so a changed one gets a new zygote; pytest's per-test name
    (PYTEST_CURRENT_TEST) changes nothing a zygote imported, and every test would otherwise pay its imports."""
    first = start_zygote()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test (call)")
    assert start_zygote() is first
    monkeypatch.setenv("MEGACLUSTER_TEST_ENV", "1")
    second = start_zygote()
    assert second is not first and first.proc.wait(timeout=30) is not None  # the old one is closed


def test_the_cli_starts_the_zygote_early_only_for_runs_that_fork(monkeypatch):
    """`megacluster train` starts the zygote before it imports torch, so both import at once; only for a run
    whose supervisor will fork its workers."""
    from megacluster.config import RunConfig

    started = []
    monkeypatch.setattr(zygote, "start_zygote", lambda: started.append(1))
    monkeypatch.setattr(zygote.os.path, "exists", lambda p: False)  # no GPU device node
    cases = [(dict(workers=2), True), (dict(workers=1, chaos="kill:rank=0,step=2"), True), (dict(workers=1), False),
             (dict(workers=2, worker_start="exec"), False), (dict(workers=2, device="cuda"), False),
             (dict(workers=2, device="cuda", worker_start="fork"), True)]
    for kw, forks in cases:
        started.clear()
        zygote.prestart(RunConfig(**kw))
        assert started == ([1] if forks else []), kw
    started.clear()
    monkeypatch.setattr(zygote.os.path, "exists", lambda p: p == "/dev/nvidiactl")  # a GPU machine: auto is exec
    zygote.prestart(RunConfig(workers=2))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: no supervisor
    zygote.prestart(RunConfig(workers=2, worker_start="fork"))
    assert started == []


def test_a_zygote_that_died_idle_is_not_handed_out_again():
    z = start_zygote()
    os.kill(z.proc.pid, signal.SIGKILL)
    z.proc.wait()
    assert start_zygote() is not z


def test_a_zygote_that_does_not_answer_is_killed_and_the_spawn_fails_over():
    """A stopped (or endlessly importing) zygote: the spawn gives up after its deadline, kills it, and says so;
    the supervisor then uses exec."""
    z = zygote.Zygote(zygote.base_env())  # not the shared one
    os.kill(z.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(zygote.ZygoteFailed, match="killed: no answer in 1 s"):
        z.spawn(zygote.base_env(), "unused", ready_timeout=1.0)
    assert time.monotonic() - t0 < 10 and z.proc.poll() is not None
    z.close()


def test_an_environment_too_large_to_send_fails_over_instead_of_hanging(tmp_path):
    """Only the differences from the zygote's environment travel, so a large environment forks as usual; a
    difference too large for a datagram is refused at once (it used to be taken for a dead zygote, and the
    supervisor waited for an answer forever)."""
    z = start_zygote()
    with pytest.raises(zygote.ZygoteFailed, match="cannot send the request"):
        z.spawn({**zygote.base_env(), "MEGACLUSTER_BIG": "x" * 1_000_000}, str(tmp_path))
    assert z.gone is None and z.proc.poll() is None  # still serving


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_a_run_started_with_stdin_and_stdout_closed(tmp_path, how):
    """A closed stream stays closed in the workers, as under exec, and nothing fails on it (an exec'd worker's
    exit used to flush sys.stdout, which is None then)."""
    args = [sys.executable, "-m", "megacluster", "train", "--workers", "2", "--max-steps", "3", "--run-dir",
            str(tmp_path / "run"), "--set", f"run.worker_start={how}", *[a for kv in BASE for a in ("--set", kv)]]
    r = subprocess.run(args, stderr=subprocess.PIPE, text=True, timeout=300,
                       preexec_fn=lambda: (os.close(0), os.close(1)))
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps on 2 worker(s)" in r.stderr and "cannot fork" not in r.stderr, r.stderr


def test_descriptors_received_on_0_to_2_are_moved_before_the_streams_are_set(tmp_path):
    """Stdin closed, and fd 0 held by a close-on-exec descriptor while the zygote starts: the zygote receives the
    worker's stdout on fd 0. It used to close that fd as "stdin stays closed" and fail in dup2 before the worker
    ran; now the worker runs (here: into a run dir without config.json, which it names on its stderr)."""
    code = ("import os, sys\n"
            "from megacluster.train.zygote import start_zygote, base_env\n"
            "os.close(0)\n"
            "hold = os.open('/dev/null', os.O_RDONLY | os.O_CLOEXEC)\n"
            "z = start_zygote()\n"
            "os.close(hold)\n"
            f"p = z.spawn(base_env(), {str(tmp_path)!r})\n"
            "print('exit code', p.wait(), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "exit code 1" in r.stderr and "config.json" in r.stderr and "Bad file descriptor" not in r.stderr, r.stderr
