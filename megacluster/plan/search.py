"""Parallel-plan search: enumerate valid (tp, pp, cp, dp, vpp, micro_batch, recompute), rank by goodput.

Keys the scenario gives are fixed; keys it leaves out are searched (with ``parallel.search = true`` all of
them; otherwise only vpp, micro_batch and recompute, which published runs often do not state). Goodput =
MFU x ETTR and ETTR does not depend on the plan, so ranking is by throughput among plans that fit in memory
(`rank` says when a plan over capacity by the memory model may still be chosen: only for a large gain).
Each configuration is pure arithmetic (~0.1-0.3 ms), so no vectorisation is needed for >= 1000 configs/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce
from itertools import product

from .perf import FleetStep, Plan, capacity_gb, fleet_step
from .scenario import ParallelSpec, Scenario, ScenarioError, check_parallel, even_replicas, nvlink_domain

RECOMPUTE = ("none", "selective", "full")
VPP = (1, 2, 3, 4, 6, 8, 12, 16)  # interleaving depths searched
CP_MIN_TOKENS = 1024  # tokens of the sequence per context-parallel rank, at least


@dataclass(kw_only=True, slots=True)
class Ranked:
    plan: Plan
    fleet: FleetStep
    tokens_per_s: float


def _divisors(n: int, upto: int) -> list[int]:
    """Divisors of n that are <= upto (n can be ~1M GPUs; only small divisors are ever wanted)."""
    return [d for d in range(1, min(n, upto) + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    return [2 ** i for i in range(int(math.log2(n)) + 1)]


def candidates(sc: Scenario) -> list[Plan]:
    """Every plan consistent with the scenario's fixed keys, the model shape and the fleet."""
    p, tr, m = sc.parallel, sc.train, sc.model
    n = sc.fleet.count
    unit = reduce(math.gcd, (pool.count for pool in sc.fleet.pools))  # a replica must fit every pool
    dom = min(nvlink_domain(pool) for pool in sc.fleet.pools)
    if not p.search:  # a fixed plan: what is not given is 1 (dp: the rest of the fleet)
        p = ParallelSpec(tp=p.tp or 1, pp=p.pp or 1, cp=p.cp or 1, dp=p.dp, vpp=p.vpp, search=False)
    tps, cps = _tps(sc, p, dom), _cps(sc, p)
    out = []
    for tp, cp in product(tps, cps):
        pps = [p.pp] if p.pp else _divisors(max(unit // (tp * cp), 1), m.layers)
        for pp in pps:
            size = tp * cp * pp
            if unit % size or (p.dp and p.dp * size != n):
                continue
            dp = n // size
            equal = len(sc.fleet.pools) == 1
            if tr.global_batch < dp or (equal and tr.global_batch % dp):
                continue
            out += _inner(sc, tp, pp, cp, dp)
    return out


def _tps(sc: Scenario, p: ParallelSpec, dom: int) -> list[int]:
    """tp values to try: the given one, or powers of two that tile the NVLink domain `dom` (1-8 in a 72-GPU NVL72
    rack: 16 would straddle racks)."""
    return [p.tp] if p.tp else [t for t in _pow2_upto(dom) if dom % t == 0 and _ok(sc, tp=t)]


def _cps(sc: Scenario, p: ParallelSpec) -> list[int]:
    """cp values to try: the given one, or powers of two up to 64 whose ranks keep >= CP_MIN_TOKENS of the
    sequence (attention and GEMM tiles stay efficient)."""
    return [p.cp] if p.cp else [c for c in _pow2_upto(64) if c == 1 or (sc.model.seq_len // c >= CP_MIN_TOKENS and
                                                                        _ok(sc, cp=c))]


def _inner(sc: Scenario, tp: int, pp: int, cp: int, dp: int) -> list[Plan]:
    """Plans for a fixed (tp, pp, cp, dp): vpp, micro-batch and recompute choices."""
    p, tr = sc.parallel, sc.train
    per_replica = max(tr.global_batch // dp, 1)
    mbs = [tr.micro_batch] if tr.micro_batch else _divisors(per_replica, 16)
    if even_replicas(sc, dp) and per_replica % mbs[0]:
        return []  # a given micro-batch must divide the per-replica batch, as `check_parallel` requires of a fixed plan
    # vpp (given or searched) as scenario validation allows it: 1 without a pipeline, pp x vpp <= layers
    vpps = [v for v in ([p.vpp] if p.vpp else VPP) if _ok(sc, pp=pp, vpp=v)]
    recs = [tr.recompute] if tr.recompute else RECOMPUTE
    out = []
    for mb, v, rc in product(mbs, vpps, recs):
        if rc == "selective" and tr.attention == "flash" and tr.recompute is None:
            continue  # identical to "none" with fused attention: searched once (given, it is kept as given)
        nmb = math.ceil(per_replica / mb)
        if v > 1 and nmb < pp:
            continue  # interleaving needs >= pp micro-batches in flight (Llama 3's schedule: any count >= pp)
        out.append(Plan(tp=tp, pp=pp, cp=cp, dp=dp, vpp=v, micro_batch=mb, recompute=rc))
    return out


def _ok(sc: Scenario, tp=None, pp=None, cp=None, vpp=None) -> bool:
    try:
        check_parallel(sc, tp, pp, cp, None, vpp, complete=False)
        return True
    except ScenarioError:
        return False


def _explain_interleaving(sc: Scenario) -> None:
    """Raise the reason a given interleaving has no plan, if that is it: a plan whose tp, pp and cp are known (given,
    or 1 in a fixed plan) and whose vpp > 1 needs at least pp micro-batches a replica (`_inner`)."""
    p, tr = sc.parallel, sc.train
    if not p.vpp or p.vpp == 1 or (p.search and not (p.tp and p.pp and p.cp)):
        return
    pp, size = p.pp or 1, (p.tp or 1) * (p.pp or 1) * (p.cp or 1)
    dp = p.dp or sc.fleet.count // size
    if pp == 1 or not dp:
        return
    per_replica = max(tr.global_batch // dp, 1)
    least = math.ceil(per_replica / tr.micro_batch) if tr.micro_batch else per_replica  # micro_batch 1 at best
    if least < pp:
        batch = f"train.global_batch / dp = {tr.global_batch} / {dp} = {per_replica} sequences a replica"
        fix = (f"give train.micro_batch <= {per_replica // pp}, " if per_replica >= pp and tr.micro_batch else "")
        raise ScenarioError(
            f"parallel.vpp = {p.vpp} with parallel.pp = {pp} needs at least {pp} micro-batches a replica; {batch}"
            + (f" in micro-batches of train.micro_batch = {tr.micro_batch}: {least}" if tr.micro_batch else "")
            + f"; {fix}raise train.global_batch, or give parallel.vpp = 1")


def _no_plan(sc: Scenario) -> str:
    """Why no plan is left, naming the key to change: a given key without which the search finds plans, or the
    global batch below the least data-parallel width (a search with dp = 7 on 512 GPUs said only "no valid plan")."""
    given = [("parallel", k, getattr(sc.parallel, k)) for k in ("tp", "pp", "cp", "dp", "vpp")]
    given.append(("train", "micro_batch", sc.train.micro_batch))
    blamed = []
    for section, key, value in given:
        if value is None or (key != "dp" and not sc.parallel.search):  # a fixed plan's left-out tp/pp/cp are 1
            continue
        part = getattr(sc, section)
        found = len(candidates(replace(sc, **{section: replace(part, **{key: None})})))
        if found:
            blamed.append(f"{section}.{key} = {value} (without it: {found:,} plans)")
    if blamed:
        return (f"parallel: no valid plan with {' or with '.join(blamed)}; leave {'it' if len(blamed) == 1 else 'one'} "
                "out, or check it against model.heads/layers/seq_len, train.global_batch and the fleet's GPU count")
    par, n = sc.parallel, sc.fleet.count
    tp = max(_tps(sc, par, min(nvlink_domain(pool) for pool in sc.fleet.pools)))
    least_dp = math.ceil(n / (tp * (par.pp or sc.model.layers) * max(_cps(sc, par))))  # the widest replica tried
    if sc.train.global_batch < least_dp:
        return (f"parallel: no valid plan: train.global_batch = {sc.train.global_batch:,} sequences is below the "
                f"least data-parallel width of {n:,} GPUs (at least {least_dp:,} replicas: a sequence a replica at "
                "the least); raise train.global_batch or plan fewer GPUs")
    return ("parallel: no valid plan for this model, batch and fleet (check parallel.tp/pp/cp/dp/vpp and "
            "train.micro_batch against heads, layers, global_batch and GPU counts)")


def evaluate(sc: Scenario, plan: Plan) -> Ranked:
    f = sc.fleet
    fs = fleet_step(sc.model, sc.train, plan, f.pools, f.scale_out_gbps, f.oversubscription, f.balance,
                    rail=f.topology == "rail-optimized", rail_nodes=f.rail_switch_nodes)
    return Ranked(plan=plan, fleet=fs, tokens_per_s=sc.train.global_batch * sc.model.seq_len / fs.step_time_s)


def rank(sc: Scenario) -> list[Ranked]:
    """All candidate plans, best first, by throughput among the plans that fit in memory. A plan over
    capacity by the memory model, but within its tolerance (`memory_tolerance`), competes with them only
    when it is more than `OVER_CAPACITY_MIN_GAIN` faster than the best plan that fits, or when none fits;
    it is then reported with fits_in_memory = false. Plans further over come last, the least over first."""
    plans = candidates(sc)
    if not plans and sc.parallel.pp and not sc.parallel.vpp:  # the given pp's own reason, e.g. its layout
        check_parallel(sc, sc.parallel.tp, sc.parallel.pp, sc.parallel.cp, None, 1, complete=False)
    if not plans:
        _explain_interleaving(sc)
        raise ScenarioError(_no_plan(sc))
    ranked = [evaluate(sc, pl) for pl in plans]
    best_fit = max((r.tokens_per_s for r in ranked if r.fleet.fits_in_memory), default=0.0)

    def key(r: Ranked) -> tuple:  # tier 0 competes on throughput; 1: over, not worth it; 2: too far over
        over = _over(r)
        if r.fleet.fits_in_memory:
            return 0, -r.tokens_per_s
        if not within_tolerance(r.plan, over):
            return 2, over
        return (0 if r.tokens_per_s > best_fit * (1 + OVER_CAPACITY_MIN_GAIN) else 1), -r.tokens_per_s
    ranked.sort(key=key)
    return ranked


# Activation memory differs by framework (which tensors fused kernels keep, what is freed early) and, with an
# interleaved pipeline, by schedule (how many micro-batches each model chunk holds in the warm-up). How much the
# model's estimate may be over is taken from the one public run that shows it: Llama 3 trained its 8K-GPU
# interleaved plan (pp 16) without recompute, which our model puts 21.4% over at its best interleaved depth
# (vpp 4: 103.8 GB on the second stage against 85.5 usable; docs/plan.md). No public run shows it for a plan
# without interleaving: there the margin stays small.
MEMORY_MODEL_TOL = 0.05
INTERLEAVED_MEMORY_TOL = 0.22
# A plan the memory model says does not fit is only worth recommending for a speed-up larger than the
# throughput model's own validated error (10% on the public set, tests/plan/test_validation.py): below that
# the gain is within the model's error, the risk of running out of memory is not.
OVER_CAPACITY_MIN_GAIN = 0.10


def memory_tolerance(plan: Plan) -> float:
    """How far over capacity by the memory model a plan may be and still compete (see rank)."""
    return INTERLEAVED_MEMORY_TOL if getattr(plan, "vpp", 1) > 1 else MEMORY_MODEL_TOL


def within_tolerance(plan: Plan, over: float) -> bool:
    """Whether a plan at `over` x its usable memory may still compete, over capacity or not (see rank)."""
    return over <= 1 + memory_tolerance(plan)


def worst_pool(fleet: FleetStep):
    """The fleet's pool (a `PoolStep`) furthest over its usable memory, or the least under it."""
    return max(fleet.pools, key=lambda ps: ps.step.memory_gb / capacity_gb(ps.pool.gpu))


def _over(r: Ranked) -> float:
    """Memory over usable capacity, the worst pool's ratio (<= 1: fits)."""
    worst = worst_pool(r.fleet)
    return worst.step.memory_gb / capacity_gb(worst.pool.gpu)
