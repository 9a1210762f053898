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
socket pair). Workers are named by a spawn id: a pid is reused once reaped.
    first, after the imports        <- {"ready": true} | {"error": "why not"} (and the zygote exits)
    -> {"op": "spawn", "id": 7, "set": {...}, "unset": [...], "cwd": "...", "run_dir": "...", "streams": [0, 1, 2]}
       + those stdio descriptors (the inheritable ones)     <- {"id": 7, "pid": 1234} | {"id": 7, "error": "..."}
    -> {"op": "kill", "id": 7, "sig": 9}   (signalled only while not reaped: never a process that reused the pid)
                                                                     <- {"exited": 7, "code": -9} (as Popen's)
"set"/"unset" are the worker's environment's differences from the zygote's. A request the zygote does not
answer in REPLY_S (or its imports in the supervisor's ready timeout) gets it killed, as does its death: either
way its workers are killed and reported so, and the supervisor uses exec from then on.
At the end of the socket (the supervisor's process closed it, or died) the zygote SIGKILLs its children and exits.
It starts with SIGTERM/SIGINT blocked (the supervisor's spawn mask) and keeps them so: a Ctrl-C to the process
group is for the supervisor and the workers. A child unblocks them once its handlers are set (worker.py), as an
exec'd worker does.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import TYPE_CHECKING

from ..files import under_launcher

if TYPE_CHECKING:
    from ..config import RunConfig

PRELOAD = ("torch", "torch._dynamo", "safetensors.torch", "megacluster.train.worker", "megacluster.train.loop",
           "megacluster.train.elastic", "megacluster.data")
MAX_MSG = 1 << 20  # bytes: a datagram's most (a socket's send buffer, ~208 KiB by default, is the real bound)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
REPLY_S = 30.0  # seconds the zygote may take to answer a request or report a killed worker's exit


def fork_supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "fork")


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


def supervised(run: RunConfig) -> bool:
    """Whether a supervisor starts this run's workers: more than one, or faults to inject, and no launcher."""
    return (run.workers > 1 or bool(run.chaos)) and not under_launcher()


def forks(run: RunConfig, device: str) -> bool:
    """Whether a supervised run's workers are forked from the zygote (run.worker_start; auto: on CPU)."""
    return fork_supported() and (run.worker_start == "fork" or (run.worker_start == "auto" and device == "cpu"))


def prestart(run: RunConfig) -> None:
    """Start the zygote now when the run will surely fork its workers, so that its imports overlap the caller's:
    `megacluster train` imports torch next (3 s of the 2-core test machine's 6.5 s). Torch-free, so device auto is
    guessed from the GPU device nodes; the supervisor decides for itself, on the resolved device, when it starts
    workers."""
    if supervised(run) and forks(run, guess_device(run)):
        start_zygote()


def guess_device(run: RunConfig) -> str:
    """run.device without importing torch: auto is guessed from the GPU device nodes (torch may still find no
    usable GPU there, and the run then goes to the CPU)."""
    gpu_node = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd"))  # NVIDIA's driver, AMD's ROCm
    return run.device if run.device != "auto" else "cuda" if gpu_node else "cpu"


class ZygoteFailed(RuntimeError):
    """The zygote cannot fork workers (the message says why): start them with exec instead."""


class Forked:
    """A worker forked by the zygote, with the part of subprocess.Popen's interface the supervisor uses. Known by
    its spawn id, not its pid: a pid is reused once the zygote has reaped it."""

    def __init__(self, zygote: Zygote, sid: int, pid: int):
        self.zygote, self.sid, self.pid = zygote, sid, pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.codes.get(self.sid)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.read(timeout=0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self.zygote.send({"op": "kill", "id": self.sid, "sig": int(sig)})

    def wait(self) -> int:
        deadline = time.monotonic() + REPLY_S
        while self.poll() is None:
            if time.monotonic() > deadline:  # the zygote does not report (stopped?): it can watch nothing
                self.zygote.abandon(f"it reported no exit of worker pid {self.pid} in {REPLY_S:g} s")
            self.zygote.read(timeout=1.0)
        return self.returncode


class Zygote:
    """The supervisor's end: start the zygote, ask it for workers, learn how they exit.

    If the zygote dies (the OOM killer, say) or stops answering, its workers are SIGKILLed and reported as killed,
    so the supervisor replaces them as after any failure; `spawn` then raises ZygoteFailed and the supervisor uses
    exec."""

    _shared: Zygote | None = None

    @classmethod
    def shared(cls, env: dict[str, str]) -> Zygote:
        """This process's zygote for `env` (import-time state depends on it), started if there is none yet."""
        z = cls._shared
        if z is None or _import_env(z.env) != _import_env(env) or z.gone is not None or z.proc.poll() is not None:
            if z is not None:
                z.close()
            z = cls._shared = cls(env)
        return z

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.own_env = {**env, "OPENBLAS_NUM_THREADS": "1"}  # the zygote's (a worker's differs from this one)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # at 3 or above: were one of our stdin/stdout/stderr closed, the zygote's stream of that number would
            # be this socket, and a worker's print would land in the protocol
            fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
            try:
                # numpy's OpenBLAS starts its thread pool when imported: one thread, so the zygote stays single-
                # threaded (the workers compute with torch's own BLAS; numpy only slices their token arrays)
                self.proc = subprocess.Popen([sys.executable, "-m", "megacluster.train.zygote", str(fd)],
                                             pass_fds=(fd,), env=self.own_env)
            finally:
                os.close(fd)
        self.next_id = 0
        self.live: set[int] = set()  # spawn ids forked and not reported exited
        self.codes: dict[int, int] = {}  # spawn id -> exit code, as the zygote reaped it
        self.replies: list[dict] = []  # {"ready"} / {"error"} / {"pid"}, in order
        self.ready = False
        self.gone: str | None = None  # why the zygote is no more
        atexit.register(self.close)

    def send(self, msg: dict, fds: tuple[int, ...] = ()) -> None:
        if self.gone is not None:
            return
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
        except (BrokenPipeError, ConnectionResetError):  # the zygote died: take in its last words and its end
            self.read(timeout=1.0)
        except OSError as e:  # e.g. a request too large for a datagram: this one cannot be forked
            raise ZygoteFailed(f"cannot send the request to the zygote ({e})") from None

    def read(self, timeout: float) -> None:
        """Take in what the zygote has sent within `timeout` seconds, in order."""
        while self.gone is None and select.select([self.sock], [], [], timeout)[0]:
            data = self.sock.recv(MAX_MSG)
            if not data:
                self.lost(f"the worker zygote exited with code {self.proc.wait()}")
                return
            msg = json.loads(data)
            if "exited" in msg:
                self.codes[msg["exited"]] = msg["code"]
                self.live.discard(msg["exited"])
            else:
                if "pid" in msg:
                    self.live.add(msg["id"])
                self.replies.append(msg)
            timeout = 0

    def lost(self, why: str) -> None:
        """The zygote is gone, and with it its workers: each is killed by the kernel when its parent dies
        (PR_SET_PDEATHSIG, set in `child`), so none is left running unwatched; they are reported killed."""
        self.gone = why
        for sid in self.live:
            self.codes[sid] = -signal.SIGKILL
        self.live.clear()

    def abandon(self, why: str) -> None:
        """The zygote stopped answering: kill it, and so its workers (reported killed)."""
        if self.gone is None:
            self.proc.kill()
            self.proc.wait()
            self.lost(f"the worker zygote was killed: {why}")

    def reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.replies:
            if self.gone is not None:
                raise ZygoteFailed(self.gone)
            if time.monotonic() > deadline:
                self.abandon(f"no answer in {timeout:g} s")
                raise ZygoteFailed(self.gone)
            self.read(timeout=1.0)
        msg = self.replies.pop(0)
        if "error" in msg:
            if "id" not in msg:  # the zygote cannot fork at all, and exits
                self.read(timeout=5.0)
            raise ZygoteFailed(msg["error"])
        return msg

    def spawn(self, env: dict[str, str], run_dir: str, ready_timeout: float = 600.0) -> Forked:
        """Fork a worker; the first call waits up to `ready_timeout` s for the zygote's imports. ZygoteFailed if the
        zygote cannot: the caller starts this worker (and the next ones) with exec."""
        if not self.ready:
            self.reply(ready_timeout)
            self.ready = True
        # the streams this process would pass to an exec'd child: the inheritable ones (a closed one, or a
        # close-on-exec descriptor of ours that happens to have the number, stays closed in the worker)
        streams = [fd for fd in (0, 1, 2) if _inheritable(fd)]
        changed = {k: v for k, v in env.items() if self.own_env.get(k) != v}  # small, whatever the env's size
        unset = [k for k in self.own_env if k not in env]
        self.next_id += 1
        self.send({"op": "spawn", "id": self.next_id, "set": changed, "unset": unset, "cwd": os.getcwd(),
                   "run_dir": run_dir, "streams": streams}, fds=tuple(streams))
        msg = self.reply(REPLY_S)
        return Forked(self, msg["id"], msg["pid"])

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
        self.lost(self.gone or "closed")  # it killed any worker still running, on the socket's end
        if Zygote._shared is self:
            Zygote._shared = None


def _import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that can shape what the zygote imported: all of it but pytest's per-test name
    (a worker gets the whole environment of its spawn anyway)."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # not open
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


def child(sock: socket.socket, msg: dict, fds: list[int], zygote_pid: int) -> None:
    """In the forked child: become the worker `msg` asks for and exit with its code. Never returns (a return would
    run the zygote's loop in the worker)."""
    code = 1
    try:
        # die with the zygote: a zygote killed (or dead) before its supervisor learned this worker's pid must not
        # leave it running unwatched beside its replacement
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or \
                os.getppid() != zygote_pid:
            os._exit(1)
        sock.close()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in fds]  # out of 0-2 before any is replaced
        for fd in fds:
            os.close(fd)
        for target in (0, 1, 2):  # the supervisor's streams of the moment; one it had closed stays closed
            if target in msg["streams"]:
                os.dup2(high[msg["streams"].index(target)], target)
            else:
                with contextlib.suppress(OSError):
                    os.close(target)
        for fd in high:
            os.close(fd)
        for target, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
            # Python's stream objects are the zygote's, made at its start: match them to this worker's streams
            # (None for a closed one, as an exec'd Python has)
            if target not in msg["streams"]:
                setattr(sys, name, None)
            elif getattr(sys, name) is None:
                setattr(sys, name, open(target, mode, buffering=1 if mode == "w" else -1, closefd=False))
        os.chdir(msg["cwd"])
        for k in msg["unset"]:
            os.environ.pop(k, None)
        os.environ.update(msg["set"])
        import torch

        # an exec'd worker's thread pool starts with OMP_NUM_THREADS; here the pool has not started yet either
        threads = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]  # OpenMP's list: the outer level's count
        torch.set_num_threads(int(threads) if threads else torch.get_num_threads())
        sys.argv = ["megacluster.train.worker", msg["run_dir"]]
        from .worker import entry

        code = entry(msg["run_dir"])
    except SystemExit as e:  # as the interpreter exits on it
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as an exec'd worker: the traceback, exit 1
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)  # no C++ static destructors (worker.hard_exit says why), no return into the zygote


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
    children: dict[int, int] = {}  # pid -> spawn id
    try:
        sock.send(json.dumps({"ready": True}).encode())
        while _serve_one(sock, children):
            pass
    except (BrokenPipeError, ConnectionResetError):  # the supervisor's end is gone
        pass
    for pid in children:  # the supervisor's process is done (or dead): leave no worker behind
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


def _serve_one(sock: socket.socket, children: dict[int, int]) -> bool:
    """Report the children that ended, then carry out one request if there is one; False at the socket's end."""
    # a child's end is seen within 20 ms; with no child, sleep until asked
    readable = select.select([sock], [], [], 0.02 if children else None)[0]
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        sock.send(json.dumps({"exited": children.pop(pid), "code": os.waitstatus_to_exitcode(status)}).encode())
    if not readable:
        return True
    data, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 3)
    if not data:
        return False
    msg = json.loads(data)
    if msg["op"] == "kill":
        pid = next((p for p, sid in children.items() if sid == msg["id"]), None)
        if pid is not None:  # not reaped yet: the pid is still this child's
            os.kill(pid, msg["sig"])
    elif msg["op"] == "spawn":
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # out of processes or memory: this spawn fails, the running workers go on
            reply = {"id": msg["id"], "error": f"fork failed: {e}"}
        else:
            if pid == 0:
                child(sock, msg, fds, parent)
            children[pid] = msg["id"]
            reply = {"id": msg["id"], "pid": pid}
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps(reply).encode())
    return True


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
