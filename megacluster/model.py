"""A Llama-style decoder in one file: RoPE, RMSNorm, SwiGLU, grouped-query attention through
`scaled_dot_product_attention`, tied or untied output head.

No distributed, logging or file code lives here: the trainer wraps and places the model after building it.
Shapes in comments: B batch, T sequence, d model width, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig, ffn_hidden, layer_matmul_params


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), the figure MFU is computed from.

        F = 6 * N_matmul + 12 * L * T * (nh * hs)

    N_matmul counts every weight that multiplies an activation: per layer the q/k/v projections
    d*(nh + 2*nkv)*hs, the output projection (nh*hs)*d and the SwiGLU gate/up/down 3*d*f; plus the output
    head d*V (counted whether or not it is tied to the embedding; the embedding lookup itself is free).
    A weight costs 2 FLOPs per token forward (multiply + add) and 4 backward: hence 6N.
    Attention scores QK^T and the weighted sum AV each cost 2*T*hs per head per token forward,
    4*T*nh*hs together, times 3 for forward + backward: 12*L*T*nh*hs. As in PaLM, nanoGPT and Megatron,
    the full T x T square is counted even though causal kernels skip the upper half; norms, RoPE,
    softmax and the loss are not counted.
    """
    T = m.seq_len if seq_len is None else seq_len
    hs = m.d_model // m.n_head
    n_matmul = m.n_layer * layer_matmul_params(m) + m.d_model * m.vocab_size
    return 6 * n_matmul + 12 * m.n_layer * T * m.n_head * hs


def rope_cache(seq_len: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (T, hs/2) for rotary position embeddings (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., j], x[..., j + hs/2]) of x: (B, T, h, hs) by position; cos/sin: (T, hs/2).

    Chunk and cat, not x * cos + swap_halves(x) * sin: the same products and sums, but on the H200 Inductor made
    the swap form's backward (pointwise, merged with the q/k/v gradient cat) one kernel 3.7-4.8x slower than
    this form's two (7.6 vs 1.6 ms per step at 124M; benchmarks/RESULTS.md).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # broadcast over B and heads
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def xent_with_grad(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
    """(sum of the cross-entropies, 0-d; its gradient softmax - onehot (N, V) in `dtype`) from fp32 logits (N, V),
    which it overwrites; compiled, one Inductor reduction (kernels.softmax_xent is the same math by hand)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
    loss = (lse.squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]  # (N, V)
    # in place over the fp32 logits: eager (compile off) keeps one fp32 (N, V) buffer instead of four; under
    # compile the in-place ops are functionalized into the one fused kernel
    return loss, logits.sub_(lse).exp_().sub_(onehot.to(logits.dtype)).to(dtype)


class HeadLoss(torch.autograd.Function):
    """Output head + summed cross-entropy, with the logits gradient computed in the forward.

    The plain path (`logits = head(h)`, then `F.cross_entropy`) reads the (N, V) logits twice: once in the
    loss forward and again in its backward, which needs the incoming gradient before it can write its own.
    Here the gradient of the *unscaled* sum, softmax(logits) - onehot(targets), is written by the same pass
    that computes the loss, and the incoming scalar (the trainer's 1/global-tokens) is applied to the two
    (N, d) and (V, d) matmul outputs in the backward instead: one pass over the logits less, same math.
    Under torch.compile the partitioner then moves the head's two gradient matmuls into the forward graph, and
    no (N, V) tensor is kept for the backward; eager, the (N, V) gradient is kept in place of the logits.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                kernel: bool = False) -> torch.Tensor:
        # h: (N, d) final-norm output, weight: (V, d) head, targets: (N,) token ids -> 0-d fp32 loss sum
        w = weight.to(h.dtype)  # bf16 under autocast: the backward runs outside autocast and needs it cast
        if kernel:  # the same math in one Triton kernel that reads the logits once (kernels.softmax_xent)
            rows, dlogits = kernels.softmax_xent(h @ w.t(), targets)
            ctx.save_for_backward(h, w, dlogits)
            return rows.sum()
        loss, dlogits = xent_with_grad((h @ w.t()).float(), targets, h.dtype)  # the matmul in h's dtype
        ctx.save_for_backward(h, w, dlogits)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # g: 0-d, d(total)/d(loss)
        h, w, dlogits = ctx.saved_tensors
        dh = (dlogits @ w) * g  # (N, d)
        dw = (dlogits.t() @ h) * g  # (V, d)
        return dh, dw, None, None  # autograd casts dw to the weight's dtype (fp32 weights under bf16 autocast)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # bf16 stream: bf16 weight


def split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
    """The fused projection's output (B, T, (nh + 2 nkv) hs) -> RoPE'd q (B, T, nh, hs), k and v (B, T, nkv, hs)."""
    B, T, C = qkv.shape
    hs = C // (nh + 2 * nkv)
    q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    return apply_rope(q.view(B, T, nh, hs), cos, sin), apply_rope(k.view(B, T, nkv, hs), cos, sin), \
        v.view(B, T, nkv, hs)


class SplitRope(torch.autograd.Function):
    """split_rope with the backward as one Triton kernel (kernels.rope_qkv_backward): RoPE's backward for q and
    k and the assembly of d qkv, which Inductor writes as two kernels (RoPE's, then a cat); `run.rope_kernel`."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int):
        ctx.save_for_backward(cos, sin)
        return split_rope(qkv, cos, sin, nh, nkv)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return kernels.rope_qkv_backward(dq, dk, dv, cos, sin), None, None, None, None


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, rope_kernel: bool = False):
        super().__init__()
        self.nh, self.nkv = m.n_head, (m.n_kv_head or m.n_head)
        self.hs = m.d_model // m.n_head
        self.rope_kernel = rope_kernel  # SplitRope's one-kernel backward where it can run (kernels.py)
        # one fused projection for q, k, v: fewer, larger matmuls
        self.qkv = nn.Linear(m.d_model, (self.nh + 2 * self.nkv) * self.hs, bias=False)
        self.proj = nn.Linear(self.nh * self.hs, m.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hs)
        if self.rope_kernel and kernels.available(qkv):
            q, k, v = SplitRope.apply(qkv, cos, sin, self.nh, self.nkv)
        else:
            q, k, v = split_rope(qkv, cos, sin, self.nh, self.nkv)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hs), the layout SDPA wants
        if self.nkv != self.nh:  # grouped-query attention: each kv head serves nh/nkv query heads
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]: (B, T, 2f) -> (B, T, f)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUKernel(torch.autograd.Function):
    """swiglu with the backward as one Triton kernel (kernels.swiglu_backward): d gate and d up written in one pass,
    where Inductor writes their cat as a pointwise kernel that reads every input per output element."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu(gate_up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return kernels.swiglu_backward(gate_up.contiguous(), dh.contiguous().to(gate_up.dtype))


class SwiGLU(nn.Module):
    def __init__(self, m: ModelConfig, kernel: bool = False):
        super().__init__()
        self.hidden = ffn_hidden(m)
        self.kernel = kernel  # the backward as one Triton kernel where it can run (kernels.py): same math
        self.gate_up = nn.Linear(m.d_model, 2 * self.hidden, bias=False)  # gate and up fused in one matmul
        self.down = nn.Linear(self.hidden, m.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # (B, T, 2f)
        if self.kernel and kernels.available(gate_up):
            return self.down(SwiGLUKernel.apply(gate_up))
        return self.down(swiglu(gate_up))


class Block(nn.Module):
    def __init__(self, m: ModelConfig, swiglu_kernel: bool = False, rope_kernel: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m, rope_kernel)
        self.mlp_norm = RMSNorm(m.d_model, m.norm_eps)
        self.mlp = SwiGLU(m, swiglu_kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer. `forward(idx)` -> logits (B, T, V); `forward(idx, targets)` -> summed loss.

    The loss is the *sum* of token cross-entropies (fp32): the trainer divides by the global token count so
    that any split of the batch over workers and micro-batches gives the same gradient.
    """

    def __init__(self, m: ModelConfig, fused_loss: bool = False, swiglu_kernel: bool = False,
                 rope_kernel: bool = False, loss_kernel: bool = False):
        super().__init__()
        self.config = m
        self.fused_loss = fused_loss  # training loss through HeadLoss (same value, one pass less)
        self.loss_kernel = loss_kernel  # HeadLoss's softmax as one Triton kernel where it can run (kernels.py)
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(Block(m, swiglu_kernel, rope_kernel) for _ in range(m.n_layer))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_cache(m.seq_len, m.d_model // m.n_head, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std); residual output projections scaled by 1/sqrt(2L) (one per sublayer)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at 1
            scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("proj.weight", "down.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def runs_loss_kernel(self, x: torch.Tensor) -> bool:
        """Whether a training forward on `x`'s device takes the loss kernel (the trainer reports it as resolved)."""
        return self.fused_loss and self.loss_kernel and kernels.available(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter, counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape  # (B, T) token ids
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)  # (B, T, d)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype (Megatron's default): every norm and residual add then
            # moves half the bytes; the norms still compute in fp32 internally
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)  # (B, T, d)
        if targets is not None and self.fused_loss and torch.is_grad_enabled():
            return HeadLoss.apply(x.view(B * T, -1), self.head.weight, targets.reshape(B * T), self.runs_loss_kernel(x))
        logits = self.head(x)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), reduction="sum")
