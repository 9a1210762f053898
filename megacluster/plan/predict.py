"""`predict(scenario) -> Prediction`: performance x reliability x power for one scenario."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..hardware import get_gpu
from . import power as pw
from . import reliability as rel
from .perf import model_flops_per_token
from .search import Ranked, _over, memory_tolerance, rank, within_tolerance, worst_pool
from .scenario import Scenario, load_scenario

DEFAULT_DURATION_DAYS = 30.0  # reliability/energy horizon when the scenario gives neither tokens nor days


@dataclass(kw_only=True, slots=True)
class Prediction:
    """What the planner predicts for a scenario. `to_dict()` is the `--json` contract (issue 4)."""
    name: str
    description: str
    step_time_s: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    mfu: float
    memory_gb_per_gpu: float
    fits_in_memory: bool
    bubble_fraction: float
    exposed_comm_fraction: float
    job_mttf_h: float
    interruptions: float
    checkpoint_interval_s: float
    ettr: float
    goodput: float
    train_days: float | None
    energy_mwh: float  # over `energy_days`
    energy_days: float  # days energy and cost are counted over: train_days when known, else the horizon
    facility_mw: float
    load_swing_mw: float
    battery_mwh_needed: float
    cost_usd: float  # GPU-hours + electricity over `energy_days`
    gpus: int
    plan: dict  # the chosen parallel plan (incl. keys the scenario left out)
    chosen: list[str]  # which plan keys the planner chose
    configs_evaluated: int
    breakdown: dict  # s per step by component (critical replica)
    memory: dict  # GB per GPU by kind
    pools: list[dict]
    reliability: dict
    power: dict
    site: dict
    software: dict = field(default_factory=dict)
    limits: list[str] = field(default_factory=list)  # what holds MFU / goodput down, in words

    def to_dict(self) -> dict:
        return asdict(self)


def predict(scenario: Scenario | dict | str, *, mc: bool = True) -> Prediction:
    """Predict a scenario (a `Scenario`, a dict shaped like the TOML, a path or a preset name)."""
    sc = load_scenario(scenario)
    ranked = rank(sc)
    return assemble(sc, ranked[0], len(ranked), mc=mc)


def assemble(sc: Scenario, best: Ranked, n_configs: int, *, mc: bool = True) -> Prediction:
    fs, plan = best.fleet, best.plan
    crit = fs.critical
    n = sc.fleet.count
    step = fs.step_time_s
    tokens = sc.train.global_batch * sc.model.seq_len
    flops = model_flops_per_token(sc.model) * tokens
    tflops = flops / step / n / 1e12
    peak = sum(p.count * get_gpu(p.gpu).peak(sc.train.dtype) for p in sc.fleet.pools) / n / 1e12
    mfu = tflops / peak
    mem_gb = max(ps.step.memory_gb for ps in fs.pools)
    nodes = sum(math.ceil(p.count / p.gpus_per_node) for p in sc.fleet.pools)

    gpn = n / nodes
    r0 = rel.analyse(sc.reliability, nodes, 1.0, mc=False, gpus_per_node=gpn)  # ETTR does not depend on the horizon
    tps = tokens / step
    train_days = None
    if sc.train.total_tokens:
        kept_tps = tps * r0.ettr  # tokens/s that survive failures
        # ETTR 0 to double precision (e.g. a day-long restart against a 2-minute job MTTF): it never finishes
        train_days = sc.train.total_tokens / kept_tps / 86400 if kept_tps > 0 else math.inf
    horizon = sc.reliability.duration_days or train_days or DEFAULT_DURATION_DAYS
    r = rel.analyse(sc.reliability, nodes, horizon, mc=mc, gpus_per_node=gpn)

    # each pool computes for its own replicas' busy time, then waits for the slowest (mixed fleets)
    busy = [ps.step.step_time_s - ps.step.bubble_s - ps.step.dp_comm_s - ps.step.optimizer_s for ps in fs.pools]
    p = pw.analyse(sc.fleet.pools, sc.power, step, busy, sc.reliability.restart_s)
    # energy and cost: over the training run when total_tokens gives it (the reliability horizon may be a
    # shorter window, e.g. Llama 3's 54-day snapshot of a 75-day run), else over the horizon
    billed_days = train_days if train_days is not None else horizon
    wall_h = billed_days * 24
    energy = mean_draw_mw(p.facility_avg_mw, p.facility_low_mw, r0.idle_fraction) * wall_h
    cost = energy * sc.power.usd_per_mwh + n * sc.power.usd_per_gpu_hour * wall_h
    # the keys the planner chose: those left out that it searched (all with parallel.search; else a left-out tp,
    # pp or cp is 1, set, not chosen), and vpp only beside a pipeline (with pp = 1 it can only be 1)
    given = {"tp": sc.parallel.tp, "pp": sc.parallel.pp, "cp": sc.parallel.cp, "vpp": sc.parallel.vpp,
             "micro_batch": sc.train.micro_batch, "recompute": sc.train.recompute}
    searched = list(given) if sc.parallel.search else ["vpp", "micro_batch", "recompute"]
    chosen = [k for k in searched if given[k] is None and not (k == "vpp" and plan.pp == 1)]
    return Prediction(
        name=sc.name, description=sc.description, step_time_s=step, tokens_per_s=tps,
        model_tflops_per_gpu=tflops, mfu=mfu, memory_gb_per_gpu=mem_gb, fits_in_memory=fs.fits_in_memory,
        bubble_fraction=crit.bubble_s / step, exposed_comm_fraction=crit.exposed_comm_s / step,
        job_mttf_h=r.job_mttf_h, interruptions=r.interruptions, checkpoint_interval_s=r.checkpoint_interval_s,
        ettr=r.ettr, goodput=mfu * r.ettr, train_days=train_days, energy_mwh=energy, energy_days=billed_days,
        facility_mw=p.facility_mw, load_swing_mw=p.load_swing_mw, battery_mwh_needed=p.battery_mwh_needed,
        cost_usd=cost, gpus=n, plan=asdict(plan), chosen=chosen,
        configs_evaluated=n_configs, breakdown=_breakdown(crit), memory=dict(crit.memory),
        pools=[{"gpu": ps.pool.gpu, "count": ps.pool.count, "replicas": ps.replicas,
                "seqs_per_replica": ps.seqs_per_replica, "step_time_s": ps.step.step_time_s,
                "memory_gb_per_gpu": ps.step.memory_gb} for ps in fs.pools],
        reliability={"nodes": nodes, "duration_days": horizon, "unexpected": r.unexpected, "planned": r.planned,
                     "idle_fraction": r0.idle_fraction,
                     "by_cause": r.by_cause, "spare_wait_s": r.spare_wait_s, "monte_carlo": r.mc},
        power=asdict(p),
        site=pw.site(sc.site, p.facility_avg_mw),
        limits=_limits(sc, plan, crit, step, mfu, r.job_mttf_h, sc.reliability.restart_s, _over(best),
                       worst_pool(fs).step.memory_gb) + _software_limits(sc) + _pool_limits(sc, fs)
        + _power_limits(sc, p),
        software={"attention": sc.train.attention, "overlap_grad_reduce": sc.train.overlap_grad_reduce,
                  "balance": sc.fleet.balance})


def _software_limits(sc: Scenario) -> list[str]:
    """fp16 implies the 2018-21 software stack where its keys are left out (scenario._software_defaults): say so,
    as it can halve the MFU (a user audit: a bf16 plan at 38.9% became 20.5% in fp16 with no word but in --json)."""
    given = (sc.raw.get("train") or {}).keys()
    inferred = [k for k in ("attention", "overlap_grad_reduce") if k not in given]
    if sc.train.dtype != "fp16" or not inferred:
        return []
    today = {"attention": 'train.attention = "flash"', "overlap_grad_reduce": "train.overlap_grad_reduce = true"}
    return [f"fp16 is taken as the software of the published fp16 runs (2018-21): train.{' and train.'.join(inferred)} "
            f"left out, the 'software' row shows what that means; set {' and '.join(today[k] for k in inferred)} "
            "for today's"]


def _pool_limits(sc: Scenario, fs) -> list[str]:
    """Mixed fleets with equal shares: the slowest pool's replicas set the step; say by how much."""
    if len(fs.pools) < 2 or sc.fleet.balance != "equal":
        return []
    slow = max(fs.pools, key=lambda ps: ps.step.step_time_s)
    fast = min(fs.pools, key=lambda ps: ps.step.step_time_s)
    wait = 1 - fast.step.step_time_s / slow.step.step_time_s
    if wait < 0.10:
        return []
    return [f"equal shares: {slow.pool.gpu} replicas take {slow.step.step_time_s:.2f} s per step vs "
            f"{fast.step.step_time_s:.2f} s on {fast.pool.gpu}, which wait {wait:.0%} of every step "
            "(balance = \"throughput\" or training without the slow pool removes it)"]


def mean_draw_mw(avg_mw: float, low_mw: float, idle_fraction: float) -> float:
    """The run's mean facility draw, MW: a training step's average while the job trains, its low (waiting) draw
    for the share of wall time it recovers or writes checkpoints (charged all at the average, llama3-405b's
    energy was 1.9% high)."""
    return avg_mw * (1 - idle_fraction) + low_mw * idle_fraction


def _power_limits(sc: Scenario, p: pw.PowerResult) -> list[str]:
    """A grid or battery smaller than the plan needs: the figures assume the power is there, so say it is not."""
    out = []
    if not p.grid_ok:
        out.append(f"average draw {p.facility_avg_mw:,.1f} MW is above power.grid_mw = {sc.power.grid_mw:,.1f} MW: "
                   "the site cannot feed this plan (train days, energy and cost assume it can)")
    if not p.battery_ok and (sc.power.battery_mw or sc.power.battery_mwh):  # none given: "battery to flatten" sizes it
        out.append(f"the battery ({sc.power.battery_mw:,.1f} MW, {sc.power.battery_mwh:,.2f} MWh) cannot flatten the "
                   f"load: it needs {p.battery_mw_needed:,.1f} MW and {p.battery_mwh_needed:,.2f} MWh")
    return out


def _breakdown(b) -> dict:
    keys = ("compute_s", "tp_comm_s", "cp_comm_s", "p2p_s", "bubble_s", "dp_comm_s", "optimizer_s")
    return {k: getattr(b, k) for k in keys} | {"microbatches": b.microbatches}


def _limits(sc: Scenario, plan, crit, step: float, mfu: float, mttf_h: float, restart_s: float, over: float,
            mem_gb: float) -> list[str]:
    """Why MFU and goodput are what they are: the step's largest losses, with the numbers that cause them."""
    tokens_per_gpu = sc.train.global_batch * sc.model.seq_len / sc.fleet.count
    tokens = sc.train.global_batch * sc.model.seq_len
    shown = f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens:,}"
    out = [f"{tokens_per_gpu:,.0f} tokens per GPU per step ({shown} tokens over {sc.fleet.count:,} "
           f"GPU{'s' if sc.fleet.count > 1 else ''}); MFU {mfu:.1%}"]
    if crit.bubble_s / step > 0.10:
        out.append(f"pipeline bubble {crit.bubble_s / step:.0%} of the step: {crit.microbatches} micro-batches per "
                   f"replica for pp={plan.pp} stages (vpp={plan.vpp}); more tokens per step or fewer GPUs per "
                   "replica would shrink it")
    comm = {"tensor-parallel": crit.tp_comm_s, "data-parallel (not hidden by the last backward)": crit.dp_comm_s,
            "context-parallel": crit.cp_comm_s, "pipeline send/recv": crit.p2p_s}
    name, worst = max(comm.items(), key=lambda kv: kv[1])
    if worst / step > 0.10:
        out.append(f"exposed {name} communication {worst / step:.0%} of the step")
    if mttf_h * 3600 < 10 * restart_s:
        out.append(f"job MTTF {duration(mttf_h * 3600, 'hours')} vs {restart_s:.0f} s restart: failures cost a "
                   "large share of wall time (ETTR)")
    if over > 1:
        margin = memory_tolerance(plan)
        why = (f"within the model's {margin:.0%} margin{' for interleaved schedules' if plan.vpp > 1 else ''}: "
               "docs/plan.md" if within_tolerance(plan, over) else f"beyond its {margin:.0%} margin: the least over")
        out.append(f"memory {mem_gb:.0f} GB per GPU is {over - 1:.0%} over the usable HBM by the memory model ({why})")
    return out


def duration(seconds: float, largest: str = "days") -> str:
    """A time in the largest unit it reaches, from `largest` (days, hours) down to min and s."""
    if not math.isfinite(seconds):
        return "never"
    units = (("days", 86400, "{:,.1f}"), ("hours", 3600, "{:,.2f}"), ("min", 60, "{:,.1f}"))
    for unit, size, form in units[[u[0] for u in units].index(largest):]:
        if seconds >= size:
            return form.format(seconds / size) + (" h" if unit == "hours" else f" {unit}")
    return f"{seconds:.1f} s"


def usd(v: float) -> str:
    """Dollars to the cent, whole dollars from $100, two figures below a cent (a small plan read "$0.00")."""
    return f"${v:,.0f}" if v >= 100 or v == 0 else f"${v:,.2f}" if v >= 0.01 else f"${v:.2g}"
