"""Refuse a run's bad input before anything heavy starts: the checks here import no torch (3 s of a 2-core
machine) and tokenize nothing, so a typo is answered at once (`megacluster train` runs them before it imports
torch or starts the zygote). `supervisor.train` runs them for callers of the Python API, then the checks that
need torch: the device, and memory on a GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import Config, ffn_hidden, n_params
from ..data import check_inputs
from ..errors import InputError
from ..files import probe_writable
from .chaos import check_ranks, parse
from .zygote import guess_device, under_launcher

TRAIN_BYTES_PER_PARAM = 16  # the least any of our optimizers holds: fp32 weights, gradients, AdamW's two moments
# (or bf16 weights and gradients with an fp32 master copy); activations come on top


def check(cfg: Config) -> None:
    """Every torch-free check of `cfg` against this machine; InputError naming the key on the first that fails.
    Creates the run dir (a run dir that cannot be made is refused here, not after tokenizing); callers run it
    inside `refused_runs_leave_no_dir`, which removes it again if this or a later check refuses the run."""
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() else cfg.run.workers
    check_ranks(parse(cfg.run.chaos), world)  # a bad spec is refused before any process starts
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
    check_inputs(cfg.data, cfg.model.vocab_size)
    if guess_device(cfg.run) == "cpu":  # on a GPU, train() checks the GPU's memory once torch is imported
        check_fits(cfg, "cpu")


@contextmanager
def refused_runs_leave_no_dir(run_dir: str | Path) -> Iterator[None]:
    """A run refused for its input (InputError, here or in `supervisor.train` once torch is up: --device cuda
    without a GPU, a model too big for the GPU, --data that tokenizes to nothing) leaves behind no directory that
    `check` made for it: those of `run_dir` and its parents that did not exist before are removed again while
    empty. Not under a launcher: there another rank may be about to write into the directory."""
    if under_launcher():
        yield
        return
    made = [p for p in (Path(run_dir), *Path(run_dir).parents) if not p.exists()]  # deepest first
    try:
        yield
    except InputError:
        for p in made:
            try:
                p.rmdir()  # only an empty directory: a run that wrote anything keeps what it wrote
            except OSError:
                break
        raise


def max_local_workers() -> int:
    """Worker processes one machine may start: 4 per core (at least 8; tests run 3 on 2 cores). Beyond that a
    typo (--workers 10000) would fork until the machine gives out instead of being refused."""
    return max(8, 4 * (os.cpu_count() or 1))


def check_fits(cfg: Config, device: str) -> None:
    """Refuse a run that cannot fit this machine's memory (per GPU, or the RAM shared by the local CPU workers),
    before the data is tokenized: a typo such as n_layer=1000000000 would otherwise build layers until the
    machine gives out, and a CPU run of a model whose state fits but whose activations do not (llama-1b on a
    24 GB machine) was killed by the kernel's OOM killer minutes later. On a CPU both terms are lower bounds
    (see activation_bytes), so nothing that fits is refused; on a GPU only the training state is counted."""
    params = n_params(cfg.model)
    act = 0
    if device == "cuda":
        import torch

        have = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        where, replicas = "this GPU", 1
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        replicas = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if under_launcher() else cfg.run.workers
        where = "this machine's memory" + (f" (shared by {replicas} local workers)" if replicas > 1 else "")
        world = int(os.environ["WORLD_SIZE"]) if under_launcher() else cfg.run.workers
        act = activation_bytes(cfg, world)
    state = TRAIN_BYTES_PER_PARAM * params
    need = (state + act) * replicas
    if need <= have:
        return
    each = " per worker" if replicas > 1 else ""
    if act:
        seqs = micro_sequences(cfg, world)
        what = (f"training state {state / 2**30:,.1f} GiB at {TRAIN_BYTES_PER_PARAM} bytes a parameter, activations of "
                f"a micro-batch of {seqs} x {cfg.model.seq_len} tokens {act / 2**30:,.1f} GiB{each}, both at the least")
        fix = "run.micro_batch, model.seq_len, or the model (model.n_layer, model.d_model, model.vocab_size)"
    else:
        what = f"{TRAIN_BYTES_PER_PARAM} bytes each{each}, before activations"
        fix = "model.n_layer, model.d_model, model.vocab_size and model.ffn_hidden"
    raise InputError(f"model: {params:,} parameters need at least {need / 2**30:,.1f} GiB to train ({what}) and "
                     f"{where} is {have / 2**30:,.1f} GiB; check {fix}")


def micro_sequences(cfg: Config, world: int) -> int:
    """Sequences in one forward/backward of one worker: its share of the global batch, at most run.micro_batch."""
    return min(cfg.run.micro_batch, -(-cfg.run.batch_size // world))


def activation_bytes(cfg: Config, world: int) -> int:
    """A lower bound on what one CPU worker's eager forward keeps for its backward (bytes). Per token and layer:
    the block's input and the normed input, for attention and again for the MLP (4 d); q, k, v and the output
    as SDPA saves them (4 d, k and v repeated to every query head); the output projection's input (d, less one d
    of slack); SwiGLU's gate|up, silu(gate) and their product (4 f). Per token once: the (N, V) logits gradient.
    Measured (gpt2-124m, fp32, one process, 2026-12-07): peak RSS 4.06 GB at 2 sequences of 1,024 tokens and
    7.30 GB at 4, so 1.62 GB a sequence, against the 0.91 GB counted here."""
    m = cfg.model
    per_token = m.n_layer * (8 * m.d_model + 4 * ffn_hidden(m)) + m.vocab_size  # elements
    elem = 2 if cfg.run.dtype == "bf16" else 4  # auto is fp32 on a CPU
    return micro_sequences(cfg, world) * m.seq_len * per_token * elem
