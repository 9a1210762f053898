"""Refuse a run's bad input before anything heavy starts: the checks here import no torch (3 s of a 2-core
machine) and tokenize nothing, so a typo is answered at once (`megacluster train` runs them before it imports
torch or starts the zygote). `supervisor.train` runs them for callers of the Python API, then the checks that
need torch: the device, and memory on a GPU."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..config import Config, ffn_hidden, n_params
from ..data import check_inputs
from ..errors import InputError
from ..files import RUN_LOCK, missing_dirs, probe_writable, remove_made, run_outputs, under_launcher
from .balance import split
from .chaos import check_ranks, parse
from .signals import StoppedAtOnce
from .zygote import guess_device

TRAIN_BYTES_PER_PARAM = 16  # the least any of our optimizers holds: fp32 weights, gradients, AdamW's two moments
# (or bf16 weights and gradients with an fp32 master copy); activations come on top


def check(cfg: Config) -> None:
    """Every torch-free check of `cfg` against this machine; InputError naming the key on the first that fails.
    Creates the run dir (a run dir that cannot be made is refused here, not after tokenizing); callers run it
    inside `refused_runs_leave_no_dir`, which removes it again if this or a later check refuses the run."""
    check_environment()
    check_ranks(parse(cfg.run.chaos), world_size(cfg))  # a bad spec is refused before any process starts
    run_dir = Path(cfg.run.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run.run_dir (--run-dir): {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"run.run_dir (--run-dir): cannot create {run_dir} ({e.strerror})") from None
    try:  # a read-only mount or another user's directory: refused now, not by a traceback at the first write
        probe_writable(run_dir)
    except OSError as e:
        raise InputError(f"run.run_dir (--run-dir): cannot write in {run_dir} ({e.strerror})") from None
    if not under_launcher() and cfg.run.workers > max_local_workers():
        raise InputError(f"run.workers={cfg.run.workers}: at most {max_local_workers()} local worker processes on this "
                         f"machine ({os.cpu_count()} cores); for more, run on several machines under torchrun")
    check_inputs(cfg.data, cfg.model.vocab_size, [run_outputs(run_dir)])
    if guess_device(cfg.run) == "cpu":  # on a GPU, train() checks the GPU's memory once torch is imported
        check_fits(cfg, "cpu")


@contextmanager
def refused_runs_leave_no_dir(run_dir: str | Path) -> Iterator[None]:
    """A run refused for its input (InputError, here or in `supervisor.train` once torch is up: --device cuda
    without a GPU, a model too big for the GPU, --data that tokenizes to nothing), or stopped by a signal before
    its first step (StoppedAtOnce), leaves behind no directory that `check` made for it: those of `run_dir` and
    its parents that did not exist before are removed again while empty. A run dir this run made and stopped
    before it trained (no checkpoint, metrics or result in it) goes with what the start wrote in it (config.json,
    chaos/). Not under a launcher: there another rank may be about to write into the directory."""
    if under_launcher():
        yield
        return
    made = missing_dirs(Path(run_dir))
    try:
        yield
    except (InputError, StoppedAtOnce) as e:
        with suppress(OSError):  # run_dir_lock's, released by now (or never made: no run dir)
            if made:
                (made[0] / RUN_LOCK).unlink(missing_ok=True)
                if isinstance(e, StoppedAtOnce) and not any((made[0] / n).exists() for n in TRAINED):
                    shutil.rmtree(made[0])  # all of it this run's (its lock kept other runs out), none trained
        remove_made([d for d in made if d.exists()])
        raise


TRAINED = ("checkpoints", "metrics.jsonl", "result.json")  # what a run dir holds once a run has trained in it


@contextmanager
def run_dir_lock(cfg: Config) -> Iterator[None]:
    """One run at a time in a run dir: a fresh run started beside a live one would set the live run's checkpoints
    aside while it writes them, and two runs would interleave metrics.jsonl. An flock on RUN_DIR/.lock (hidden:
    never read as --data), held for the whole run and released by the kernel however the process ends; under
    torchrun rank 0 takes it for all ranks. The file stays (unlinked while held, a second run could lock a new
    file beside a third one holding the old); `refused_runs_leave_no_dir` removes it with a run dir it made."""
    if under_launcher() and int(os.environ["RANK"]) != 0:  # (check_environment: an integer)
        yield
        return
    path = Path(cfg.run.run_dir) / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"run.run_dir (--run-dir): {cfg.run.run_dir} is in use by another run (pid {holder}); "
                             "wait for it to end, or give another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def check_environment() -> None:
    """The launcher's variables (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
    OMP_NUM_THREADS, refused naming the variable: a stale or mistyped one ended in a traceback (int() of "abc",
    torch's "MASTER_ADDR expected", or every worker's thread setup)."""
    env = os.environ
    threads = env.get("OMP_NUM_THREADS")
    if threads is not None and not (re.fullmatch(r"[0-9]+(,[0-9]+)*", threads) and int(threads.split(",")[0]) > 0):
        raise InputError(f"OMP_NUM_THREADS={threads!r}: must be a positive integer (threads per process; OpenMP's "
                         "per-level list such as 4,2 also), or unset")
    alone = [name for name in ("RANK", "WORLD_SIZE") if name in env]
    if len(alone) == 1:  # a launcher sets both; one alone is stale (it was read as this process's rank or world)
        other = "WORLD_SIZE" if alone[0] == "RANK" else "RANK"
        raise InputError(f"{alone[0]}={env[alone[0]]!r} is set without {other}: a launcher such as torchrun sets "
                         f"both; unset {alone[0]} to run here, or start the run with torchrun")
    if not under_launcher():
        return
    ints = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = env.get(name)
        if value is not None:
            if not (value.isascii() and value.isdigit()):
                raise InputError(f"{name}={value!r}: a launcher's rank variables must be integers >= 0 (RANK and "
                                 "WORLD_SIZE set make this a torchrun worker; unset them to run here)")
            ints[name] = int(value)
    if not ints["RANK"] < ints["WORLD_SIZE"]:
        raise InputError(f"RANK={ints['RANK']} must be below WORLD_SIZE={ints['WORLD_SIZE']}")
    if ints["WORLD_SIZE"] == 1:
        return  # one rank forms no process group: nothing to rendezvous at
    port = env.get("MASTER_PORT", "")
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise InputError(f"MASTER_PORT={port!r}: must be a TCP port, 1-65535")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise InputError(f"{' and '.join(missing)} not set: RANK and WORLD_SIZE make this a torchrun worker, which "
                         "rendezvouses there; start it with torchrun, or unset RANK and WORLD_SIZE to run here")


def world_size(cfg: Config) -> int:
    """Ranks in the run: torchrun's WORLD_SIZE under a launcher, else run.workers."""
    return int(os.environ["WORLD_SIZE"]) if under_launcher() else cfg.run.workers


def max_local_workers() -> int:
    """Worker processes one machine may start: 4 per core (at least 8; tests run 3 on 2 cores). Beyond that a
    typo (--workers 10000) would fork until the machine gives out instead of being refused."""
    return max(8, 4 * (os.cpu_count() or 1))


def check_fits(cfg: Config, device: str) -> None:
    """Refuse a run that cannot fit this machine's memory (one GPU's, or the RAM shared by the local CPU workers)
    before the data is tokenized or anything compiles: a typo such as n_layer=1000000000 would otherwise build
    layers until the machine gives out, and a CPU run of a model whose state fits but whose activations do not
    (llama-1b on a 24 GB machine) was killed by the kernel's OOM killer minutes later. Both terms are lower
    bounds (see sequence_bytes), so nothing that fits is refused."""
    params = n_params(cfg.model)
    state = TRAIN_BYTES_PER_PARAM * params  # bytes, each worker
    seqs = local_micro_sequences(cfg)  # per worker on this machine
    if device == "cuda":  # one GPU per worker: the largest share is the one that must fit
        import torch

        have = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        seqs, where = [max(seqs)], "this GPU has"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "this machine's memory is"
    act = sum(seqs) * sequence_bytes(cfg, device)
    need = state * len(seqs) + act
    if need <= have:
        return
    n = len(seqs)
    workers = f" with {n} workers on this machine" if n > 1 else ""
    each = " each" if n > 1 else ""
    fixes = ["run.micro_batch", "model.seq_len"] if state * n <= have else []  # the state alone fits
    fixes += ["run.workers (torchrun: --nproc-per-node)"] if n > 1 else []
    fixes += ["the model (model.n_layer, model.d_model, model.vocab_size, model.ffn_hidden)"]
    raise InputError(
        f"model: {params:,} parameters need at least {need / 2**30:,.1f} GiB to train{workers} (training state "
        f"{state / 2**30:,.1f} GiB{each} at {TRAIN_BYTES_PER_PARAM} bytes a parameter; activations "
        f"{act / 2**30:,.1f} GiB for micro-batches of up to {max(seqs)} x {cfg.model.seq_len} tokens; both counted "
        f"low) and {where} {have / 2**30:,.1f} GiB; check {', '.join(fixes[:-1])}"
        f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}")


def local_micro_sequences(cfg: Config) -> list[int]:
    """Sequences in one forward/backward of each worker on this machine: its share of the global batch (the
    equal split the run starts with: shares differ by one, or are 0 where batch < workers), at most
    run.micro_batch. Under torchrun, this node's LOCAL_WORLD_SIZE ranks from RANK - LOCAL_RANK (contiguous)."""
    world = world_size(cfg)
    if under_launcher():
        n = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        first = int(os.environ.get("RANK", "0")) - int(os.environ.get("LOCAL_RANK", "0"))
    else:
        n, first = world, 0
    shares = split(cfg.run.batch_size, [1] * world)
    return [min(cfg.run.micro_batch, shares[r]) for r in range(first, min(first + n, world))]


def sequence_bytes(cfg: Config, device: str = "cpu") -> int:
    """A lower bound on what a worker's forward keeps for its backward, per sequence (bytes).

    Eager, per token and layer: the block's input and the normed input, for attention and again for the MLP
    (4 d); q, k, v and the output as SDPA saves them (4 d, k and v repeated to every query head); the output
    projection's input (d, less one d of slack); SwiGLU's gate|up, silu(gate) and their product (4 f); per token
    once, the (N, V) logits gradient. Measured (gpt2-124m, fp32, CPU, one process, 2026-12-07): peak RSS 4.16 GB
    at 2 sequences of 1,024 tokens and 7.48 GB at 4, so 1.66 GB a sequence, against the 0.91 GB counted here.
    Compiled (run.compile=on, and auto on a GPU), Inductor recomputes the norms, RoPE, silu and the product in
    the backward, and the fused loss keeps no (N, V) tensor: only q|k|v's projection and the attention output
    (2 d) and gate|up (2 f) are counted. Measured on a CPU (d 512, 4 layers, f 4096, seq 1024, 2026-12-07): peak
    RSS 1.40 GB at 1 sequence and 2.52 GB at 5, so 0.28 GB a sequence, against 0.15 GB counted; on the GPUs
    (benchmarks/RESULTS.md, peak memory less 16 bytes a parameter, bf16): gpt2-1.5b at 8 sequences 21.7 GB against
    9.4 GB counted, gpt2-124m at 32 (H100, 2026-11-23) 14.2 GB against 4.4 GB."""
    m = cfg.model
    compiled = cfg.run.compile == "on" or (cfg.run.compile == "auto" and device == "cuda")
    if compiled:
        per_token = m.n_layer * (2 * m.d_model + 2 * ffn_hidden(m))  # elements
    else:
        per_token = m.n_layer * (8 * m.d_model + 4 * ffn_hidden(m)) + m.vocab_size
    bf16 = cfg.run.dtype == "bf16" or (cfg.run.dtype == "auto" and device == "cuda")
    return m.seq_len * per_token * (2 if bf16 else 4)
