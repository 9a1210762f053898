"""Hand-written GPU kernels (Triton) for the model, where Inductor's own code was measured slower.

`swiglu(gate_up)` = silu(gate) * up for gate_up = [gate | up] (..., 2f) -> (..., f), with a backward that is one
Triton kernel. Inductor writes that backward, d gate_up = cat(d gate, d up), as a pointwise cat: every output
element is computed through masked loads of gate, up and d h, each one's own branch (benchmarks/RESULTS.md has
its time). The kernel here reads gate, up and d h once per element pair and writes both halves: 3 reads and 2
writes of f values per row, the least the gradient needs. The math is silu's derivative in fp32, rounded once:

    s = sigmoid(g);  d up = dh * g * s;  d gate = dh * u * s * (1 + g * (1 - s))

Triton is only on GPU machines: `available()` says whether the kernel can run for a tensor; the model falls back
to plain autograd (Inductor's kernel when compiled) otherwise. Registered as a torch.library triton_op, so
torch.compile keeps it in the compiled graph as a user kernel (no graph break).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # (..., 2f) -> (..., f)
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up.contiguous(), dh.contiguous().to(gate_up.dtype))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, its backward one Triton kernel (CUDA tensors, Triton installed: see `available`)."""
    return SwiGLU.apply(gate_up)
