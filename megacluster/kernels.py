"""Hand-written GPU kernels (Triton) for the model, where Inductor's own code was measured slower.

`swiglu_backward(gate_up, dh)` = d gate_up for model.SwiGLUKernel, whose forward is silu(gate) * up for
gate_up = [gate | up] (..., 2f) -> (..., f). Inductor writes this backward, d gate_up = cat(d gate, d up), as a
pointwise cat: every output element is computed through masked loads of gate, up and d h, each one's own branch
(benchmarks/RESULTS.md has its time). The kernel here reads gate, up and d h once per element pair and writes both halves: 3 reads and 2
writes of f values per row, the least the gradient needs. The math is silu's derivative in fp32, rounded once:

    s = sigmoid(g);  d up = dh * g * s;  d gate = dh * u * s * (1 + g * (1 - s))

`rope_qkv_backward(dq, dk, dv, cos, sin)` = d qkv for model.SplitRope (split of the fused q/k/v projection, then
RoPE on q and k): the rotation's transpose for q and k and the copy of dv, written straight into d qkv, one
kernel where Inductor writes two (RoPE's backward, then the cat): at 1.5B on the H200 1.95 ms per step against
1.79 + 1.66 (benchmarks/RESULTS.md).

`softmax_xent(logits, targets)` = (loss per row, softmax - onehot) for model.HeadLoss (`run.loss_kernel`): the
fused loss's softmax pass, where Inductor's reduction reads each row of logits twice from memory; here the second
read should come from L2 (the kernel's comment says how). Written without a device: not yet timed.

`BlockTable` holds the optimizer's two kernels over gradients left where autograd wrote them: the sum of squares
for the clip's norm and the AdamW update (train/optim.py, `optim.update_kernel`).

Triton is only on GPU machines: `available()` says whether the kernels can run for a tensor; the model falls back
to plain autograd (Inductor's kernels when compiled) otherwise. Registered as torch.library triton_ops, so
torch.compile keeps them in the compiled graph as user kernels (no graph break).
"""

from __future__ import annotations

import os

import torch


def _wanted() -> bool:
    """Whether to define the kernels: on a GPU build of torch, or where asked (TRITON_INTERPRET=1 runs them through
    Triton's interpreter; MEGACLUSTER_TRITON=1 defines them for tracing on a CPU build, tests/test_kernels.py).
    A CPU build can never run them (no tensor is on a GPU), and `triton_op` imports Inductor and Dynamo: 2.5 s of
    every process's start on a 2-core machine, a replacement worker's too, wherever Triton is installed."""
    gpu_build = torch.version.cuda is not None or torch.version.hip is not None
    return gpu_build or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MEGACLUSTER_TRITON") == "1"


triton = None  # CPU machines, or no Triton: the model uses the plain path
if _wanted():
    try:
        import triton
        import triton.language as tl
        from torch.library import triton_op, wrap_triton
    except ImportError:
        triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _swiglu_backward_kernel(gu_ptr, dh_ptr, out_ptr, rows, f, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # gu, out: (rows, 2f) contiguous; dh: (rows, f) contiguous. One (BLOCK_R, BLOCK_C) tile of columns < f.
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (r < rows) & (c < f)
        left = r * (2 * f) + c  # gate's (and d gate's) element; up's is f further
        g = tl.load(gu_ptr + left, mask=mask).to(tl.float32)
        u = tl.load(gu_ptr + left + f, mask=mask).to(tl.float32)
        dh = tl.load(dh_ptr + r * f + c, mask=mask).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(out_ptr + left, (dh * u * s * (1 + g * (1 - s))).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + left + f, (dh * g * s).to(out_ptr.dtype.element_ty), mask=mask)

    @triton_op("megacluster::swiglu_backward", mutates_args={})
    def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
        """d gate_up (..., 2f) from gate_up (..., 2f) and d h (..., f), contiguous, of one dtype."""
        f = dh.shape[-1]
        out = torch.empty_like(gate_up)
        rows = dh.numel() // f
        block_r, block_c = 16, 128

        def grid(meta):
            return triton.cdiv(rows, block_r), triton.cdiv(f, block_c)

        wrap_triton(_swiglu_backward_kernel)[grid](gate_up, dh, out, rows, f, BLOCK_R=block_r, BLOCK_C=block_c,
                                                   num_warps=4)
        return out


    @triton.jit
    def _rope_qkv_backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, out_ptr, T, nh, nkv,
                                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                                  HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
        # one (BLOCK_T positions, one head, one sequence) tile: out[b, t, head*hs : (head+1)*hs], hs = 2*HALF
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None]
        head = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        j = tl.arange(0, BLOCK_J)[None, :]
        mask = (t < T) & (j < HALF)
        out = out_ptr + (b * T + t) * ((nh + 2 * nkv) * 2 * HALF) + head * (2 * HALF) + j
        if head < nh + nkv:  # q or k: the rotation's transpose, (dy1, dy2) -> (dy1 c + dy2 s, dy2 c - dy1 s)
            if head < nh:
                src = dq_ptr + b * sqb + t * sqt + head * sqh + j
            else:
                src = dk_ptr + b * skb + t * skt + (head - nh) * skh + j
            g1 = tl.load(src, mask=mask).to(tl.float32)
            g2 = tl.load(src + HALF, mask=mask).to(tl.float32)
            c = tl.load(cos_ptr + t * HALF + j, mask=mask)
            s = tl.load(sin_ptr + t * HALF + j, mask=mask)
            tl.store(out, (g1 * c + g2 * s).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out + HALF, (g2 * c - g1 * s).to(out_ptr.dtype.element_ty), mask=mask)
        else:  # v: copied into its place
            src = dv_ptr + b * svb + t * svt + (head - nh - nkv) * svh + j
            tl.store(out, tl.load(src, mask=mask), mask=mask)
            tl.store(out + HALF, tl.load(src + HALF, mask=mask), mask=mask)

    @triton_op("megacluster::rope_qkv_backward", mutates_args={})
    def rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
        """d qkv (B, T, (nh + 2 nkv) hs) from the gradients of RoPE'd q (B, T, nh, hs), k and v (B, T, nkv, hs),
        any strides with unit stride in the last dim; cos/sin (T, hs/2) fp32 contiguous."""
        B, T, nh, hs = dq.shape
        nkv = dk.shape[2]
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        out = torch.empty((B, T, (nh + 2 * nkv) * hs), dtype=dq.dtype, device=dq.device)
        block_t = 32

        def grid(meta):
            return triton.cdiv(T, block_t), nh + 2 * nkv, B

        wrap_triton(_rope_qkv_backward_kernel)[grid](
            dq, dk, dv, cos, sin, out, T, nh, nkv, dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0),
            dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), HALF=hs // 2, BLOCK_T=block_t,
            BLOCK_J=triton.next_power_of_2(hs // 2), num_warps=4)
        return out


# ---- the loss: softmax cross-entropy and its logits gradient in one kernel (model.HeadLoss, run.loss_kernel) ----

if triton is not None:
    @triton.jit
    def _xent_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, rows, V, BLOCK: tl.constexpr):
        # logits, grad: (rows, V) contiguous; targets: (rows,) int; loss: (rows,) fp32. Persistent: program p takes
        # rows p, p + P, ... Pass 1 reads a row for its log-sum-exp (online: running max m, running sum s of
        # exp(x - m)), the next chunk's load issued before this chunk's reductions; pass 2 reads it again, last
        # chunk first, and writes exp(x - lse) - onehot. Only P rows lie between their two passes at any time (P x
        # V x 2 B: 26 MB for 264 programs at V = 50,304 in bf16, within a 50 MB L2), and pass 1 asks the cache to
        # keep what it read (evict_last), so pass 2 should find its row in L2: one read of the logits from memory.
        cols = tl.arange(0, BLOCK)
        n_blocks = tl.cdiv(V, BLOCK)
        for row in tl.range(tl.program_id(0), rows, tl.num_programs(0)):
            base = tl.cast(row, tl.int64) * V  # (rows x V can pass 2**31)
            src, dst = logits_ptr + base, grad_ptr + base
            m = tl.full([], float("-inf"), tl.float32)
            s = tl.full([], 0.0, tl.float32)
            x = tl.load(src + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            for b in range(1, n_blocks + 1):  # at b = n_blocks the load is all masked: no traffic
                c = b * BLOCK + cols
                x_next = tl.load(src + c, mask=c < V, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
                x = x_next
            lse = m + tl.log(s)
            t = tl.load(targets_ptr + row)
            tl.store(loss_ptr + row, lse - tl.load(src + t).to(tl.float32))
            for b in range(0, n_blocks):
                c = (n_blocks - 1 - b) * BLOCK + cols
                x = tl.load(src + c, mask=c < V, other=0.0, eviction_policy="evict_first").to(tl.float32)
                g = tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)
                tl.store(dst + c, g.to(dst.dtype.element_ty), mask=c < V, eviction_policy="evict_first")

    @triton_op("megacluster::softmax_xent", mutates_args={})
    def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per row (N,) fp32, d(sum of the losses)/d logits = softmax - onehot (N, V) in logits' dtype) from
        logits (N, V) and targets (N,) ids in [0, V). The softmax in fp32, the gradient rounded once."""
        logits, targets = logits.contiguous(), targets.contiguous()  # the kernel reads both as dense rows
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        block, warps, per_sm = XENT_TILE
        programs = per_sm * (torch.cuda.get_device_properties(logits.device).multi_processor_count
                             if logits.is_cuda else 2)

        def grid(meta):
            return (programs,)

        wrap_triton(_xent_kernel)[grid](logits, targets, loss, grad, N, V, BLOCK=block, num_warps=warps)
        return loss, grad


# the loss kernel's tile: elements a chunk, warps a program, programs an SM. 8192 x 16 (16 elements a thread: two
# 16-byte loads per pass) at 57 registers a thread fits two programs an SM; not yet timed on a GPU (written
# 2026-12-07 without one; benchmarks/loss_kernel.py --tiles times others)
XENT_TILE = (8192, 16, 2)


# ---- the optimizer's two passes over gradients left where autograd put them (train/optim.py, MasterAdamW) ----
# A "block table" cuts every parameter into blocks of BLOCK elements (its last block masked): block b is
# elements [off[b], off[b] + BLOCK) of parameter pidx[b]. The gradients are found through a table of their
# device addresses (int64), so neither pass needs them gathered into one flat buffer first.

if triton is not None:
    @triton.jit
    def _grad_block(base_ptr, rel_ptr, pidx_ptr, off_ptr, numel_ptr, blk, BLOCK: tl.constexpr):
        """Block blk: (parameter index, element indices in it, mask, fp32 gradient values). Gradient i starts
        rel[i] elements after base_ptr: pointer arithmetic from an argument, so that the compiler, told that rel
        and sizes are multiples of 8 elements and offsets of BLOCK, issues 16-byte vector loads (an address
        loaded from memory and cast to a pointer gets none: it could be misaligned)."""
        i = tl.load(pidx_ptr + blk)
        n = tl.multiple_of(tl.load(numel_ptr + i), 8)
        k = tl.multiple_of(tl.load(off_ptr + blk), BLOCK) + tl.arange(0, BLOCK)
        grad = base_ptr + tl.multiple_of(tl.load(rel_ptr + i), 8)
        mask = k < n
        return i, k, mask, tl.load(grad + k, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _grad_sumsq_kernel(base_ptr, rel_ptr, pidx_ptr, off_ptr, numel_ptr, partial_ptr, BLOCK: tl.constexpr,
                           GROUP: tl.constexpr):
        # GROUP consecutive blocks a program (the table is padded to a multiple of GROUP with empty blocks): a
        # program that reads one 2 KB block and stores one float spends most of its life starting and ending
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(GROUP):
            _, _, _, g = _grad_block(base_ptr, rel_ptr, pidx_ptr, off_ptr, numel_ptr, tl.program_id(0) * GROUP + j,
                                     BLOCK)
            acc += g * g
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))

    @triton.jit
    def _adamw_kernel(base_ptr, rel_ptr, pidx_ptr, off_ptr, numel_ptr, start_ptr, master_ptr, m_ptr, v_ptr, out_ptr,
                      clip_ptr, k_decay, decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
                      HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
        i, k, mask, g = _grad_block(base_ptr, rel_ptr, pidx_ptr, off_ptr, numel_ptr, tl.program_id(0), BLOCK)
        f = tl.multiple_of(tl.load(start_ptr + i), 8) + k  # the element's index in the flat master and moments
        g = tl.div_rn(g, tl.load(clip_ptr))
        # optim.adamw_update's arithmetic, op for op in fp32 (torch's lerp for a weight < 0.5, addcmul)
        p = tl.load(master_ptr + f, mask=mask) * tl.where(i < k_decay, decay, 1.0)
        m = tl.load(m_ptr + f, mask=mask)
        m = m + one_minus_beta1 * (g - m)
        v = tl.load(v_ptr + f, mask=mask) * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(master_ptr + f, p, mask=mask)
        tl.store(m_ptr + f, m, mask=mask)
        tl.store(v_ptr + f, v, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + f, p.to(out_ptr.dtype.element_ty), mask=mask)


class BlockTable:
    """The block table of parameters laid out one after another in a flat buffer, and the table of where their
    gradients are: each one's distance in elements from `base`, a small buffer of the gradients' dtype kept
    for the purpose. It is refreshed only when an address changes (the caching allocator hands autograd the
    same blocks step after step, so in steady state the host only compares ~300 integers)."""

    # elements per program and warps: 1024 x 4 (8 elements a thread) timed best of five tiles at 1.5B on the
    # H200 (optimizer step 11.7 ms; 2048 x 8: 12.0, 4096 x 8: 13.2; benchmarks/optim_step.py --tiles)
    BLOCK = 1024
    WARPS = 4
    # blocks a program in the sum of squares: 1 as measured; more is prepared, not yet timed on a GPU
    # (benchmarks/optim_step.py --tiles BLOCKxWARPSxGROUP)
    SUMSQ_GROUP = 1

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: torch.device):
        if any(n % 8 for n in sizes):
            raise ValueError("every size must be a multiple of 8 elements (vector loads)")
        pidx, off = [], []
        for i, n in enumerate(sizes):
            blocks = -(-n // self.BLOCK)
            pidx += [i] * blocks
            off += range(0, blocks * self.BLOCK, self.BLOCK)
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        self.dtype, self.sizes = dtype, list(sizes)
        self.blocks = len(pidx)  # the update's grid; the sum of squares reads empty blocks up to a whole group:
        self.group = self.SUMSQ_GROUP
        pad = -len(pidx) % self.group  # parameter 0 from an offset past its end (all masked)
        pidx += [0] * pad
        off += [-(-sizes[0] // self.BLOCK) * self.BLOCK] * pad
        self.pidx = torch.tensor(pidx, dtype=torch.int32, device=device)
        self.off = torch.tensor(off, dtype=torch.int64, device=device)
        self.numel = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.start = torch.tensor(starts, dtype=torch.int64, device=device)
        self.base = torch.zeros(8, dtype=dtype, device=device)  # allocator blocks: 16-byte aligned or more
        self.rel = torch.zeros(len(sizes), dtype=torch.int64, device=device)
        self._addrs: list[int] = []
        self.staging: dict[int, torch.Tensor] = {}  # gradient index -> where it is copied when the kernels cannot
        # read it as it is (kept: a fresh copy every step would move the address table every step)

    def point_at(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Point the table at these gradients (of `dtype`) and return what the kernels will read: the caller
        keeps it alive until they are queued. A gradient that is not contiguous or not 16-byte aligned is first
        copied into a buffer kept for it; the 1.5B kernel table on the H200 showed one such copy a step, then
        into a fresh tensor, and with it a second host-to-device copy: the table re-sent every step. The table
        goes up on the current stream, in order with the kernels, from pinned memory (from pageable memory it
        could make the host wait for the GPU)."""
        grads = list(grads)
        if [g.numel() for g in grads] != self.sizes or any(g.dtype != self.dtype for g in grads):
            raise ValueError(f"gradients must be {self.dtype} and of the table's sizes")  # checked every step:
            # a tensor of another dtype or size at a known address would be read as the old one
        for i, g in enumerate(grads):
            if not g.is_contiguous() or g.data_ptr() % 16:
                if i not in self.staging:
                    self.staging[i] = torch.empty(g.shape, dtype=g.dtype, device=g.device)
                grads[i] = self.staging[i].copy_(g)
        addrs = [g.data_ptr() for g in grads]
        if addrs != self._addrs:
            base, size = self.base.data_ptr(), self.base.element_size()
            host = torch.tensor([(a - base) // size for a in addrs], dtype=torch.int64)
            self.rel.copy_(host.pin_memory() if self.rel.is_cuda else host, non_blocking=True)
            self._addrs = addrs
        return grads

    def grad_sumsq(self) -> torch.Tensor:
        """Sum of squares of all gradients (fp32, 0-d): one partial per group of blocks, then their sum."""
        programs = self.pidx.numel() // self.group
        partial = torch.empty(programs, dtype=torch.float32, device=self.rel.device)
        _grad_sumsq_kernel[(programs,)](self.base, self.rel, self.pidx, self.off, self.numel, partial,
                                        BLOCK=self.BLOCK, GROUP=self.group, num_warps=self.WARPS)
        return partial.sum()

    def adamw(self, master: torch.Tensor, m: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
              clip: torch.Tensor, k_decay: int, decay: float, step_size: float, bc2_sqrt: float, beta1: float,
              beta2: float, eps: float) -> None:
        """optim.adamw_update over every parameter, each gradient read where it is: parameters [0, k_decay) are
        decayed by `decay` (1 - lr * wd), the rest not. The step's scalars are host floats: kernel arguments,
        no fill kernels and no recompiles."""
        _adamw_kernel[(self.blocks,)](self.base, self.rel, self.pidx, self.off, self.numel, self.start, master, m,
                                      v, master if out is None else out, clip, k_decay, decay, step_size,
                                      bc2_sqrt, 1 - beta1, beta2, 1 - beta2, eps, HAS_OUT=out is not None,
                                      BLOCK=self.BLOCK, num_warps=self.WARPS)
