"""One training worker: forward/backward over its share of the global batch, all-reduce, optimizer step, metrics.

The same code runs as the only process (world 1, no process group), as one of N local processes started by
the supervisor, and as one of N processes on M nodes under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK from env).

Exactness: every rank sums token losses over its share and divides by the *global* token count, and the
gradients are summed (not averaged) across ranks. So any number of workers and any split of the batch into
shares and micro-batches computes the same gradient as one process, up to float summation order.
A single all-reduce per step carries the gradients (copied into one flat buffer), the loss and each rank's
compute time (for the balancer); a lone rank reduces nothing and copies nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import hardware
from ..config import Config, OptimConfig
from ..data import Corpus, SampleOrder, prepare
from ..files import run_outputs, write_json
from ..errors import InputError
from ..model import GPT, flops_per_token
from . import balance as balance_mod
from . import chaos as chaos_mod
from . import optim
from .checkpoint import CheckpointManager, check_max_steps, rng_state, set_rng_state
from .elastic import NODE_LOST, Membership, Plan
from .metrics import MetricsLog, Progress, StepTimer
from .signals import StopSignals


@dataclass(kw_only=True, slots=True)
class Place:
    """Where this process sits: rank among world, and the torch device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    return name


def init_place(device_name: str, timeout_s: float = 600.0) -> Place:
    """Join the process group named by the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), if any."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = resolve_device(device_name)
    device = torch.device(f"cuda:{local_rank}" if kind == "cuda" else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend, timeout = "nccl" if kind == "cuda" else "gloo", datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one store across restarts: the default keys would still hold the dead workers'
            # addresses, and a restarted rank can read a stale one before its peer overwrites it (then gloo
            # fails with "Connection refused"). Every restart round rendezvouses under its own prefix.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"megacluster/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return Place(rank=rank, world=world, local_rank=local_rank, device=device)


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Learning rate for 1-based `step`: linear warm-up, then cosine / WSD (warmup-stable-decay) / constant."""
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    lo = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        # the last decay_fraction of the steps, rounded (int() made 0.29 * 100 = 28.999... 28 steps), and never
        # before warm-up ends (the rate would drop at once from the peak)
        decay_start = max(max_steps - int(o.decay_fraction * max_steps + 0.5), o.warmup_steps)
        if step <= decay_start:
            return o.lr
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return o.lr - (o.lr - lo) * frac
    frac = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


def loss_digest(losses: list[float]) -> str:
    """sha256 of the per-step losses, every bit of each (float.hex): equal digests = the same losses exactly."""
    return hashlib.sha256(",".join(float(x).hex() for x in losses).encode()).hexdigest()


PINNED_RING = 4  # pinned host buffers for the token rows (to_device), reused in turn


class FlatGrads:
    """The step's one all-reduce payload: [grads (n) | loss_sum | end-generation flag | stop signal per rank |
    compute_s per rank | samples per rank]. After the reduce the flag is > 0 when any rank saw the supervisor ask
    to end the generation, and a rank's stop entry holds the signal it was told to stop for (its own, or the
    supervisor's): every rank then acts after the same step.

    Backward writes fresh gradients: `reset()` sets every p.grad to None, so autograd hands its result over as
    .grad (and adds later micro-batches in place). With one rank the buffer holds only the extras: torch's
    AdamW reads p.grad as it is (MasterAdamW gathers them into its own flat buffer, 4 bytes per parameter).
    With several, `pack()` copies the gradients into the buffer (one kernel, upcast to fp32 if they are bf16),
    the buffer is reduced in one collective and p.grad become views of the reduced sums (`grad_views`; else
    they are released and the optimizer reads the buffer: optim.MasterAdamW, whose bf16 weights cannot take an
    fp32 .grad; it sums several micro-batches in the buffer itself, and then nothing is packed). Why not
    pre-assigned views (DDP's gradient_as_bucket_view): that costs a zeroing pass and a
    read-modify-write accumulate every step, 16 bytes per parameter, against 8 for the copy and 0 on one rank.
    The price with several ranks: during the copy both the fresh gradients and the buffer exist (4 more bytes
    per parameter at the peak, as DDP without gradient_as_bucket_view).
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, device: torch.device, grad_views: bool = True):
        self.params = params
        self.world = world
        self.grad_views = grad_views
        self.n = sum(p.numel() for p in params) if world > 1 else 0
        self.buf = torch.zeros(self.n + 2 + 3 * world, dtype=torch.float32, device=device)
        self.views, offset = [], 0
        for p in params if world > 1 else []:
            self.views.append(self.buf[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def reset(self) -> None:
        for p in self.params:
            p.grad = None
        self.extras().zero_()

    def grad_part(self) -> torch.Tensor | None:
        """The gradients' part of the buffer (world > 1), in `params` layout; None with one rank."""
        return self.buf[: self.n] if self.world > 1 else None

    def pack(self) -> None:
        """Before the all-reduce (world > 1): gradients into the buffer, p.grad onto its views (or released)."""
        if self.world == 1:
            return
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=self.buf.device)
                 for p in self.params]
        torch.cat(grads, out=self.buf[: self.n])
        for p, v in zip(self.params, self.views):
            p.grad = v if self.grad_views else None

    def extras(self) -> torch.Tensor:
        return self.buf[self.n:]


class Diverged(RuntimeError):
    """The training loss or gradient norm is not finite: every later step would be too. The values are reduced
    over the ranks, so every rank raises after the same step."""


class CollectiveError(RuntimeError):
    """A collective failed (peer died, link flapped, timeout): the generation must be re-formed."""


@contextlib.contextmanager
def collective(what: str):
    """Around communication with peers: any transport error becomes a CollectiveError naming `what`."""
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as e:
        raise CollectiveError(f"{what}: {e}") from e


class Worker:
    """Owns the model, optimizer, data order and metrics of one rank. `run()` trains to max_steps.

    With a `Membership` (started by the supervisor) the worker survives the failure of its peers: on a failed
    collective it keeps its state of the last completed step, waits for the supervisor's plan of the next
    generation, re-forms the process group and, if told, adopts the state of the most advanced peer.
    """

    def __init__(self, cfg: Config, place: Place, corpus: Corpus | None = None, run_dir: str | None = None,
                 membership: Membership | None = None, wid: int | None = None, needs_state: bool = False):
        self.cfg, self.place, self.membership = cfg, place, membership
        self.wid = place.rank if wid is None else wid  # stable worker id (= rank in a full world)
        self.members = list(range(place.world))  # worker ids in rank order (a generation's plan after a shrink)
        self.run_dir = Path(run_dir or cfg.run.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)  # every rank builds identical initial weights: no broadcast needed
        self.corpus = corpus or prepare(cfg.data, cfg.model.vocab_size, [run_outputs(self.run_dir)])
        self.data_identity = self.corpus.identity()  # kept in checkpoints: --resume checks the tokenizer
        self.compiled = cfg.run.compile == "on" or (cfg.run.compile == "auto" and place.device.type == "cuda")
        fused_loss = optim.on_for_compiled_cuda(cfg.run.fused_loss, place.device, self.compiled)
        self.model = GPT(cfg.model, fused_loss=fused_loss, swiglu_kernel=cfg.run.swiglu_kernel == "auto",
                         rope_kernel=cfg.run.rope_kernel == "auto", loss_kernel=cfg.run.loss_kernel == "auto")
        self.model.to(place.device)
        self.dtype = self._dtype()
        self.opt = optim.build(self.model, cfg.optim, place.device, self.dtype, self.compiled)
        self.params = self.opt.params  # the optimizer's order is the all-reduce buffer's layout
        self.flat = self.new_flat(place.world)
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.dynamic_batch = self.forward is not self.model and cfg.run.balance == "auto"
        B = cfg.run.batch_size
        self.tokens_per_step = B * cfg.model.seq_len  # the global token count every loss is divided by
        self.order = SampleOrder(self.corpus.train, cfg.model.seq_len, B, cfg.run.seed)
        self.val_order = SampleOrder(self.corpus.val, cfg.model.seq_len, B, cfg.run.seed, shuffle=False)
        self.balancer = balance_mod.Balancer(world=place.world, global_batch=B, mode=cfg.run.balance)
        faults = chaos_mod.parse(cfg.run.chaos)  # no faults, no markers: every run dir held an empty chaos/
        self.chaos = chaos_mod.Chaos(faults, rank=self.wid, marker_dir=self.run_dir / "chaos" if faults else None)
        self.flops_per_token = flops_per_token(cfg.model)
        gpu = hardware.detect_local_gpu(place.local_rank) if place.device.type == "cuda" else None
        self.peak_flops = gpu.peak("bf16" if self.dtype == torch.bfloat16 else "tf32") if gpu else None
        self.ckpt: CheckpointManager | None = None
        self.losses: list[float] = []  # per-step global losses, index = step - 1
        self.costs: list[float] = []  # per-step worker-seconds (wall time x world) of the kept history
        self.restored_steps = 0  # steps an earlier invocation trained (--resume, no supervisor: it counts them)
        self.step = 0  # steps completed
        self.val_loss: float | None = None
        self.end_generation = False  # set when the supervisor asked this generation to end after this step
        self.stop = StopSignals(announce=self._announce_stop)  # SIGTERM/SIGINT, own or relayed (signals.py)
        self.stopped_by: int | None = None  # every rank agreed to stop after this step, for this signal (the
        # first rank's that had one): save a checkpoint and return
        self._saved_step = -1  # the newest step a checkpoint save was started for
        self.after_step_pending = False  # step `self.step` done, its logging/eval/checkpoint not yet
        self.pending: list[torch.Tensor] = []  # losses of completed steps not yet copied to the host
        self.valid = not needs_state  # False: our weights are no step's (a replacement waiting for a peer's
        # state, or a half-finished transfer); we report step -1 and are never chosen as the source
        self._loaded_balancer: dict | None = None  # from a checkpoint, applied once the world is known
        self._flag_bufs: list | None = None  # CUDA: pinned buffers + events for the end-generation/stop flags
        self._pinned: list[list] = []  # CUDA: [pinned host buffer, event after the copy from it] (to_device)
        self._pinned_turn = 0
        self.metrics: MetricsLog | None = None
        self.rejected_ckpts: set[int] = set()  # steps whose checkpoints restore() found broken
        self.grad_norm = torch.zeros(())

    # ---- set-up helpers ----
    def _dtype(self) -> torch.dtype:
        want = self.cfg.run.dtype
        if want == "auto":
            want = "bf16" if self.place.device.type == "cuda" else "fp32"
        if self.place.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (MFU vs tf32 peak)
            torch.backends.cudnn.allow_tf32 = True
        return torch.bfloat16 if want == "bf16" else torch.float32

    def new_flat(self, world: int) -> FlatGrads:
        return FlatGrads(self.params, world, self.place.device, grad_views=not self.opt.reads_reduced)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.place.device.type, dtype=self.dtype)

    # ---- the hot path ----
    def micro_step(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; grads land in (or add to) p.grad. Returns the loss sum."""
        x, y = rows[:, :-1], rows[:, 1:]  # (b, T) inputs and shifted targets
        if self.dynamic_batch:  # shares move with the balancer: one graph for every micro-batch size >= 2, so a
            # new share does not stall a step on a recompile (hang detection). Size 1 is specialised by dynamo
            # (0/1 specialisation): one more compile the first time a share or remainder is 1. mark_unbacked
            # avoids it on CPU (checked) but is untried on CUDA kernels (cuDNN attention), so not used yet.
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(y, 0)
        with self.autocast():
            loss_sum = self.forward(x, y)  # summed token cross-entropy, fp32
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def compute_share(self, step: int, start: int, count: int) -> torch.Tensor:
        """Forward/backward over this rank's `count` sequences of the global batch; returns its loss sum."""
        total = torch.zeros((), device=self.place.device)
        scale = 1.0 / self.tokens_per_step
        done = 0
        chunks = balance_mod.micro_batches(count, self.cfg.run.micro_batch)
        for i, mb in enumerate(chunks):
            rows = self.to_device(self.order.rows(step, start + done, mb))
            total += self.micro_step(rows, scale)
            done += mb
            if i < len(chunks) - 1:
                self.opt.accumulate()  # MasterAdamW: sum in fp32 (bf16 p.grad would round every addition)
        return total

    def to_device(self, rows) -> torch.Tensor:
        """(b, T+1) int64 token rows to the device. On CUDA through pinned memory: a copy from pageable
        memory would make the host wait for the GPU to drain its queue, opening a gap between steps. The pinned
        buffers are our own, a ring of PINNED_RING reused in turn, filled by numpy: `pin_memory()`, and torch's
        own copy_ into a pinned buffer, each took 4-5 ms of host time for the 262 KB of a 124M batch on the H200
        (traced; torch's CPU copy through its thread pool), which the GPU waits out after every host sync
        (logging, evaluation)."""
        t = torch.from_numpy(rows)
        if self.place.device.type != "cuda":
            return t
        if len(self._pinned) < PINNED_RING:
            self._pinned.append([torch.empty(0, dtype=t.dtype), torch.cuda.Event()])
        slot = self._pinned[self._pinned_turn]
        self._pinned_turn = (self._pinned_turn + 1) % PINNED_RING
        slot[1].synchronize()  # the copy that last read this buffer is done (PINNED_RING calls ago: long since)
        if slot[0].numel() < t.numel() or slot[0].dtype != t.dtype:
            slot[0] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
        host = slot[0][: t.numel()].view(t.shape)
        np.copyto(host.numpy(), rows, casting="no")  # a plain memcpy on this thread
        out = host.to(self.place.device, non_blocking=True)
        slot[1].record()
        return out

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (1-based `step`). Returns the global mean loss as a 0-d tensor (no host sync).

        Raises CollectiveError if the all-reduce fails; the model and optimizer are then untouched (still the
        state after step-1), so the step can be redone in the next generation.
        """
        self.corpus.check_unchanged()  # shards are memmapped inputs: one rewritten mid-run ends it (exit 2)
        shares = self.balancer.shares()
        rank, world = self.place.rank, self.place.world
        start = balance_mod.offsets(shares)[rank]
        self.flat.reset()
        self.opt.begin_step(self.flat.grad_part() if self.opt.reads_reduced else None)
        t0 = time.perf_counter()
        loss_sum = self.compute_share(step, start, shares[rank])
        factor = self.chaos.slow_factor(step)
        if (self.cfg.run.balance == "auto" or factor > 1) and self.place.device.type == "cuda":
            torch.cuda.synchronize(self.place.device)  # compute time, not launch time
        compute_s = time.perf_counter() - t0
        if factor > 1:  # emulate a slower GPU: stretch this rank's compute
            time.sleep((factor - 1) * compute_s)
            compute_s *= factor
        self.inject_faults(step)
        extras = self.flat.extras()
        extras[0] = loss_sum
        if self.membership is not None and self.membership.bump_seen():
            extras[1] = 1.0
            if (asked := self.membership.stop_asked()) is not None:
                self.stop.relay(asked)  # the supervisor was told to stop
        if self.stop.signum is not None:
            extras[2 + rank] = self.stop.signum  # each rank's own slot: the reduced sums are every rank's signal
        if self.cfg.run.balance == "auto":  # compute time, measured before the all-reduce equalises wall time
            extras[2 + world + rank] = compute_s
            extras[2 + 2 * world + rank] = shares[rank]
        # MasterAdamW sums several micro-batches in the buffer itself (begin_step): then it holds them already
        if world == 1 or self.opt.take_accumulated() is None:
            self.flat.pack()
        with self.waiting(step - 1):  # heartbeats carry completed steps
            self.all_reduce()
            if self.membership is not None or world > 1:
                flags = self.read_flags(extras[1:2 + world])
                self.end_generation = flags[0] > 0
                self.stopped_by = next((int(s) for s in flags[1:] if s > 0), None)  # the same on every rank
            else:
                self.stopped_by = self.stop.signum
        if self.cfg.run.balance == "auto":
            times = extras[2 + world:].tolist()
            self.balancer.observe(times[:world], [int(s) for s in times[world:]])
        self.clip_and_step(step)
        return extras[0] / self.tokens_per_step

    def read_flags(self, flags: torch.Tensor) -> list[float]:
        """The reduced [end-generation, stop signal per rank] values. On CUDA they are read one step late, from a
        pinned buffer, so the host never waits for the GPU on the hot path; every rank reads the same reduced
        values, so all of them still act after the same step."""
        if flags.device.type != "cuda":
            return flags.tolist()
        if self._flag_bufs is None or self._flag_bufs[0][0].numel() != flags.numel():
            self._flag_bufs = [(torch.zeros(flags.numel(), pin_memory=True), torch.cuda.Event()) for _ in range(2)]
            self._flag_turn = 0
        host, event = self._flag_bufs[self._flag_turn]
        host.copy_(flags, non_blocking=True)
        event.record()
        self._flag_turn ^= 1
        prev_host, prev_event = self._flag_bufs[self._flag_turn]  # the previous step's flags
        prev_event.synchronize()  # long done: the host runs at most one step ahead
        return prev_host.tolist()

    def inject_faults(self, step: int) -> None:
        """Chaos faults due at this step, after the compute and before the all-reduce (mid-step)."""
        if self.chaos.take(step, "kill") is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.chaos.take(step, "hang") is not None:
            while True:  # no progress, no heartbeat: the supervisor must notice and kill us
                time.sleep(1)
        if self.place.rank == 0 and self.place.world > 1 and self.chaos.take(step, "flap") is not None:
            dist.destroy_process_group()  # drop our links mid-step: every peer's all-reduce fails for real
            raise CollectiveError(f"chaos flap at step {step}")

    def all_reduce(self) -> None:
        if self.place.world > 1:
            with collective("all-reduce"):
                dist.all_reduce(self.flat.buf, op=dist.ReduceOp.SUM)

    def clip_and_step(self, step: int) -> None:
        """Clip to the global norm (identical on every rank: the grads are already reduced) and update."""
        self.grad_norm = self.opt.step(lr_at(step, self.cfg.optim, self.cfg.run.max_steps), self.flat.grad_part())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `eval_batches` fixed global batches, split over ranks like training; fewer
        if the validation split holds fewer windows (its order wraps: windows would count several times)."""
        self.model.eval()
        B, T = self.cfg.run.batch_size, self.cfg.model.seq_len
        shares = balance_mod.split(B, [1.0] * self.place.world)
        start, count = balance_mod.offsets(shares)[self.place.rank], shares[self.place.rank]
        total = torch.zeros(1, device=self.place.device)
        batches = self.eval_batches()
        for b in range(batches):
            done = 0
            for mb in balance_mod.micro_batches(count, self.cfg.run.micro_batch):
                rows = self.to_device(self.val_order.rows(b, start + done, mb))
                with self.autocast():  # eager module: a compiled eval graph would mean a recompile stall
                    total += self.model(rows[:, :-1], rows[:, 1:])
                done += mb
                self.beat()  # progress: a long evaluation is not a hang (only one batch longer than hang_timeout)
        self.model.train()
        if self.place.world > 1:
            with collective("validation all-reduce"), self.waiting(self.step):
                dist.all_reduce(total)
        return total.item() / (batches * B * T)

    def eval_batches(self) -> int:
        """run.eval_batches, at most as many whole batches as the validation split holds (at least one)."""
        return max(1, min(self.cfg.run.eval_batches, self.val_order.n // self.cfg.run.batch_size))

    # ---- checkpoints ----
    def save(self, blocking: bool = False) -> None:
        if self.ckpt is None:
            return
        self._saved_step = self.step
        self.check_finite()  # flushes: the checkpoint's loss history must cover every step it contains
        state = {"optimizer": self.opt.state_dict(), "rng": rng_state(), "balancer": self.balancer.state_dict()}
        meta = {**self.history(), "config": self.cfg.to_dict(), "data": self.data_identity}
        with self.waiting(self.step):  # alive while it snapshots, waits for the previous write (a slow disk) and,
            self.ckpt.save(self.step, self.opt.weights(), state, meta, blocking=blocking)  # if blocking, writes

    def save_for_stop(self) -> None:
        """Told to stop (every rank after the same step): make sure a checkpoint of this step is on disk."""
        if self.ckpt is None:
            return
        if self._saved_step == self.step:
            with self.waiting(self.step):
                self.ckpt.wait()  # after_step already started this step's save
        else:
            self.save(blocking=True)

    def _announce_stop(self, signum: int) -> None:
        if self.wid == 0:
            print(f"\n{signal.Signals(signum).name}: finishing the step in flight, then saving a checkpoint and "
                  "stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    def history(self) -> dict:
        """What a checkpoint and a peer's state transfer carry besides tensors: completed steps and their record."""
        return {"step": self.step, "losses": self.losses, "costs": self.costs, "val_loss": self.val_loss}

    def restore(self) -> bool:
        """Load the newest good checkpoint of this run dir, if any. Every rank reads the same files."""
        directory = self.run_dir / "checkpoints"
        reader = CheckpointManager(directory, keep=self.cfg.run.ckpt_keep)
        loaded = reader.latest()
        self.rejected_ckpts |= reader.rejected  # the writer's pruning must not count them as good
        if loaded is None:
            if self.wid == 0:  # say it once: a resume that silently starts over would look like a resume
                print(f"resume: no good checkpoint in {directory}; starting from step 0", file=sys.stderr, flush=True)
            return False
        last = self.cfg.run.max_steps
        check_max_steps(loaded.step, last, directory)  # (checked before the start too, from the manifest)
        if self.wid == 0 and loaded.step == last:
            print(f"resume: {loaded.path.name} is at run.max_steps = {last} already: nothing to train (a larger "
                  "--max-steps trains further)", file=sys.stderr, flush=True)
        elif self.wid == 0 and self.membership is None:  # (a supervisor says it in its generation's line)
            print(f"resume: from {loaded.path.name}, after step {loaded.step}", file=sys.stderr, flush=True)
        self.opt.load_weights(loaded.model)
        self.opt.load_state_dict(loaded.state["optimizer"])
        set_rng_state(loaded.state["rng"])
        self._loaded_balancer = loaded.state["balancer"]
        self.balancer.load_state_dict(self._loaded_balancer)
        self.step = loaded.step  # verified against the directory name and the manifest's hash
        self.losses = list(loaded.meta["losses"])
        self.costs = list(loaded.meta.get("costs") or [0.0] * self.step)
        self.val_loss = loaded.meta.get("val_loss")
        return True

    # ---- generations (only with a supervisor) ----
    def start(self) -> None:
        """Restore if asked, then (with a supervisor) announce readiness and join the first generation."""
        if self.cfg.run.resume:
            self.restore()
        if self.membership is None:
            if self.cfg.run.resume and self.place.world > 1:
                self.agree_on_restored_state()
            self.restored_steps = self.step
            self._set_main()
            return
        if self.chaos.node_lost():
            raise SystemExit(NODE_LOST)  # this slot's node is gone for good (chaos `permanent`)
        time.sleep(self.chaos.downtime())  # chaos `down`: a node that takes a while to come back
        self.membership.announce_ready(self.step if self.valid else -1)
        self.enter(self.membership.wait_plan(self.step, self.plan_timeout()))

    def enter(self, plan: Plan) -> None:
        """Join the process group of `plan` and, if told, adopt the source's state."""
        with collective(f"forming generation {plan.gen}"):
            rank, world = self.membership.join(plan, "nccl" if self.place.device.type == "cuda" else "gloo")
        old_world = self.place.world
        self.place.rank, self.place.world = rank, world
        self.members = list(plan.members)
        if world != self.flat.world:
            self.flat = self.new_flat(world)
        if world != old_world:
            self.balancer.resize(world)
            if self._loaded_balancer is not None:  # restored before the world was known: apply it now
                self.balancer.load_state_dict(self._loaded_balancer)
        self._loaded_balancer = None
        if plan.sync:
            with collective(f"state transfer in generation {plan.gen}"), self.waiting(self.step):
                self.sync_state(plan.members.index(plan.source))
        self._set_main()
        self._flag_bufs = None  # a new generation: no flag of the previous one is pending
        every = self.cfg.run.ckpt_every
        if self.ckpt is not None and every and self.step and self.step % every == 0 \
                and not self.after_step_pending and self.step not in self.ckpt.steps():
            self.save()  # the previous rank 0 died while writing this step's checkpoint

    def agree_on_restored_state(self) -> None:
        """Under a launcher the nodes need not share a disk: only rank 0 writes checkpoints, so on a restart the
        other nodes' run dirs hold older ones or none. Ranks that restored different steps all take the state of
        the one that restored the newest (ties: the lowest rank), as a replacement takes a peer's."""
        steps: list[int | None] = [None] * self.place.world
        with collective("comparing the restored checkpoints"):
            dist.all_gather_object(steps, self.step)
        if len(set(steps)) == 1:
            return
        src = max(range(len(steps)), key=lambda r: (steps[r], -r))
        if self.place.is_main:
            print(f"resume: the ranks restored different steps {steps} (run dirs not shared?): every rank continues "
                  f"from rank {src}'s step {steps[src]}", file=sys.stderr, flush=True)
        with collective("sending the restored state"):
            self.sync_state(src)

    def sync_state(self, src: int) -> None:
        """Everyone adopts rank `src`'s model, optimizer state and history (broadcast in a fixed order)."""
        meta = [{**self.history(), "balancer": self.balancer.state_dict(),
                 "after_step_pending": self.after_step_pending, "rejected_ckpts": sorted(self.rejected_ckpts),
                 "grad_norm": float(self.grad_norm)}]  # a pending after_step logs it (a replacement has none)
        dist.broadcast_object_list(meta, src=src)
        m = meta[0]
        if self.place.rank != src:
            self.valid = False  # until every tensor has arrived: a half-copied state is no step's state
        self.opt.broadcast(src)
        self.step, self.losses, self.costs, self.val_loss = m["step"], m["losses"], m["costs"], m["val_loss"]
        self.after_step_pending = m["after_step_pending"]
        self.rejected_ckpts |= set(m["rejected_ckpts"])  # in place: our CheckpointManager holds this set
        self.grad_norm = torch.tensor(m["grad_norm"])
        self.balancer.load_state_dict(m["balancer"])
        self.valid = True

    def transition(self) -> None:
        """End this generation: report our completed step, wait for the next plan, re-form and re-sync."""
        self.flush()
        while True:
            self.membership.leave()
            self.membership.report(self.step if self.valid else -1, self.after_step_pending)
            try:
                self.enter(self.membership.wait_plan(self.step, self.plan_timeout()))
                return
            except CollectiveError:
                continue  # a member failed while the generation was forming: report again

    def _set_main(self) -> None:
        """Rank 0 of the current generation (alone) logs and checkpoints; a former rank 0 stops doing so."""
        if self.place.is_main:
            self.ckpt = self.ckpt or CheckpointManager(self.run_dir / "checkpoints", keep=self.cfg.run.ckpt_keep,
                                                       rejected=self.rejected_ckpts)
            logged = self.step - 1 if self.after_step_pending else self.step  # a pending after_step logs again
            if self.metrics is None:
                self.metrics = MetricsLog(self.run_dir, logged)
            else:  # main through a generation change that took us back (a failed evaluation is redone)
                self.metrics.rewind(logged)
            return
        for closable in (self.ckpt, self.metrics):
            if closable is not None:
                closable.close()
        self.ckpt = self.metrics = None

    # ---- the loop ----
    def run(self, result_to: Path | None = None) -> dict:
        """Train to max_steps, riding through generation changes; returns the run's result (rank 0's is complete).
        On SIGTERM/SIGINT every rank stops after the same step, with a checkpoint of it (result "stopped").
        result_to: also write the result there (atomically), still under this worker's signal handler: a signal
        during the write of a finished run is recorded, not a stop that leaves the run without its result."""
        with self.stop.installed():
            result = self._run()
            if result_to is not None:
                write_json(result_to, result)
            return result

    def _run(self) -> dict:
        cfg = self.cfg.run
        self.start()
        progress = Progress(cfg.max_steps, self.step, enabled=self.place.is_main and cfg.progress)
        t_start = time.perf_counter()
        self.timer = StepTimer(self.step)
        while self.step < cfg.max_steps or self.after_step_pending:
            failed = False
            try:
                if not self.after_step_pending:
                    t0 = time.perf_counter()
                    self.pending.append(self.train_step(self.step + 1))
                    self.step += 1
                    self.costs.append((time.perf_counter() - t0) * self.place.world)
                    self.after_step_pending = True
                    self.beat()
                self.after_step(progress)
                self.after_step_pending = False
                if self.stopped_by is not None:
                    self.save_for_stop()
                    break
                if self.end_generation:
                    self.end_generation = False
                    self.transition()
            except CollectiveError:
                if self.membership is None:
                    raise  # no supervisor (e.g. torchrun): exit, the launcher restarts us from the checkpoint
                failed = True
            if failed:  # out of the except block: the error's traceback holds the failed collective's frames, and
                # with them the process group; freed, leaving the group closes our links, so a peer blocked on us
                # fails at once (inside the block, a 3-worker flap left one blocked until killed as hung: 1 in 10)
                self.transition()  # the step in flight is lost; after_step of a completed step is redone
        self._sync()
        if dist.is_initialized():  # a clean shutdown: exiting with live gloo threads aborts the process
            dist.destroy_process_group()
        progress.close()
        for closable in (self.ckpt, self.metrics):
            if closable is not None:
                closable.close()
        t_end = time.perf_counter()
        tps = self.timer.tokens_per_s(self.step, self.tokens_per_step, t_end)
        return {"steps": self.step, "final_loss": self.losses[-1] if self.losses else None,
                "val_loss": self.val_loss, "tokens": self.step * self.tokens_per_step, "tokens_per_s": tps,
                "mfu": self.mfu(tps), "run_dir": str(self.run_dir), "world": self.place.world,
                "device": str(self.place.device), "params": self.model.num_params(),
                "loss_digest": loss_digest(self.losses), "workers": self.members, "shares": self.balancer.shares(),
                "stragglers": self.stragglers(), "kept_worker_s": float(sum(self.costs[self.restored_steps:])),
                "elapsed_s": t_end - t_start, **self.resolved(),
                "stopped": signal.Signals(self.stopped_by).name  # the last step done: finished, not stopped
                if self.stopped_by is not None and self.step < cfg.max_steps else None}

    def resolved(self) -> dict:
        """What the "auto" keys came to on this worker's device (in the result: a user sees what ran)."""
        return {"compiled": self.compiled, "dtype": "bf16" if self.dtype == torch.bfloat16 else "fp32",  # run.dtype's
                "master_weights": isinstance(self.opt, optim.MasterAdamW), "fused_loss": self.model.fused_loss,
                "loss_kernel": self.model.runs_loss_kernel(self.params[0])}

    def flush(self) -> None:
        """Copy the losses of completed steps to the host history (one device sync)."""
        if self.pending:
            self.losses.extend(torch.stack(self.pending).tolist())
            self.pending.clear()

    def check_finite(self) -> None:
        """Raise Diverged if a loss not yet checked, or this step's gradient norm, is nan or inf (one device sync;
        the norm covers the weights: an update from an inf gradient leaves nan weights behind a finite loss)."""
        first = self.step - len(self.pending) + 1
        self.flush()
        norm = float(self.grad_norm)
        tail = self.losses[first - 1:]
        bad = next(((first + i, f"loss {x}") for i, x in enumerate(tail) if not math.isfinite(x)), None)
        if bad is None and not math.isfinite(norm):
            bad = (self.step, f"gradient norm {norm}")
        if bad is not None:
            if self.ckpt is not None:
                self.ckpt.wait()  # an earlier step's checkpoint still being written: finish it, it stands
            raise Diverged(f"training diverged: {bad[1]} at step {bad[0]}. The checkpoints written before stand "
                           "(none is written without this check); lower optim.lr, lengthen optim.warmup_steps or set "
                           "optim.grad_clip > 0, then start again, or --resume from an earlier checkpoint")

    def after_step(self, progress: Progress) -> None:
        """Logging, evaluation and checkpointing after completed step `self.step` (may raise CollectiveError)."""
        cfg, step = self.cfg.run, self.step
        last = step == cfg.max_steps
        if step == self.timer.first_step + 1:
            self._sync()
            self.timer.first_done(time.perf_counter())
        log = step % cfg.log_every == 0 or last
        if log or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            self.check_finite()  # before the checkpoint: none holds a diverged model
        if log:
            rec = {"step": step, "loss": self.losses[-1], "lr": lr_at(step, self.cfg.optim, cfg.max_steps),
                   "grad_norm": float(self.grad_norm)}
            rec["tokens_per_s"] = self.timer.interval(step, self.tokens_per_step)
            rec["mfu"] = self.mfu(rec["tokens_per_s"])
            rec["world"] = self.place.world
            if cfg.balance == "auto":  # the only mode that measures (balance.Balancer)
                rec["workers"] = self.members  # whose shares and throughputs these are, in that order
                rec["shares"] = self.balancer.shares()
                rec["throughputs"] = [round(t, 2) if t else t for t in self.balancer.throughputs()]  # samples/s
                rec["stragglers"] = self.stragglers()
            if self.metrics is not None:
                self.metrics.write(rec)
            progress.update(step, rec)
        t_aside = time.perf_counter()
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            self.beat()
            self.val_loss = self.evaluate()
            self.beat()
            if self.metrics is not None:
                self.metrics.write({"step": step, "val_loss": self.val_loss})
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
            self.save(blocking=last)
            self.beat()
        self.timer.exclude(time.perf_counter() - t_aside)  # the next logged tok/s is of training alone

    def plan_timeout(self) -> float:
        """How long to wait for the supervisor's next plan (it may be waiting for a replacement to start)."""
        return 10 * max(60.0, self.cfg.run.hang_timeout)

    def waiting(self, step: int):
        """Context for code blocked on peers (see Membership.waiting); a no-op without a supervisor."""
        return self.membership.waiting(step) if self.membership is not None else contextlib.nullcontext()

    def stragglers(self) -> list[int]:
        """The balancer's stragglers as worker ids (it counts ranks; after a shrink rank r is not worker r)."""
        return [self.members[r] for r in self.balancer.stragglers()]

    def beat(self) -> None:
        if self.membership is not None:
            self.membership.heartbeat(self.step)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation against the local GPU's dense peak for the run's dtype (None on CPU)."""
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.place.world)

    def _sync(self) -> None:
        if self.place.device.type == "cuda":
            torch.cuda.synchronize(self.place.device)

