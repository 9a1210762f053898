"""Kernel and collective timings for one GPU type: matmul (GEMM) efficiency by shape, attention, memory-bound
ops, NCCL-style collectives. Parameters come from `data/kernels.json` (vidur-style: measure once, plan on CPU).

A GPU entry may carry a ``measured`` grid written by ``benchmarks/matmul_curve.py``; then GEMM efficiency is
interpolated from it (log-space, trilinear) instead of the physical model. ``measured_like`` names a measured GPU
with the same die (the H200: the H100's), whose grid it uses.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..hardware import GPU, get_gpu


@lru_cache(maxsize=1)
def kernel_data() -> dict:
    return json.loads(resources.files("megacluster.plan").joinpath("data", "kernels.json").read_text())


@dataclass(kw_only=True, slots=True, frozen=True)
class Device:
    """One GPU type with everything the step-time model needs (times in s, bandwidths in bytes/s)."""
    gpu: GPU
    peak: float  # FLOP/s at the run's dtype
    sms: int
    gemm_eff_max: float  # fraction of peak for a large, well-shaped GEMM
    k_half: float  # reduction depth at which a GEMM reaches half of eff_max (operand-load latency)
    hbm_bw: float  # achievable HBM bytes/s
    launch_s: float  # per-kernel fixed cost, s
    flash_fwd_eff: float
    flash_bwd_eff: float
    attn_s_half: float  # sequence length at which flash attention reaches half its efficiency
    tiles: tuple  # ((tile_m, tile_n, relative efficiency), ...)
    measured: tuple | None  # (log2 m grid, log2 n grid, log2 k grid, efficiency array) or None

    def gemm_time(self, m: float, n: float, k: float, batch: float = 1.0) -> float:
        """Seconds for `batch` GEMMs (m x k) @ (k x n) at this dtype."""
        flops = 2.0 * m * n * k * batch
        eff = self.gemm_eff(m, n, k, batch)
        bytes_moved = 2.0 * (m * k + k * n + m * n) * batch  # 2-byte operands (fp8 still writes bf16)
        return max(flops / (self.peak * eff), bytes_moved / self.hbm_bw) + self.launch_s

    def gemm_eff(self, m: float, n: float, k: float, batch: float = 1.0) -> float:
        """Fraction of peak a GEMM of this shape reaches (compute-bound part)."""
        if self.measured is not None:  # the grid is of single GEMMs: a batch of b (m x n) outputs fills the GPU
            return _interp(self.gpu.name, m * batch, n, k)  # as one (b m x n) output does (same tiles, same k)
        return _tile_eff(self.tiles, self.sms, self.gemm_eff_max, self.k_half, m, n, k, batch)

    def flash_time(self, flops_fwd: float, seq: float) -> tuple[float, float]:
        """(fwd, bwd) seconds of fused attention doing `flops_fwd` in the forward (bwd does 2.5x: recomputes S)."""
        sat = seq / (seq + self.attn_s_half)
        fwd = flops_fwd / (self.peak * self.flash_fwd_eff * sat)
        bwd = 2.5 * flops_fwd / (self.peak * self.flash_bwd_eff * sat)
        return fwd + self.launch_s, bwd + 2 * self.launch_s

    def mem_time(self, nbytes: float) -> float:
        """Seconds to stream `nbytes` through HBM (elementwise / normalisation / optimizer kernels)."""
        return nbytes / self.hbm_bw


@lru_cache(maxsize=1 << 16)
def _tile_eff(tiles: tuple, sms: int, eff_max: float, k_half: float, m: float, n: float, k: float,
              batch: float) -> float:
    """The tile/wave model of `Device.gemm_eff`, memoised: a plan search asks for the same shapes thousands
    of times."""
    best = 0.0
    for tm, tn, rel in tiles:  # the library picks the tile with the best wave utilisation
        n_tiles = math.ceil(m / tm) * math.ceil(n / tn) * batch
        waves = math.ceil(n_tiles / sms)
        best = max(best, rel * n_tiles / (waves * sms))
    return eff_max * best * k / (k + k_half)


@lru_cache(maxsize=1 << 16)
def _interp(gpu_name: str, m: float, n: float, k: float) -> float:
    """Trilinear interpolation of the GPU's measured efficiency grid in log2(m, n, k), clamped to the grid's
    edges. Memoised on the GPU's name (hashing the grid itself on every call would cost more than the work)."""
    gm, gn, gk, eff = _measured_grid(gpu_name)
    idx, w = [], []
    for v, g in ((m, gm), (n, gn), (k, gk)):
        x = min(max(math.log2(max(v, 1.0)), g[0]), g[-1])
        j = min(max(bisect.bisect_left(g, x) - 1, 0), len(g) - 2)
        idx.append(j)
        w.append((x - g[j]) / (g[j + 1] - g[j]))
    out = 0.0
    for corner in range(8):
        bits = [(corner >> d) & 1 for d in range(3)]
        weight = math.prod(w[d] if b else 1 - w[d] for d, b in enumerate(bits))
        out += weight * eff[idx[0] + bits[0]][idx[1] + bits[1]][idx[2] + bits[2]]
    return max(out, 1e-3)


@lru_cache(maxsize=16)
def _measured_grid(gpu_name: str) -> tuple | None:
    """(log2 m grid, log2 n grid, log2 k grid, efficiency[m][n][k] as fractions of the bf16 peak), or None."""
    gpus = kernel_data()["gpus"]
    source = gpus[gpu_name].get("measured_like", gpu_name)  # the same die as a measured GPU: its grid
    g = gpus[source].get("measured")
    if g is None:
        return None
    eff = [t * 1e12 / get_gpu(source).peak("bf16") for t in g["tflops"]]  # flat, m-major
    nn_, nk = len(g["n"]), len(g["k"])
    grid = tuple(tuple(tuple(eff[(i * nn_ + j) * nk:(i * nn_ + j + 1) * nk]) for j in range(nn_))
                 for i in range(len(g["m"])))
    return (*(tuple(math.log2(v) for v in g[a]) for a in "mnk"), grid)


@lru_cache(maxsize=64)
def device(gpu_name: str, dtype: str) -> Device:
    """The `Device` for a catalogue GPU at a dtype (cached: the search calls this per configuration)."""
    data = kernel_data()
    gpu = get_gpu(gpu_name)
    p = data["gpus"][gpu_name]
    measured = _measured_grid(gpu_name) if dtype in ("bf16", "fp16") else None
    return Device(gpu=gpu, peak=gpu.peak(dtype), sms=p["sms"], gemm_eff_max=p["gemm_eff_max"], k_half=p["k_half"],
                  hbm_bw=gpu.hbm_gb_s * 1e9 * p["hbm_eff"], launch_s=p["launch_us"] * 1e-6,
                  flash_fwd_eff=p["flash_fwd_eff"], flash_bwd_eff=p["flash_bwd_eff"], attn_s_half=p["attn_s_half"],
                  tiles=tuple(tuple(t) for t in data["tiles"]), measured=measured)


@dataclass(kw_only=True, slots=True, frozen=True)
class Link:
    """One level of the network as seen by one GPU: bytes/s per direction (bus bandwidth) and step latency.
    Collectives are rings (`2(n-1)/n S/B + 2(n-1) alpha` for an all-reduce, half that for an all-gather or a
    reduce-scatter). Across nodes NCCL also has log-latency algorithms and picks by size: the double binary tree
    all-reduce (`tree`: `2 S/B + 2 log2(n) alpha`) and, for groups of one rank per node (NCCL 2.23+), PAT
    all-gather / reduce-scatter (`pat`: `(n-1)/n S/B + log2(n) alpha`); the faster is charged. Rings alone charged
    a 65,536-rank data-parallel group 2 s of latency a step (a user audit). Over NVLink rings stay, at the
    calibrated per-step latency (NVLS not modelled): a large NVL72 group is charged more latency there than it
    would be across nodes (docs/plan.md)."""
    bw: float  # bytes/s
    latency: float  # s per ring step
    tree: bool = False  # NCCL's tree all-reduce is there (across nodes)
    pat: bool = False  # NCCL's PAT all-gather / reduce-scatter is there (across nodes, one rank per node)

    def all_reduce(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        ring = 2 * (n - 1) / n * nbytes / self.bw + 2 * (n - 1) * self.latency
        return min(ring, 2 * nbytes / self.bw + 2 * math.ceil(math.log2(n)) * self.latency) if self.tree else ring

    def all_gather(self, nbytes: float, n: int) -> float:
        """All-gather (or reduce-scatter) of a buffer of `nbytes` in total across `n` ranks."""
        if n <= 1:
            return 0.0
        steps = min(n - 1, math.ceil(math.log2(n))) if self.pat else n - 1
        return (n - 1) / n * nbytes / self.bw + steps * self.latency

    def p2p(self, nbytes: float) -> float:
        return nbytes / self.bw + self.latency


def nvlink(gpu: GPU) -> Link:
    net = kernel_data()["network"]
    return Link(bw=gpu.nvlink_gb_s / 2 * 1e9 * net["nvlink_busbw_eff"], latency=net["nvlink_latency_us"] * 1e-6)


def scale_out(gbps_per_gpu: float, oversubscription: float = 1.0) -> Link:
    net = kernel_data()["network"]
    return Link(bw=gbps_per_gpu / 8 * 1e9 * net["scale_out_busbw_eff"] / oversubscription,
                latency=net["scale_out_latency_us"] * 1e-6, tree=True)
