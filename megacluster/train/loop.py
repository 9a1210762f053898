"""One training worker: forward/backward over its share of the global batch, all-reduce, optimizer step, metrics.

The same code runs as the only process (world 1, no process group), as one of N local processes started by
the supervisor, and as one of N processes on M nodes under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK from env).

Exactness: every rank sums token losses over its share and divides by the *global* token count, and the
gradients are summed (not averaged) across ranks. So any number of workers and any split of the batch into
shares and micro-batches computes the same gradient as one process, up to float summation order.
All gradients live in one flat buffer; a single all-reduce per step carries the gradients, the loss and each
rank's compute time (for the balancer).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import hardware
from ..config import Config, OptimConfig
from ..data import Corpus, SampleOrder, prepare
from ..model import GPT, flops_per_token
from . import balance as balance_mod
from .checkpoint import CheckpointManager, rng_state, set_rng_state


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
        from ..errors import InputError

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
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Place(rank=rank, world=world, local_rank=local_rank, device=device)


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Learning rate for 1-based `step`: linear warm-up, then cosine / WSD (warmup-stable-decay) / constant."""
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    lo = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        decay_start = max_steps - int(o.decay_fraction * max_steps)
        if step <= decay_start:
            return o.lr
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return o.lr - (o.lr - lo) * frac
    frac = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    return lo + 0.5 * (o.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


def loss_digest(losses: list[float]) -> str:
    """sha256 of the per-step losses rounded to 6 significant digits: equal digests = equal training runs."""
    return hashlib.sha256(",".join(f"{x:.6g}" for x in losses).encode()).hexdigest()


def build_optimizer(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms); fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda")


class FlatGrads:
    """All gradients as views into one fp32 buffer, plus `extra` slots reduced in the same collective.

    Layout: [grads (n) | loss_sum (1) | compute_s per rank (world) | samples per rank (world)].
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, device: torch.device):
        self.params = params
        self.n = sum(p.numel() for p in params)
        self.world = world
        self.buf = torch.zeros(self.n + 1 + 2 * world, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            p.grad = self.buf[offset:offset + p.numel()].view_as(p)  # autograd accumulates in place here
            offset += p.numel()

    @property
    def grads(self) -> torch.Tensor:
        return self.buf[: self.n]

    def zero(self) -> None:
        self.buf.zero_()

    def extras(self) -> torch.Tensor:
        return self.buf[self.n:]


class Worker:
    """Owns the model, optimizer, data order and metrics of one rank. `run()` trains to max_steps."""

    def __init__(self, cfg: Config, place: Place, corpus: Corpus | None = None, run_dir: str | None = None):
        self.cfg, self.place = cfg, place
        self.run_dir = Path(run_dir or cfg.run.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)  # every rank builds identical initial weights: no broadcast needed
        self.corpus = corpus or prepare(cfg.data, cfg.model.vocab_size)
        self.model = GPT(cfg.model).to(place.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = FlatGrads(self.params, place.world, place.device)
        self.opt = build_optimizer(self.model, cfg.optim, place.device)
        self.dtype = self._dtype()
        self.forward = self._compiled_forward()
        B = cfg.run.batch_size
        self.order = SampleOrder(self.corpus.train, cfg.model.seq_len, B, cfg.run.seed)
        self.val_order = SampleOrder(self.corpus.val, cfg.model.seq_len, B, cfg.run.seed, shuffle=False)
        self.balancer = balance_mod.Balancer(world=place.world, global_batch=B, mode=cfg.run.balance)
        self.flops_per_token = flops_per_token(cfg.model)
        gpu = hardware.detect_local_gpu(place.local_rank) if place.device.type == "cuda" else None
        self.peak_flops = gpu.peak("bf16" if self.dtype == torch.bfloat16 else "tf32") if gpu else None
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.run.ckpt_keep) if place.is_main else None
        self.losses: list[float] = []  # per-step global losses, index = step - 1
        self.step = 0  # steps completed
        self.val_loss: float | None = None
        self.metrics = MetricsLog(self.run_dir, enabled=place.is_main)

    # ---- set-up helpers ----
    def _dtype(self) -> torch.dtype:
        want = self.cfg.run.dtype
        if want == "auto":
            want = "bf16" if self.place.device.type == "cuda" else "fp32"
        if self.place.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (MFU vs tf32 peak)
            torch.backends.cudnn.allow_tf32 = True
        return torch.bfloat16 if want == "bf16" else torch.float32

    def _compiled_forward(self):
        mode = self.cfg.run.compile
        if mode == "on" or (mode == "auto" and self.place.device.type == "cuda"):
            return torch.compile(self.model)
        return self.model

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.place.device.type, dtype=self.dtype)

    # ---- the hot path ----
    def micro_step(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward + backward of one micro-batch; grads accumulate into the flat buffer. Returns loss sum."""
        x, y = rows[:, :-1], rows[:, 1:]  # (b, T) inputs and shifted targets
        with self.autocast():
            loss_sum = self.forward(x, y)  # summed token cross-entropy, fp32
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def compute_share(self, step: int, start: int, count: int) -> torch.Tensor:
        """Forward/backward over this rank's `count` sequences of the global batch; returns its loss sum."""
        total = torch.zeros((), device=self.place.device)
        scale = 1.0 / (self.cfg.run.batch_size * self.cfg.model.seq_len)  # global token count
        done = 0
        for mb in balance_mod.micro_batches(count, self.cfg.run.micro_batch):
            rows = torch.from_numpy(self.order.rows(step, start + done, mb)).to(self.place.device, non_blocking=True)
            total += self.micro_step(rows, scale)
            done += mb
        return total

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (1-based `step`). Returns the global mean loss as a 0-d tensor (no host sync)."""
        shares = self.balancer.shares()
        start = balance_mod.offsets(shares)[self.place.rank]
        self.flat.zero()
        t0 = time.perf_counter()
        loss_sum = self.compute_share(step, start, shares[self.place.rank])
        extras = self.flat.extras()
        extras[0] = loss_sum
        if self.cfg.run.balance == "auto":  # compute time, measured before the all-reduce equalises wall time
            if self.place.device.type == "cuda":
                torch.cuda.synchronize(self.place.device)
            extras[1 + self.place.rank] = time.perf_counter() - t0
            extras[1 + self.place.world + self.place.rank] = shares[self.place.rank]
        self.all_reduce()
        if self.cfg.run.balance == "auto":
            times = extras[1:].tolist()
            self.balancer.observe(step, times[: self.place.world], [int(s) for s in times[self.place.world:]])
        self.clip_and_step(step)
        return extras[0] / (self.cfg.run.batch_size * self.cfg.model.seq_len)

    def all_reduce(self) -> None:
        if self.place.world > 1:
            dist.all_reduce(self.flat.buf, op=dist.ReduceOp.SUM)

    def clip_and_step(self, step: int) -> None:
        grads = self.flat.grads
        self.grad_norm = grads.norm()  # identical on every rank: the grads are already reduced
        if self.cfg.optim.grad_clip > 0:
            grads.mul_((self.cfg.optim.grad_clip / (self.grad_norm + 1e-6)).clamp(max=1.0))
        lr = lr_at(step, self.cfg.optim, self.cfg.run.max_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `eval_batches` fixed global batches, split over ranks like training."""
        self.model.eval()
        B, T = self.cfg.run.batch_size, self.cfg.model.seq_len
        shares = balance_mod.split(B, [1.0] * self.place.world)
        start, count = balance_mod.offsets(shares)[self.place.rank], shares[self.place.rank]
        total = torch.zeros(1, device=self.place.device)
        for b in range(self.cfg.run.eval_batches):
            done = 0
            for mb in balance_mod.micro_batches(count, self.cfg.run.micro_batch):
                rows = torch.from_numpy(self.val_order.rows(b, start + done, mb)).to(self.place.device)
                with self.autocast():
                    total += self.forward(rows[:, :-1], rows[:, 1:])
                done += mb
        if self.place.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return total.item() / (self.cfg.run.eval_batches * B * T)

    # ---- checkpoints ----
    def save(self, blocking: bool = False) -> None:
        if self.ckpt is None:
            return
        state = {"optimizer": self.opt.state_dict(), "rng": rng_state(), "balancer": self.balancer.state_dict()}
        meta = {"step": self.step, "losses": self.losses, "val_loss": self.val_loss,
                "config": self.cfg.to_dict()}
        self.ckpt.save(self.step, self.model.state_dict(), state, meta, blocking=blocking)

    def restore(self) -> bool:
        """Load the newest good checkpoint of this run dir, if any. Every rank reads the same files."""
        loaded = CheckpointManager(self.run_dir / "checkpoints", keep=self.cfg.run.ckpt_keep).latest()
        if loaded is None:
            return False
        self.model.load_state_dict(loaded.model)
        self.opt.load_state_dict(loaded.state["optimizer"])
        set_rng_state(loaded.state["rng"])
        self.balancer.load_state_dict(loaded.state["balancer"])
        self.step = loaded.meta["step"]
        self.losses = list(loaded.meta["losses"])
        self.val_loss = loaded.meta.get("val_loss")
        return True

    # ---- the loop ----
    def run(self) -> dict:
        cfg = self.cfg.run
        if cfg.resume:
            self.restore()
        first = self.step + 1
        tokens_per_step = cfg.batch_size * self.cfg.model.seq_len
        progress = Progress(cfg.max_steps, first - 1, enabled=self.place.is_main and cfg.progress)
        pending: list[torch.Tensor] = []  # losses not yet copied to the host (avoid a sync every step)
        t_start = t_log = time.perf_counter()
        logged = first - 1  # last step whose metrics were written
        t_after_first = None
        for step in range(first, cfg.max_steps + 1):
            pending.append(self.train_step(step))
            self.step = step
            if step == first:
                self._sync()
                t_after_first = time.perf_counter()
            last = step == cfg.max_steps
            if step % cfg.log_every == 0 or last:
                self.losses.extend(torch.stack(pending).tolist())
                pending.clear()
                now = time.perf_counter()
                tps = (step - logged) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, logged = now, step
                rec = {"step": step, "loss": self.losses[-1], "lr": lr_at(step, self.cfg.optim, cfg.max_steps),
                       "grad_norm": float(self.grad_norm), "tokens_per_s": tps, "mfu": self.mfu(tps),
                       "elapsed_s": now - t_start}
                if self.place.world > 1 and cfg.balance == "auto":
                    rec["shares"] = self.balancer.shares()
                    rec["stragglers"] = self.balancer.stragglers()
                self.metrics.write(rec)
                progress.update(step, rec)
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                self.val_loss = self.evaluate()
                self.metrics.write({"step": step, "val_loss": self.val_loss})
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
                self.save(blocking=last)
        self._sync()
        t_end = time.perf_counter()
        progress.close()
        if self.ckpt is not None:
            self.ckpt.close()
        self.metrics.close()
        ran = self.step - first + 1
        timed_steps = max(ran - 1, 0)
        if timed_steps and t_after_first is not None:
            tps = timed_steps * tokens_per_step / max(t_end - t_after_first, 1e-9)  # first step (compile) excluded
        else:
            tps = ran * tokens_per_step / max(t_end - t_start, 1e-9)
        return {"steps": self.step, "final_loss": self.losses[-1] if self.losses else None,
                "val_loss": self.val_loss, "tokens": self.step * tokens_per_step, "tokens_per_s": tps,
                "mfu": self.mfu(tps), "run_dir": str(self.run_dir), "world": self.place.world,
                "device": str(self.place.device), "params": self.model.num_params(),
                "loss_digest": loss_digest(self.losses), "shares": self.balancer.shares(),
                "elapsed_s": t_end - t_start}

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation against the local GPU's dense peak for the run's dtype (None on CPU)."""
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.place.world)

    def _sync(self) -> None:
        if self.place.device.type == "cuda":
            torch.cuda.synchronize(self.place.device)


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per line), and TensorBoard scalars if tensorboard is installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, rec: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """rich progress bar on stderr with loss, tok/s, MFU and ETA (rank 0 only)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, step: int, rec: dict) -> None:
        if self.bar is None:
            return
        mfu = f" mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else ""
        info = f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:,.0f} tok/s{mfu}"
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
