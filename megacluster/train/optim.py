"""The trainer's optimizer: AdamW with weight decay on matrices only, the global-norm clip, two implementations.

- `TorchAdamW` (`optim.master_weights = "off"`): torch's AdamW over the model's own fp32 weights (fused
  kernel on CUDA). Under bf16 autocast every forward casts each weight to bf16 and every backward casts each
  bf16 weight gradient back to fp32 (12 bytes per parameter per step), and the norm reads fp32 gradients.
- `MasterAdamW` (`"on"`; `"auto"`, the default, in compiled CUDA runs, where it was measured faster): the
  model's weights are kept in the compute dtype (`run.dtype`), as views of one flat buffer; the optimizer
  keeps one flat fp32 master copy with the moments and updates it in one elementwise pass that also rewrites
  the low-precision weights (Megatron's fp32 "main params" beside bf16
  model params; FSDP2's `param_dtype`). No cast in the forward or backward. Gradients stay in the compute
  dtype: the matmul weights' were bf16 matmul outputs before too, but the embedding lookup's (not autocast)
  and, under torch.compile, the norm gains' were fp32 and are now rounded to bf16. Several micro-batches are
  summed in fp32, as torch's AdamW path does (`accumulate`: each one's gradients are added into an fp32 flat
  buffer, with several workers the all-reduce buffer itself, and released: 10 bytes per parameter per extra
  micro-batch). A single micro-batch's gradients are copied into the fp32 all-reduce buffer (world > 1); with
  one worker they are read where they are by two Triton kernels (`optim.update_kernel`, CUDA: kernels.BlockTable)
  or gathered into one flat buffer. With fp32 compute the model's weights *are* the master (no copy). Each view starts where the previous
  one ends: 16-byte aligned when sizes are multiples of 8 elements (every preset; an odd d_model would give
  misaligned norm gains, slower kernels).

Both keep weights, checkpoints and state dicts in the same form: named fp32 weights, and torch AdamW's state
dict (two param groups, decayed matrices then the rest; per parameter `step`, `exp_avg`, `exp_avg_sq`). So a
run can be resumed with the other implementation. On resume both keep this run's hyperparameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import kernels
from ..config import OptimConfig


def decay_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters with weight decay (matrices) and without (norm gains), each in model order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all gradients, in fp32, from per-tensor norms (one multi-tensor kernel): for gradients of
    one dtype the same kernels for any world size and for both optimizers (but MasterAdamW's in-place step,
    `optim.update_kernel`, sums squares in its own kernel). bf16 gradients are summed in fp32
    (torch's default would round each tensor's norm to bf16); fp32 ones take the default call, the one measured
    in benchmarks/RESULTS.md."""
    if grads[0].dtype == torch.float32:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def clip_factor(norm: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """What to divide every gradient by so that the global norm is at most grad_clip (>= 1; 0-d, no sync)."""
    return ((norm + 1e-6) / grad_clip).clamp(min=1.0)


def on_for_compiled_cuda(choice: str, device: torch.device, compiled: bool) -> bool:
    """An on | off | auto switch whose auto means on where it was measured to be faster: compiled, on CUDA."""
    return choice == "on" or (choice == "auto" and compiled and device.type == "cuda")


def build(model: torch.nn.Module, o: OptimConfig, device: torch.device, dtype: torch.dtype,
          compiled: bool) -> TorchAdamW | MasterAdamW:
    if on_for_compiled_cuda(o.master_weights, device, compiled):
        return MasterAdamW(model, o, dtype, compiled, kernel=o.update_kernel == "auto")
    return TorchAdamW(model, o, device)


def copy_same_shape(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """dst.copy_(src), refusing another shape: copy_ would broadcast a (1, d) checkpoint tensor into (n, d)
    without a word (the model's load_state_dict, TorchAdamW's path, refuses it as well)."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: shape {tuple(src.shape)} in the checkpoint, {tuple(dst.shape)} in this model")
    dst.copy_(src)


class TorchAdamW:
    """torch.optim.AdamW over the model's parameters, fused on CUDA. `params`: the decayed ones, then the rest
    (MasterAdamW's order), so both sum the global norm in one order: a sum of squares in another order can differ
    in the last bit, and did on one CPU."""

    reads_reduced = False  # with several ranks it reads p.grad, pointed at the reduced sums

    def __init__(self, model: torch.nn.Module, o: OptimConfig, device: torch.device):
        self.model, self.cfg = model, o
        decay, rest = decay_split(model)
        self.params = decay + rest
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")

    # autograd adds later micro-batches into the fp32 p.grad itself: nothing to sum here
    def begin_step(self, acc_into: torch.Tensor | None = None) -> None:
        pass

    def accumulate(self) -> None:
        pass

    def take_accumulated(self) -> None:
        return None

    def step(self, lr: float, reduced: torch.Tensor | None = None) -> torch.Tensor:
        """Clip and update from p.grad (`reduced` unused: p.grad already view the reduced sums). Returns the
        global gradient norm (0-d, on the device). A parameter without a gradient is left alone, as torch's
        AdamW leaves it (MasterAdamW, one pass over all parameters, reads zeros for it instead)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = global_norm(grads)
        if self.cfg.grad_clip > 0:
            scale = clip_factor(norm, self.cfg.grad_clip)
            if self.opt.defaults.get("fused"):
                # the fused AdamW kernel divides each gradient by `grad_scale` as it reads it (the hook
                # torch.amp.GradScaler uses): clipping costs no pass of its own over the gradients
                self.opt.grad_scale = scale
            else:
                torch._foreach_div_(grads, scale)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return norm

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Load the moments and step counts; the hyperparameters and the kernel choice stay this run's. torch
        would take the saved param groups whole: a changed --set optim.beta2 would be ignored on resume, and a
        checkpoint written without the fused kernel (CPU, or MasterAdamW) would switch it off here (the clip's
        grad_scale then fails) and leave `step` on the host where the fused kernel reads it on the device."""
        if len(sd["param_groups"]) != len(self.opt.param_groups):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} param groups; this run has "
                             f"{len(self.opt.param_groups)}")
        ours = [{k: v for k, v in group.items() if k != "params"} for group in self.opt.param_groups]
        groups = [{**mine, "params": saved["params"]} for mine, saved in zip(ours, sd["param_groups"])]
        self.opt.load_state_dict({"state": sd["state"], "param_groups": groups})

    @torch.no_grad()
    def broadcast(self, src: int) -> None:
        """Every rank takes rank `src`'s weights and optimizer state (a fixed order of broadcasts)."""
        self._init_state()
        tensors = [p.data for p in self.model.parameters()]
        for group in self.opt.param_groups:
            for p in group["params"]:
                st = self.opt.state[p]
                tensors += [st["step"], st["exp_avg"], st["exp_avg_sq"]]
        for t in tensors:
            dist.broadcast(t, src=src)

    def _init_state(self) -> None:
        """AdamW's per-parameter state (zeros, step 0) where it does not exist yet, so every rank has the same
        tensors to broadcast into. Math unchanged: a zero state at step 0 is what AdamW creates lazily."""
        for group in self.opt.param_groups:
            fused = bool(group.get("fused"))
            for p in group["params"]:
                st = self.opt.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adamw_update(master: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor | None, clip: torch.Tensor, decay: torch.Tensor, step_size: torch.Tensor,
                 bc2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW update of flat fp32 `master` (in place) from `grad` (any float dtype), writing the result
    rounded to out's dtype into `out` when given. The arithmetic is torch AdamW's (single-tensor path), op by op
    (run eagerly in fp32 it gives the same bits; compiled, multiply-adds may contract into FMAs: last bits):
    decay = 1 - lr*wd, step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t), all 0-d tensors so a
    compiled version takes new values every step without recompiling. Elementwise only: compiled, one kernel
    that reads 14 bytes per parameter with bf16 grads and writes 14 with a bf16 `out` (fp32 master, m, v)."""
    g = grad.float() / clip
    master.mul_(decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    master.sub_(step_size * m / denom)
    if out is not None:
        out.copy_(master)


class MasterAdamW:
    """AdamW over one flat fp32 master copy; the model's parameters become views of one flat buffer in the
    compute dtype (or of the master itself when that is fp32). `params` is the flat order: decayed matrices
    first, then the rest, each in model order, so the two weight-decay groups are two contiguous segments."""

    reads_reduced = True  # with several ranks it reads the flat all-reduce buffer (laid out in `params` order)

    def __init__(self, model: torch.nn.Module, o: OptimConfig, dtype: torch.dtype, compiled: bool,
                 kernel: bool = False):
        self.model, self.cfg = model, o
        decay, rest = decay_split(model)
        self.params = decay + rest
        self.n = sum(p.numel() for p in self.params)
        self.n_decay = sum(p.numel() for p in decay)
        self.k_decay = len(decay)  # parameters in the first param group
        device = self.params[0].device
        with torch.no_grad():
            self.master = torch.cat([p.detach().reshape(-1).float() for p in self.params])  # (n,) fp32
        self.m = torch.zeros_like(self.master)
        self.v = torch.zeros_like(self.master)
        self.t = 0  # steps taken (a host int: bias corrections need no device read)
        # what the model computes with: the master itself (fp32) or a flat low-precision copy of it
        self.flat = self.master if dtype == torch.float32 else self.master.to(dtype)
        self.grad_buf: torch.Tensor | None = None  # world 1: the gathered gradients, in the compute dtype
        self.acc: torch.Tensor | None = None  # fp32 sum of this step's micro-batches so far (with several)
        self.own_acc: torch.Tensor | None = None  # acc's buffer when the step names none (world 1)
        self.acc_count = 0  # micro-batches summed into acc this step
        self._view_cache: dict[int, list[torch.Tensor]] = {}
        for p, view in zip(self.params, self._make_views(self.flat)):
            p.data = view
        # dynamic sizes: one graph for both segments and any model (the compile cache is per function, shared
        # by every instance in the process: static sizes would hit the recompile limit after a few models)
        self.update = torch.compile(adamw_update, dynamic=True) if compiled else adamw_update
        # the step's scalars live on the device and are refilled by value (a fill kernel, no host sync)
        self.scalars = torch.zeros(3, device=device)  # decay, step_size, bc2_sqrt
        self.one = torch.ones((), device=device)  # the clip factor when clipping is off
        self.names = self._names()
        # `kernel` (optim.update_kernel): where Triton runs, the steps that would gather p.grad (one worker, nothing
        # summed in `acc`) take the norm and the update straight from p.grad instead (kernels.BlockTable)
        sizes = [p.numel() for p in self.params]
        self.table = kernels.BlockTable(sizes, self.flat.dtype, device) if (
            kernel and kernels.available(self.master) and not any(n % 8 for n in sizes)) else None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a flat tensor in `params` layout. Kept for our own buffers, which live as long
        as we do (~300 views cost the host a fraction of a millisecond every step otherwise); made anew for
        others (the all-reduce buffer: a cache would keep a replaced one alive)."""
        owned = (self.master, self.m, self.v, self.flat, self.grad_buf, self.own_acc)
        if not any(flat is t for t in owned):
            return self._make_views(flat)
        if id(flat) not in self._view_cache:
            self._view_cache[id(flat)] = self._make_views(flat)
        return self._view_cache[id(flat)]

    def _make_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def _names(self) -> dict[str, int]:
        """State-dict key -> index into params (tied weights: both names point at the one parameter)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return {name: index[id(t)] for name, t in self.model.state_dict(keep_vars=True).items() if id(t) in index}

    def begin_step(self, acc_into: torch.Tensor | None = None) -> None:
        """A new step: no micro-batch summed yet. `acc_into`: an fp32 flat tensor in `params` layout to sum
        micro-batches in (with several workers the all-reduce buffer itself: no buffer of our own, no copy)."""
        self.acc_count = 0
        self.acc = acc_into

    def _grads(self) -> list[torch.Tensor]:
        """p.grad in `params` order, zeros for a parameter without one (then all released)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    @torch.no_grad()
    def accumulate(self) -> None:
        """After a micro-batch that more follow in this step: its gradients into the fp32 sum, p.grad released
        (summed in bf16 p.grad instead, each addition would round to 8 bits of mantissa). With fp32 weights
        autograd already sums in fp32 p.grad, as for torch's AdamW: nothing to do."""
        if self.flat is self.master:
            return
        if self.acc is None:
            if self.own_acc is None:
                self.own_acc = torch.empty_like(self.master)
            self.acc = self.own_acc
        views = self.views(self.acc)
        if self.acc_count == 0:
            torch._foreach_copy_(views, self._grads())
        else:
            torch._foreach_add_(views, self._grads())
        self.acc_count += 1

    def take_accumulated(self) -> torch.Tensor | None:
        """The step's fp32 gradient sum including the last micro-batch's p.grad, if earlier ones were
        accumulated; else None (the gradients are all in p.grad). It is the `acc_into` of begin_step if given."""
        if self.acc_count == 0:
            return None
        self.accumulate()
        self.acc_count = 0
        return self.acc

    def gather(self) -> torch.Tensor:
        """World 1: the fresh gradients into one flat buffer in their own dtype (one kernel); p.grad are
        released. A parameter without a gradient contributes zeros (so it is still decayed and its moments
        decay, unlike torch's AdamW, which skips it; as FlatGrads does with several workers for both)."""
        if self.grad_buf is None:
            self.grad_buf = torch.empty(self.n, dtype=self.flat.dtype, device=self.master.device)
        torch.cat([g.reshape(-1) for g in self._grads()], out=self.grad_buf)
        return self.grad_buf

    @torch.no_grad()
    def step(self, lr: float, reduced: torch.Tensor | None = None) -> torch.Tensor:
        """Clip and update. `reduced`: the flat all-reduced gradients in `params` order (world > 1); None:
        the accumulated sum, or gather p.grad. Returns the global gradient norm (0-d, on the device)."""
        if reduced is None:
            reduced = self.take_accumulated()
        if reduced is None and self.table is not None:
            return self._step_in_place(lr)
        grad = reduced if reduced is not None else self.gather()
        norm = global_norm(self.views(grad))
        clip, step_size, bc2_sqrt = self._advance(norm, lr)
        o = self.cfg
        out = None if self.flat is self.master else self.flat
        for lo, hi, wd in ((0, self.n_decay, o.weight_decay), (self.n_decay, self.n, 0.0)):
            if hi == lo:
                continue
            s = self.scalars
            s[0].fill_(1 - lr * wd), s[1].fill_(step_size), s[2].fill_(bc2_sqrt)
            self.update(self.master[lo:hi], grad[lo:hi], self.m[lo:hi], self.v[lo:hi],
                        None if out is None else out[lo:hi], clip, s[0], s[1], s[2], o.beta1, o.beta2, o.eps)
        return norm

    def _step_in_place(self, lr: float) -> torch.Tensor:
        """step() without the gather: two kernels read each p.grad where autograd wrote it, one for the sum of
        squares (the clip's norm), one for the update of both parameter groups. Per step at 1.5B that saves the
        gather's 6 GB of traffic and the per-tensor norm launches (benchmarks/RESULTS.md)."""
        grads = self.table.point_at(self._grads())  # held until both kernels are queued
        norm = self.table.grad_sumsq().sqrt()
        clip, step_size, bc2_sqrt = self._advance(norm, lr)
        o = self.cfg
        self.table.adamw(self.master, self.m, self.v, None if self.flat is self.master else self.flat, clip,
                         self.k_decay, 1 - lr * o.weight_decay, step_size, bc2_sqrt, o.beta1, o.beta2, o.eps)
        del grads
        return norm

    def _advance(self, norm: torch.Tensor, lr: float) -> tuple[torch.Tensor, float, float]:
        """Count the step; its clip factor (0-d, on the device), step size and sqrt of the second bias
        correction (host floats)."""
        o = self.cfg
        self.t += 1
        clip = clip_factor(norm, o.grad_clip) if o.grad_clip > 0 else self.one
        return clip, lr / (1 - o.beta1 ** self.t), math.sqrt(1 - o.beta2 ** self.t)

    # ---- checkpoints and state transfer: the same forms as TorchAdamW's ----
    def weights(self) -> dict[str, torch.Tensor]:
        """Named fp32 weights (the master), as the model's state dict would name them."""
        views = self.views(self.master)
        return {name: views[i] for name, i in self.names.items()}

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(weights))
        unexpected = sorted(set(weights) - set(self.names))
        if missing or unexpected:
            raise RuntimeError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
        views = self.views(self.master)
        for name, i in self.names.items():
            copy_same_shape(views[i], weights[name], name)
        self._refresh()

    def _refresh(self) -> None:
        if self.flat is not self.master:
            self.flat.copy_(self.master)

    def _groups(self) -> list[dict]:
        o, k = self.cfg, self.k_decay
        common = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "amsgrad": False, "maximize": False,
                  "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                  "decoupled_weight_decay": True}
        return [{**common, "weight_decay": o.weight_decay, "params": list(range(k))},
                {**common, "weight_decay": 0.0, "params": list(range(k, len(self.params)))}]

    def state_dict(self) -> dict:
        """torch AdamW's form (param index = position in `params`); the moments are views of the flat state."""
        if self.t == 0:
            return {"state": {}, "param_groups": self._groups()}
        m, v = self.views(self.m), self.views(self.v)
        state = {i: {"step": torch.tensor(float(self.t)), "exp_avg": m[i], "exp_avg_sq": v[i]}
                 for i in range(len(self.params))}
        return {"state": state, "param_groups": self._groups()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """The moments and the step count; the hyperparameters stay this run's config (as TorchAdamW's)."""
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        if sizes != [len(g["params"]) for g in self._groups()]:
            raise ValueError(f"optimizer state has param groups of {sizes} parameters; this model needs "
                             f"{[len(g['params']) for g in self._groups()]}")
        state = sd["state"]
        if not state:
            self.t = 0
            self.m.zero_(), self.v.zero_()
            return
        order = [i for g in sd["param_groups"] for i in g["params"]]  # saved index of our param j
        for j, (m, v) in enumerate(zip(self.views(self.m), self.views(self.v))):
            st = state[order[j]]
            for dst, key in ((m, "exp_avg"), (v, "exp_avg_sq")):
                copy_same_shape(dst, st[key], f"optimizer state {order[j]}.{key}")
        self.t = int(float(state[order[0]]["step"]))

    @torch.no_grad()
    def broadcast(self, src: int) -> None:
        """Every rank takes rank `src`'s master, moments and step count (a fixed order of broadcasts)."""
        step = torch.tensor(float(self.t), device=self.master.device)
        for t in (self.master, self.m, self.v, step):
            dist.broadcast(t, src=src)
        self.t = int(step.item())
        self._refresh()
