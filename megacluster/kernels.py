"""Hand-written GPU kernels (Triton) for the model, where Inductor's own code was measured slower.

`swiglu_backward(gate_up, dh)` = d gate_up for model.SwiGLUKernel, whose forward is silu(gate) * up for
gate_up = [gate | up] (..., 2f) -> (..., f). Inductor writes this backward, d gate_up = cat(d gate, d up), as a
pointwise cat: every output element is computed through masked loads of gate, up and d h, each one's own branch
(benchmarks/RESULTS.md has its time). The kernel here reads gate, up and d h once per element pair and writes both halves: 3 reads and 2
writes of f values per row, the least the gradient needs. The math is silu's derivative in fp32, rounded once:

    s = sigmoid(g);  d up = dh * g * s;  d gate = dh * u * s * (1 + g * (1 - s))

`rope_qkv_backward(dq, dk, dv, cos, sin)` = d qkv for model.SplitRope (split of the fused q/k/v projection, then
RoPE on q and k): the rotation's transpose for q and k and the copy of dv, written straight into d qkv, one
kernel where Inductor writes two (RoPE's backward, then the cat). Written, not yet measured: `run.rope_kernel`
is off by default.

Triton is only on GPU machines: `available()` says whether the kernels can run for a tensor; the model falls back
to plain autograd (Inductor's kernels when compiled) otherwise. Registered as torch.library triton_ops, so
torch.compile keeps them in the compiled graph as user kernels (no graph break).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU machines: no Triton, the model uses the plain path
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
