"""Start workers in milliseconds: fork them from a process that has already imported torch and the trainer.

A worker started with exec spends seconds importing before it does anything: torch, then torch._dynamo, which
torch.optim imports on its first call (6.5 s of CPU on a 2-core test machine, 2-3 s on a fast one). A replacement
for a failed worker takes that long while the survivors wait for it. The zygote pays for the imports once and forks
every worker from there: a replacement starts at once (a killed worker's recovery went from 4.9 s to 0.22 s on the
2-core machine), and the workers share the imported pages copy-on-write.

A forked worker is what an exec'd one would be: it gets the supervisor's environment, working directory and standard
streams of the moment it is asked for (the three descriptors travel with the request), and the same exit codes
(a signal's as -N). What it does not get afresh is import-time state, so one zygote serves every run of a process
whose environment is the same (`shared`), and a changed environment gets a new one.

Fork is safe only from a process with one thread that has not touched a GPU: the zygote never computes, checks that
it runs one thread (/proc/self/task) and has not initialised CUDA, and says so and exits otherwise; the supervisor
then starts workers with exec. `run.worker_start` chooses; auto forks for CPU runs (with CUDA and Triton imported in
the parent, fork is not yet measured on a GPU).

Protocol (`Zygote` in the supervisor, `serve` in the zygote; one JSON message per datagram of a SOCK_SEQPACKET
socket pair):
    first, after the imports        <- {"ready": true} | {"error": "why not"} (and the zygote exits)
    -> {"op": "spawn", "env": {...}, "cwd": "...", "run_dir": "..."} + fds 0, 1, 2     <- {"pid": 1234}
    -> {"op": "kill", "pid": 1234, "sig": 9}   (the zygote signals only a child it has not reaped: never a reused pid)
                                                                     <- {"exited": 1234, "code": -9} (as Popen's)
At the end of the socket (the supervisor's process closed it, or died) the zygote SIGKILLs its children and exits.
It starts with SIGTERM/SIGINT blocked (the supervisor's spawn mask) and keeps them so: a Ctrl-C to the process
group is for the supervisor and the workers. A child unblocks them once its handlers are set (worker.py), as an
exec'd worker does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RunConfig

PRELOAD = ("torch", "torch._dynamo", "safetensors.torch", "megacluster.train.worker", "megacluster.train.loop",
           "megacluster.train.elastic", "megacluster.data")
MAX_MSG = 1 << 22  # bytes: a datagram (the spawn request holds the whole environment)


def fork_supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "fork")


def under_launcher() -> bool:
    """Started by torchrun (or a launcher like it): this process is a worker, there is no supervisor."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def base_env() -> dict[str, str]:
    """This process's environment less a launcher's rank variables (a worker's own come from the supervisor)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def start_zygote() -> Zygote:
    """This process's zygote for its environment. A new one starts with SIGTERM/SIGINT blocked, and keeps them so."""
    from .signals import SIGNALS

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return Zygote.shared(base_env())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def prestart(run: RunConfig) -> None:
    """Start the zygote now when the run will surely fork its workers (supervised, on a machine without a GPU
    device node), so that its imports overlap the caller's: `megacluster train` imports torch next (3 s of the
    2-core test machine's 6.5 s). Torch-free; the supervisor decides for itself when it starts workers."""
    supervised = (run.workers > 1 or bool(run.chaos)) and not under_launcher()
    no_gpu = run.device == "cpu" or (run.device == "auto" and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")))  # NVIDIA's driver, AMD's ROCm
    if supervised and fork_supported() and (run.worker_start == "fork" or (run.worker_start == "auto" and no_gpu)):
        start_zygote()


class ZygoteFailed(RuntimeError):
    """The zygote cannot fork workers (the message says why): start them with exec instead."""


class Forked:
    """A worker forked by the zygote, with the part of subprocess.Popen's interface the supervisor uses."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid = zygote, pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.codes.get(self.pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.read(timeout=0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self.zygote.send({"op": "kill", "pid": self.pid, "sig": int(sig)})

    def wait(self) -> int:
        while self.poll() is None:
            self.zygote.read(timeout=1.0)
        return self.returncode


class Zygote:
    """The supervisor's end: start the zygote, ask it for workers, learn how they exit.

    If the zygote dies (the OOM killer, say), its workers are SIGKILLed and reported as killed, so the supervisor
    replaces them as after any failure; `spawn` then raises ZygoteFailed and the supervisor uses exec."""

    _shared: Zygote | None = None

    @classmethod
    def shared(cls, env: dict[str, str]) -> Zygote:
        """This process's zygote for `env` (import-time state depends on it), started if there is none yet."""
        z = cls._shared
        if z is None or _import_env(z.env) != _import_env(env) or z.gone is not None:
            if z is not None:
                z.close()
            z = cls._shared = cls(env)
        return z

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # numpy's OpenBLAS starts its thread pool when imported: one thread, so the zygote stays single-threaded
        # (the workers compute with torch's own BLAS; numpy only slices their token arrays)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", "megacluster.train.zygote", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), env={**env, "OPENBLAS_NUM_THREADS": "1"})
        self.live: set[int] = set()  # forked and not reported exited
        self.codes: dict[int, int] = {}  # pid -> exit code, as the zygote reaped them
        self.replies: list[dict] = []  # {"ready"} / {"error"} / {"pid"}, in order
        self.ready = False
        self.gone: str | None = None  # why the zygote is no more
        atexit.register(self.close)

    def send(self, msg: dict, fds: tuple[int, ...] = ()) -> None:
        if self.gone is None:
            try:
                socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
            except OSError:  # the zygote died: take in its last words and its end
                self.read(timeout=1.0)

    def read(self, timeout: float) -> None:
        """Take in what the zygote has sent within `timeout` seconds."""
        while self.gone is None and select.select([self.sock], [], [], timeout)[0]:
            data = self.sock.recv(MAX_MSG)
            if not data:
                self.lost()
                return
            msg = json.loads(data)
            if "exited" in msg:
                self.codes[msg["exited"]] = msg["code"]
                self.live.discard(msg["exited"])
            else:
                self.replies.append(msg)
            timeout = 0

    def lost(self) -> None:
        """The zygote ended on its own: its workers cannot be watched any more, so they are killed."""
        self.gone = f"the worker zygote exited with code {self.proc.wait()}"
        for pid in self.live:
            with contextlib.suppress(ProcessLookupError):  # not reaped by the zygote: the pid is still its child's
                os.kill(pid, signal.SIGKILL)
            self.codes[pid] = -signal.SIGKILL
        self.live.clear()

    def reply(self) -> dict:
        while not self.replies:
            if self.gone is not None:
                raise ZygoteFailed(self.gone)
            self.read(timeout=1.0)
        msg = self.replies.pop(0)
        if "error" in msg:
            self.read(timeout=5.0)  # the zygote exits after saying why
            raise ZygoteFailed(msg["error"])
        return msg

    def spawn(self, env: dict[str, str], run_dir: str) -> Forked:
        """Fork a worker (the first call waits for the zygote's imports); ZygoteFailed if the zygote cannot."""
        if not self.ready:
            self.reply()
            self.ready = True
        streams = [fd for fd in (0, 1, 2) if _is_open(fd)]  # a closed one stays closed in the worker too
        self.send({"op": "spawn", "env": env, "cwd": os.getcwd(), "run_dir": run_dir, "streams": streams},
                  fds=tuple(streams))
        pid = self.reply()["pid"]
        self.live.add(pid)
        return Forked(self, pid)

    def close(self) -> None:
        """End the zygote (it kills any child still running) and wait for it."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        if not self.ready:  # no child yet, and maybe still importing (deaf to the socket's end until done)
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.gone = self.gone or "closed"
        if Zygote._shared is self:
            Zygote._shared = None


def _import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that can shape what the zygote imported: all of it but pytest's per-test name
    (a worker gets the whole environment of its spawn anyway)."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ---- the zygote process ----

def unsafe_to_fork() -> str | None:
    import torch

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the zygote runs {threads} threads after its imports (a fork would copy locks they hold)"
    if torch.cuda.is_initialized():
        return "CUDA was initialised in the zygote (a forked child could not use it)"
    return None


def child(sock: socket.socket, msg: dict, fds: list[int]) -> None:
    """In the forked child: become the worker `msg` asks for, exit with its code (never return to the zygote)."""
    code = 1
    try:
        sock.close()
        for target in (0, 1, 2):  # the supervisor's stdin, stdout, stderr of the moment
            if target not in msg["streams"]:
                with contextlib.suppress(OSError):
                    os.close(target)
        for target, fd in zip(msg["streams"], fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(msg["cwd"])
        os.environ.clear()
        os.environ.update(msg["env"])
        import torch

        # an exec'd worker's thread pool starts with OMP_NUM_THREADS; here the pool has not started yet either
        torch.set_num_threads(int(msg["env"].get("OMP_NUM_THREADS", torch.get_num_threads())))
        sys.argv = ["megacluster.train.worker", msg["run_dir"]]
        from .worker import entry

        code = entry(msg["run_dir"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - as an exec'd worker: the traceback, exit 1
        traceback.print_exc()
    finally:
        from .worker import hard_exit

        hard_exit(code)


def serve(sock: socket.socket) -> int:
    import importlib

    try:
        for name in PRELOAD:
            importlib.import_module(name)
        problem = unsafe_to_fork()
    except Exception as e:  # noqa: BLE001 - whatever it is, the supervisor falls back to exec and says why
        problem = f"the zygote's imports failed: {type(e).__name__}: {e}"
    if problem:
        sock.send(json.dumps({"error": problem}).encode())
        return 1
    children: set[int] = set()
    try:
        sock.send(json.dumps({"ready": True}).encode())
        while _serve_one(sock, children):
            pass
    except OSError:  # the supervisor's end is gone
        pass
    for pid in children:  # the supervisor's process is done (or dead): leave no worker behind
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def _serve_one(sock: socket.socket, children: set[int]) -> bool:
    """Report the children that ended, then carry out one request if there is one; False at the socket's end."""
    # a child's end is seen within 20 ms; with no child, sleep until asked
    readable = select.select([sock], [], [], 0.02 if children else None)[0]
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        children.discard(pid)
        sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
    if not readable:
        return True
    data, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 3)
    if not data:
        return False
    msg = json.loads(data)
    if msg["op"] == "kill" and msg["pid"] in children:
        os.kill(msg["pid"], msg["sig"])
    elif msg["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(sock, msg, fds)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        sock.send(json.dumps({"pid": pid}).encode())
    return True


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
