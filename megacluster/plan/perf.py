"""Step time and memory of one parallel plan on one GPU type (analytical, Calculon-style, pure arithmetic).

Layout of ranks (innermost first): tp (NVLink), cp, pp, dp. Per micro-batch and per pipeline stage the model
adds: GEMMs at a shape-dependent efficiency (`kernels.Device.gemm_eff`), attention (fused or unfused),
memory-bound elementwise kernels, tensor-parallel collectives (all-reduce, or all-gather + reduce-scatter with
sequence parallelism) on the NVLink domain, context-parallel K/V exchange overlapped with attention, and
pipeline point-to-point sends. The pipeline runs m micro-batches with a bubble of (pp-1)/vpp stage-times
(1F1B, interleaved when vpp > 1). Data-parallel gradient reduction overlaps the last micro-batch's backward
(ZeRO-1/2: reduce-scatter + all-gather; ZeRO-3 also gathers parameters per micro-batch).
Equations and sources: docs/plan.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

from .kernels import Device, Link, device, nvlink, scale_out
from .scenario import RAIL_SWITCH_NODES, ModelSpec, PoolSpec, TrainSpec, nvlink_domain

BYTES = 2  # bytes per activation / weight element (bf16/fp16; fp8 runs keep bf16 activations)
RESERVED_GB = 2.0  # GB per GPU: CUDA context, NCCL buffers, allocator fragmentation


def capacity_gb(gpu_name: str) -> float:
    """Usable device memory in GB (1e9 B). Marketed "80GB" HBM is 80 GiB; nvidia-smi shows ~99.5% of it."""
    return device(gpu_name, "bf16").gpu.hbm_gb * 2**30 / 1e9 * 0.995


@dataclass(kw_only=True, slots=True, frozen=True)
class Plan:
    """A fully chosen parallel plan. vpp = 1 when pp = 1: `scenario.check_parallel` refuses anything else and
    the search generates nothing else."""
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int
    micro_batch: int  # sequences per micro-batch
    recompute: str  # "none" | "selective" | "full"


@dataclass(kw_only=True, slots=True)
class StepBreakdown:
    """Seconds per optimizer step for one model replica, and memory per GPU."""
    step_time_s: float
    compute_s: float  # GEMM + attention + elementwise (incl. recompute)
    tp_comm_s: float
    cp_comm_s: float  # exposed part
    p2p_s: float
    bubble_s: float
    dp_comm_s: float  # exposed part
    optimizer_s: float
    microbatches: int
    memory_gb: float
    memory: dict  # GB by kind

    @property
    def exposed_comm_s(self) -> float:
        return self.tp_comm_s + self.cp_comm_s + self.p2p_s + self.dp_comm_s


# ------------------------------------------------------------------------------------------ flops
def kv_width(m: ModelSpec) -> int:
    """Width of the K (and of the V) projection: kv_heads x head dimension (smaller than hidden with GQA)."""
    return m.kv_heads * (m.hidden // m.heads)


def kv_width_per_rank(m: ModelSpec, tp: int) -> float:
    """Width of K (and of V) on one tensor-parallel rank: kv_heads / tp heads, but at least one whole head (with
    tp > kv_heads each KV head is replicated on tp / kv_heads ranks; it was divided by tp)."""
    return kv_width(m) / min(tp, m.kv_heads)


def layer_params(m: ModelSpec) -> float:
    """Weights of one transformer layer (attention + MLP; norms are negligible)."""
    kvd = kv_width(m)
    mlp = (3 if m.mlp == "swiglu" else 2) * m.hidden * m.ffn_hidden
    return m.hidden * (m.hidden + 2 * kvd) + m.hidden * m.hidden + mlp


def layer_params_per_rank(m: ModelSpec, tp: int) -> float:
    """Weights of one layer on one tensor-parallel rank: a 1/tp slice, with K and V of at least one whole head."""
    kv_extra = 2 * m.hidden * (kv_width_per_rank(m, tp) - kv_width(m) / tp)  # replicated KV heads (tp > kv_heads)
    return layer_params(m) / tp + kv_extra


def model_flops_per_token(m: ModelSpec) -> float:
    """Model FLOPs per trained token (fwd + bwd, no recompute): 6 x (layer weights + LM head) plus causal
    attention 6 x layers x seq x hidden (QK^T and AV, half the score matrix under the causal mask)."""
    return 6.0 * (m.layers * layer_params(m) + m.hidden * m.vocab) + 6.0 * m.layers * m.seq_len * m.hidden


# ------------------------------------------------------------------------------------ per layer
def _linear(dev: Device, t: float, n: float, k: float) -> tuple[float, float]:
    """(fwd, bwd) s of a linear layer: tokens t, output n, input k. bwd = dgrad (t,k,n) + wgrad (k,n,t)."""
    return dev.gemm_time(t, n, k), dev.gemm_time(t, k, n) + dev.gemm_time(k, n, t)


def _attention(dev: Device, m: ModelSpec, tr: TrainSpec, mb: int, tp: int, cp: int) -> tuple[float, float]:
    """(fwd, bwd) s of the attention core (scores, softmax, weighted sum) for one layer and micro-batch. fp8
    recipes (Transformer Engine's, DeepSeek-V3's) run the linear layers in fp8 and attention in bf16: it is
    timed at the bf16 peak."""
    if tr.dtype == "fp8":
        dev = device(dev.gpu.name, "bf16")
    hd = m.hidden // m.heads
    heads = m.heads / tp
    s_q = m.seq_len / cp  # queries held by this CP rank; keys: the whole sequence (ring)
    if tr.attention == "flash":
        flops = 4.0 * mb * s_q * m.seq_len * hd * heads * 0.5  # causal: half the blocks are skipped
        return dev.flash_time(flops, m.seq_len)
    # unfused: two batched GEMMs over the full score matrix + softmax/mask/dropout passes through HBM
    b = mb * heads
    fwd = dev.gemm_time(s_q, m.seq_len, hd, b) + dev.gemm_time(s_q, hd, m.seq_len, b)
    bwd = 2.0 * fwd
    scores = b * s_q * m.seq_len
    fwd += dev.mem_time(scores * 5 * BYTES)  # write S, read S, write P, read P, dropout mask
    bwd += dev.mem_time(scores * 8 * BYTES)
    return fwd, bwd


def _elementwise_bytes(m: ModelSpec, tr: TrainSpec, tp: int) -> float:
    """HBM bytes per token per layer in the forward for norms, residuals, rotary, activation function."""
    kvr = kv_width_per_rank(m, tp)
    sp = tp if tr.sequence_parallel else 1  # norms and residuals are sharded only with sequence parallelism
    act = 3 * m.ffn_hidden if m.mlp == "swiglu" else 2 * m.ffn_hidden
    return BYTES * (10 * m.hidden / sp + 2 * (m.hidden / tp + kvr) + act / tp)


def layer_times(dev: Device, m: ModelSpec, tr: TrainSpec, mb: int, tp: int, cp: int) -> tuple[float, float, float]:
    """(fwd, bwd, attention fwd+bwd) s of one layer for one micro-batch on one GPU (compute only)."""
    t = mb * m.seq_len / cp  # tokens on this GPU
    kvr = kv_width_per_rank(m, tp)
    ffn_in = (2 if m.mlp == "swiglu" else 1) * m.ffn_hidden
    shapes = (m.hidden / tp + 2 * kvr, m.hidden), (m.hidden, m.hidden / tp), \
        (ffn_in / tp, m.hidden), (m.hidden, m.ffn_hidden / tp)
    fwd = bwd = 0.0
    for n, k in shapes:
        f, b = _linear(dev, t, n, k)
        fwd, bwd = fwd + f, bwd + b
    af, ab = _attention(dev, m, tr, mb, tp, cp)
    ew = dev.mem_time(t * _elementwise_bytes(m, tr, tp))
    return fwd + af + ew, bwd + ab + 2 * ew, af + ab


def head_times(dev: Device, m: ModelSpec, mb: int, tp: int, cp: int) -> tuple[float, float]:
    """(fwd, bwd) s of the LM head (vocab-parallel logits) and the cross-entropy on the last stage."""
    t = mb * m.seq_len / cp
    f, b = _linear(dev, t, m.vocab / tp, m.hidden)
    ce = dev.mem_time(t * m.vocab / tp * 4 * 3)  # fp32 logits: softmax read/write, loss
    return f + ce, b + ce


# --------------------------------------------------------------------------------------- network
@dataclass(kw_only=True, slots=True, frozen=True)
class Net:
    """Links used by each parallel dimension for one pool."""
    tp: Link
    cp: Link
    pp: Link
    dp: Link


def links(pool: PoolSpec, plan: Plan, scale_out_gbps: float, oversub: float, rail: bool = True,
          rail_nodes: int = RAIL_SWITCH_NODES) -> Net:
    """A group whose ranks fit in one NVLink domain (and whose size divides it, so every group does) talks
    over NVLink, otherwise over the scale-out NIC. pp and dp groups see the oversubscription, except on a
    rail-optimized fabric when every member has the same local GPU index (the group's stride is a multiple of
    gpus_per_node) and the group lies under one rail switch (`rail_nodes` nodes; groups tile that block, as
    they tile the NVLink domain): that traffic stays on its rail's leaf, which is not oversubscribed."""
    dom = nvlink_domain(pool)
    nv, so = nvlink(device(pool.gpu, "bf16").gpu), scale_out(scale_out_gbps, 1.0)
    so_far = scale_out(scale_out_gbps, oversub)
    tpcp = plan.tp * plan.cp
    reach = rail_nodes * pool.gpus_per_node  # ranks (GPUs) under one rail switch

    def far(stride: int, size: int) -> Link:  # `size` members `stride` ranks apart
        # under one switch: the groups tile the switch's block, or one switch reaches all of them (the pool, and a
        # group spanning pools: a dp group spans the fleet). A reach that does not tile them, short of that, leaves
        # some group straddling two switches, and the slowest group sets the pace
        under_one = reach % (stride * size) == 0 or reach >= max(pool.count, stride * size)
        on_rail = rail and stride % pool.gpus_per_node == 0 and under_one
        return _with_pat(so if on_rail else so_far, stride >= pool.gpus_per_node)  # PAT: one rank a node

    def inside(group: int) -> bool:  # groups tile the domain: tp = 16 in a 72-GPU NVL72 rack would straddle racks
        return group <= dom and dom % group == 0
    return Net(tp=nv if inside(plan.tp) else so,
               cp=nv if inside(tpcp) else _with_pat(so, plan.tp >= pool.gpus_per_node),
               pp=nv if inside(tpcp * plan.pp) else far(tpcp, plan.pp),
               dp=nv if inside(tpcp * plan.pp * plan.dp) else far(tpcp * plan.pp, plan.dp))


@lru_cache(maxsize=256)
def _with_pat(link: Link, pat: bool) -> Link:
    """`link` with NCCL's PAT there or not (memoised: links() runs for every plan the search evaluates, and a
    dataclasses.replace there cost the search ~15% of its configs/s)."""
    return replace(link, pat=pat)


# ----------------------------------------------------------------------------------------- stage
def empty_slots(layers: int, pp: int, vpp: int) -> tuple[int, int]:
    """(chunk size c = ceil(L / (pp vpp)), slots left empty: pp vpp c - L). The layout `stage_layers` assumes
    takes them off the first stage's first chunk and the last stage's last chunk, at most c - 1 each (a stage
    keeps at least one layer per chunk); `scenario.check_parallel` refuses more."""
    per_chunk = math.ceil(layers / (pp * vpp))
    return per_chunk, pp * vpp * per_chunk - layers


def stage_layers(layers: int, pp: int, vpp: int) -> tuple[int, int, int]:
    """(layers on the first stage, on a full stage, on the last stage). Chunks hold c = ceil(L / (pp vpp))
    layers; when pp vpp c > L the spare slots are taken off the first stage (the one holding the most
    micro-batches in flight, plus the embedding) and the last stage (the LM head), as Llama 3 balanced its
    126-layer model on 16 stages (7 + 14 x 8 + 7 layers)."""
    per_chunk, spare = empty_slots(layers, pp, vpp)
    full = per_chunk * vpp
    first = full - min(spare // 2, per_chunk - 1)  # the trim comes out of the first stage's first chunk
    last = min(max(layers - (pp - 2) * full - first, 0), full)
    return first, full, last


def chunk_layers(stage_total: int, per_chunk: int, vpp: int, trim_front: bool) -> list[int]:
    """Layers per model chunk on one stage: full chunks, the deficit taken from the first chunk (first stage)
    or from the last chunks (last stage)."""
    if trim_front:
        return [max(stage_total - (vpp - 1) * per_chunk, 0)] + [per_chunk] * (vpp - 1)
    return [min(per_chunk, max(stage_total - k * per_chunk, 0)) for k in range(vpp)]


def in_flight(pp: int, vpp: int, nmb: int, stage: int) -> list[int]:
    """Micro-batches whose activations a stage holds at its peak, per model chunk (1F1B; interleaved when
    vpp > 1). Megatron's warm-up on stage r runs W = 2(pp-r-1) + (vpp-1)pp forwards (vpp = 1: pp-r-1), in
    groups of pp micro-batches per chunk, then one more forward before the first backward. Stage 0 with
    pp=16, vpp=4: chunk 0 holds 31 micro-batches, chunks 1-3 hold 16 (Korthikanti et al. 2022:
    L (1 + (pp-1)/(pp vpp)) layers' worth in total)."""
    if vpp == 1:
        return [min(nmb, pp - stage)]
    forwards = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, nmb * vpp)
    rounds, rem = divmod(forwards, pp * vpp)
    return [min(nmb, rounds * pp + min(max(rem - k * pp, 0), pp)) for k in range(vpp)]


def estimator(m: ModelSpec, tr: TrainSpec, plan: Plan, pool: PoolSpec, scale_out_gbps: float,
              oversub: float = 1.0, rail: bool = True,
              rail_nodes: int = RAIL_SWITCH_NODES) -> Callable[[float], StepBreakdown]:
    """`step(seqs)`: step time of one replica processing `seqs` sequences, and memory per GPU. Everything but
    the micro-batch count is computed here, once per (pool, plan): a throughput-balanced fleet times each
    pool's replica at up to three batch sizes (`fleet_step`)."""
    dev = device(pool.gpu, tr.dtype)
    net = links(pool, plan, scale_out_gbps, oversub, rail, rail_nodes)
    tokens = plan.micro_batch * m.seq_len / plan.cp  # per GPU per micro-batch

    lf, lb, lattn = layer_times(dev, m, tr, plan.micro_batch, plan.tp, plan.cp)
    hf, hb = head_times(dev, m, plan.micro_batch, plan.tp, plan.cp)
    # tensor parallel: 2 collectives of the (tokens x hidden) activation per layer in fwd, 2 in bwd
    act_bytes = tokens * m.hidden * BYTES
    tp_one = 2 * net.tp.all_gather(act_bytes, plan.tp) if tr.sequence_parallel else net.tp.all_reduce(act_bytes, plan.tp)
    tp_layer = 4 * tp_one
    # context parallel: each rank receives the other ranks' K and V (fwd), and K, V + their grads (bwd)
    kv_bytes = 2 * tokens * kv_width_per_rank(m, plan.tp) * BYTES * (plan.cp - 1)
    cp_layer = max(0.0, 3 * (kv_bytes / net.cp.bw + (plan.cp - 1) * net.cp.latency) - lattn) if plan.cp > 1 else 0.0

    extra = 0.0  # recompute, s per layer: compute, and the forward's TP collectives again (full)
    tp_mb = tp_layer  # TP collectives per layer and micro-batch, recompute included
    if plan.recompute == "full":
        extra, tp_mb = lf, tp_layer + 2 * tp_one
    elif plan.recompute == "selective" and tr.attention == "unfused":
        extra = _attention(dev, m, tr, plan.micro_batch, plan.tp, plan.cp)[0]

    first, full, last = stage_layers(m.layers, plan.pp, plan.vpp)
    compute_layer = lf + lb + extra
    per_layer = compute_layer + tp_mb + cp_layer
    head_tp = net.tp.all_gather(act_bytes, plan.tp) if tr.sequence_parallel else 0.0
    # the slower of a full stage and the last stage (fewer layers + the LM head) sets the pace; the breakdown
    # below is that stage's, so its parts add up to the step
    crit_last = last * per_layer + hf + hb + head_tp > full * per_layer
    n_crit = last if crit_last else full
    t_compute = n_crit * compute_layer + (hf + hb if crit_last else 0.0)
    t_tp = n_crit * tp_mb + (head_tp if crit_last else 0.0)
    t_stage = t_compute + t_tp + n_crit * cp_layer
    # pipeline sends: per micro-batch each stage sends vpp activations forward and vpp gradients back
    p2p = 0.0
    if plan.pp > 1:
        p2p = 2 * plan.vpp * net.pp.p2p(act_bytes / (plan.tp if tr.sequence_parallel else 1))
    t_mb = t_stage + p2p
    bubble = (plan.pp - 1) / plan.vpp * t_mb
    dp_exposed, optim = _dp_time(m, tr, plan, dev, net, full, lf, lb)
    memory = _memory(m, tr, plan, (first, full, last))

    def step(seqs: float) -> StepBreakdown:
        nmb = max(1, math.ceil(seqs / plan.micro_batch))
        dp_s, mem = dp_exposed(nmb), memory(nmb)
        return StepBreakdown(step_time_s=nmb * t_mb + bubble + dp_s + optim, compute_s=nmb * t_compute,
                             tp_comm_s=nmb * t_tp, cp_comm_s=nmb * n_crit * cp_layer, p2p_s=nmb * p2p,
                             bubble_s=bubble, dp_comm_s=dp_s, optimizer_s=optim, microbatches=nmb,
                             memory_gb=sum(mem.values()), memory=mem)
    return step


def grad_bytes_per_param(tr: TrainSpec) -> int:
    """Bytes per parameter of the gradient buffer. bf16/fp8 runs accumulate gradients over micro-batches in
    fp32 (Megatron's main_grad default for bf16; Llama 3 section 3.3.2) and reduce them in fp32; fp16 runs
    (Megatron SC'21) keep fp16 grads and copy them to fp32 inside the optimizer."""
    return 2 if tr.dtype == "fp16" else 4


def optimizer_bytes_per_param(tr: TrainSpec) -> int:
    """Bytes per parameter of optimizer state: fp32 master weights + Adam m, v (12); fp16 runs also hold the
    fp32 copy of the grads (16). Megatron distributed-optimizer table: bf16/fp32-grad 6 + 12/d, fp16 4 + 16/d."""
    return 16 if tr.dtype == "fp16" else 12


def shard_ranks(plan: Plan) -> int:
    """Ranks that hold the same weights and reduce gradients together (and that ZeRO shards over): dp x cp."""
    return plan.dp * plan.cp


def _dp_time(m: ModelSpec, tr: TrainSpec, plan: Plan, dev: Device, net: Net, full: int, lf: float,
             lb: float) -> tuple[Callable[[int], float], float]:
    """(exposed data-parallel comm s as a function of the micro-batch count, optimizer s), for the fullest stage.
    Context-parallel ranks hold the same weights and each computes the gradient of its part of the sequence, so
    gradients are reduced, and ZeRO shards, over dp x cp ranks (Megatron's data-parallel group with CP)."""
    emb = m.hidden * m.vocab / plan.tp  # embedding (first stage) or LM head (last stage), vocab-parallel
    params = full * layer_params_per_rank(m, plan.tp) + emb  # the fullest stage: it sets the DP and optimizer time
    d = shard_ranks(plan)
    link = net.dp if plan.dp > 1 else net.cp  # dp x cp ranks: across replicas when dp > 1 (the slower link)
    gb = grad_bytes_per_param(tr)
    if tr.zero == 0:
        t_dp = link.all_reduce(params * gb, d)
    else:  # reduce-scatter grads, all-gather updated bf16 weights (ZeRO-3: also per micro-batch fwd+bwd)
        t_dp = link.all_gather(params * gb, d) + link.all_gather(params * BYTES, d)
    gather = link.all_gather(params * BYTES, d) if tr.zero == 3 else 0.0
    # ZeRO-2/3 keep only their shard of the gradients, so every micro-batch's gradients are reduce-scattered
    # after its own backward (DeepSpeed stage 2 reduces each micro-step), not once after the last one
    rs_mb = link.all_gather(params * gb, d) if tr.zero >= 2 else 0.0
    optim = dev.mem_time(params / (d if tr.zero >= 1 else 1) * 36)  # Adam: r/w fp32 master, m, v; grad; bf16 w
    overlap = 1.0 if tr.overlap_grad_reduce else 0.0

    def exposed(nmb: int) -> float:
        if d <= 1:
            return 0.0
        if tr.zero == 3:  # gathers and reduce-scatters spread over the whole step's compute
            t = t_dp + (nmb - 1) * (2 * gather + rs_mb)
            return max(0.0, t - overlap * (full * lb + full * (nmb - 1) * (lf + lb)))
        # the last micro-batch's reduction (and the weight all-gather) against its backward; with ZeRO-2 each
        # earlier micro-batch's reduce-scatter against its own backward
        return max(0.0, t_dp - overlap * full * lb) + (nmb - 1) * max(0.0, rs_mb - overlap * full * lb)
    return exposed, optim


def _memory(m: ModelSpec, tr: TrainSpec, plan: Plan, layers: tuple[int, int, int]) -> Callable[[int], dict]:
    """Memory GB by kind on the fullest stage, as a function of the micro-batch count: the first stage (the
    most micro-batches in flight, the embedding), the second (when the first was trimmed, it keeps all its
    layers with almost as many in flight: Llama 3 405B's 16K-GPU plan puts it 9 GB above the first) and the
    last (the LM head and logits); later middle stages hold fewer micro-batches than the second. Activations:
    sum over a stage's model chunks of layers x micro-batches in flight x bytes per layer; the last stage also
    holds one micro-batch's fp32 logits (vocab-parallel)."""
    first, full, last = layers
    emb = m.hidden * m.vocab / plan.tp  # embedding (first stage) or LM head (last stage), vocab-parallel
    per_chunk, _ = empty_slots(m.layers, plan.pp, plan.vpp)
    per_layer = layer_activation_bytes(m, tr, plan)
    # full recompute: one layer's full activations live during its recompute; selective: its attention core's
    # (with unfused attention, the score matrices: recomputed, not kept, but whole while one layer recomputes)
    if plan.recompute == "full":
        live = layer_activation_bytes(m, tr, replace(plan, recompute="none"))
    elif plan.recompute == "selective" and tr.attention == "unfused":
        live = unfused_scores(m, plan) * BYTES
    else:
        live = 0.0
    logits = plan.micro_batch * m.seq_len / plan.cp * m.vocab / plan.tp * 4
    stages = [(0, first, emb * (2 if plan.pp == 1 else 1), True)]  # pp = 1: embedding and head on one stage
    if plan.pp > 2:
        stages.append((1, full, 0.0, True))
    if plan.pp > 1:
        stages.append((plan.pp - 1, last, emb, False))
    # ZeRO-3 gathers each unit's weights (a layer, the embedding, the head: this GPU's tp shard) whole before
    # using it, the next one prefetched meanwhile: two units whole at a time beside the shards (FSDP's default
    # one-unit prefetch); the largest of a stage's units, to be safe (the embedding is larger than a Llama 3 8B
    # layer: 525M parameters against 218M)
    def gathered(extra: float) -> float:  # nothing when nothing is sharded (dp x cp = 1: the shards are whole)
        sharded = tr.zero == 3 and shard_ranks(plan) > 1
        return 2 * max(layer_params_per_rank(m, plan.tp), emb if extra else 0.0) * BYTES if sharded else 0.0

    # per stage: (index, parameters on this GPU, layers per model chunk, bytes ZeRO-3 holds gathered)
    stages = [(stage, n * layer_params_per_rank(m, plan.tp) + extra, chunk_layers(n, per_chunk, plan.vpp, front),
               gathered(extra)) for stage, n, extra, front in stages]

    def memory(nmb: int) -> dict:
        mems = []
        for stage, params, chunks, whole in stages:
            act = sum(n * k for n, k in zip(chunks, in_flight(plan.pp, plan.vpp, nmb, stage))) * per_layer
            act += live
            if stage == plan.pp - 1:
                act += logits
            mems.append(memory_gb(params, tr, shard_ranks(plan), act, whole))
        return max(mems, key=lambda x: sum(x.values()))
    return memory


def memory_gb(params: float, tr: TrainSpec, dp: int, act_bytes: float, gathered_bytes: float = 0.0) -> dict:
    """GB per GPU by kind for a stage holding `params` parameters (this GPU's tp shard): bf16 weights
    (sharded over `dp` ranks by ZeRO-3, plus the layers it has gathered whole: `gathered_bytes`), grads
    (ZeRO-2/3), optimizer state (ZeRO-1/2/3), activations, reserved. `dp`: the ranks ZeRO shards over, dp x cp
    (`shard_ranks`)."""
    w = params * BYTES / (dp if tr.zero == 3 else 1) + gathered_bytes
    g = params * grad_bytes_per_param(tr) / (dp if tr.zero >= 2 else 1)
    o = params * optimizer_bytes_per_param(tr) / (dp if tr.zero >= 1 else 1)
    return {"weights": w / 1e9, "grads": g / 1e9, "optimizer": o / 1e9, "activations": act_bytes / 1e9,
            "reserved": RESERVED_GB}


def layer_activation_bytes(m: ModelSpec, tr: TrainSpec, plan: Plan) -> float:
    """Bytes one layer keeps for its backward, per micro-batch (Korthikanti et al. 2022, generalised to
    GQA and SwiGLU; fused norm+linear keeps one input; flash attention keeps O and the log-sum-exp only)."""
    t = plan.micro_batch * m.seq_len / plan.cp
    h, f = m.hidden, m.ffn_hidden
    kvr = kv_width_per_rank(m, plan.tp)
    sp = plan.tp if tr.sequence_parallel else 1
    if plan.recompute == "full":
        return t * h / sp * BYTES  # only the layer input
    attn = 2 * h / sp + h / plan.tp + 2 * kvr + h / plan.tp  # norm+qkv input, q k v, attention output
    mlp = 2 * h / sp + ((2 * f if m.mlp == "swiglu" else f) + f) / plan.tp  # norm+fc1 input, fc1 out, act out
    elems = t * (attn + mlp)
    if tr.attention == "unfused" and plan.recompute == "none":
        elems += unfused_scores(m, plan)
    return elems * BYTES


def unfused_scores(m: ModelSpec, plan: Plan) -> float:
    """Elements of one layer's unfused attention core per micro-batch: scores, probabilities and the mask
    (Korthikanti's 5 a s^2 b / t bytes, 2.5 a s^2 b / t of 2-byte elements), a rank's s / cp queries each."""
    return 2.5 * plan.micro_batch * m.heads / plan.tp * (m.seq_len / plan.cp) * m.seq_len


# ------------------------------------------------------------------------------------------ fleet
@dataclass(kw_only=True, slots=True)
class PoolStep:
    pool: PoolSpec
    replicas: int
    seqs_per_replica: float  # sequences each replica of this pool processes per step
    step: StepBreakdown


@dataclass(kw_only=True, slots=True)
class FleetStep:
    step_time_s: float  # synchronous: the slowest replica
    pools: list[PoolStep]
    fits_in_memory: bool

    @property
    def critical(self) -> StepBreakdown:
        return max(self.pools, key=lambda p: p.step.step_time_s).step


def fleet_step(m: ModelSpec, tr: TrainSpec, plan: Plan, pools: list[PoolSpec], scale_out_gbps: float,
               oversub: float = 1.0, balance: str = "equal", rail: bool = True,
               rail_nodes: int = RAIL_SWITCH_NODES) -> FleetStep:
    """Synchronous step over (possibly mixed) pools. "equal": every replica takes global_batch / dp sequences,
    the step is the slowest replica's. "throughput": shares proportional to each pool's replica speed,
    rounded to whole micro-batches, so all replicas finish together."""
    size = plan.tp * plan.pp * plan.cp
    reps = [p.count // size for p in pools]
    seqs0 = tr.global_batch / plan.dp
    steppers = [estimator(m, tr, plan, p, scale_out_gbps, oversub, rail, rail_nodes) for p in pools]
    first = [step(seqs0) for step in steppers]
    shares = [seqs0] * len(pools)
    if balance == "throughput" and len(pools) > 1:
        shares = _throughput_shares(tr, plan, steppers, reps, first, seqs0)
    steps = [f if s == seqs0 else step(s) for f, s, step in zip(first, shares, steppers)]
    out = [PoolStep(pool=p, replicas=r, seqs_per_replica=s, step=b) for p, r, s, b in zip(pools, reps, shares, steps)]
    fits = all(b.memory_gb <= capacity_gb(p.gpu) for p, b in zip(pools, steps))
    return FleetStep(step_time_s=max(b.step_time_s for b in steps), pools=out, fits_in_memory=fits)


def _throughput_shares(tr, plan, steppers, reps, first, seqs0) -> list[float]:
    """Mean sequences per replica per pool so that t_i(s_i) is equal, with t_i(s) = a_i + b_i s (two-point fit)."""
    lin = []
    for step, f in zip(steppers, first):
        t2 = step(2 * seqs0).step_time_s
        b = max((t2 - f.step_time_s) / seqs0, 1e-12)
        lin.append((f.step_time_s - b * seqs0, b))
    total = tr.global_batch
    t = (total + sum(r * a / b for r, (a, b) in zip(reps, lin))) / sum(r / b for r, (a, b) in zip(reps, lin))
    raw = [max((t - a) / b, 0.0) for a, b in lin]
    scale = total / sum(r * s for r, s in zip(reps, raw))
    return _whole_microbatches([s * scale for s in raw], reps, plan.micro_batch, total, lin)


def _whole_microbatches(shares: list[float], reps: list[int], mb: int, total: int, lin) -> list[float]:
    """Round shares to whole micro-batches: start every pool at floor, then hand the missing sequences out one
    micro-batch per replica to the pool that stays fastest (t = a + b s). Returns the fullest replica's
    sequences per pool (some replicas of a pool may take one micro-batch fewer); the step is timed on it."""
    k = [math.floor(s / mb) for s in shares]  # micro-batches per replica
    left = total - sum(r * ki * mb for r, ki in zip(reps, k))
    while left > 0:
        i = min((j for j in range(len(k)) if reps[j]), key=lambda j: lin[j][0] + lin[j][1] * (k[j] + 1) * mb)
        k[i] += 1
        left -= reps[i] * mb
    return [float(ki * mb) for ki in k]
