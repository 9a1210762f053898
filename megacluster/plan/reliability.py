"""Failures, checkpoint interval, effective training time (ETTR) and goodput; vectorised Monte Carlo.

Model: every node fails independently as a Poisson process (rate `node_failures_per_1000_node_days`, split
by root cause with the cause mix), so a synchronous job over N nodes fails at N times that rate (job MTTF =
1 / rate); planned interruptions (maintenance, updates) arrive at a job-level rate and cost one restart
after a fresh checkpoint. An unexpected failure loses the work since the last checkpoint and starts a
recovery of `restart_s`; a failure during a recovery starts it again (the window grows; nothing more is
lost). Checkpoint interval: Daly's higher-order optimum; ETTR: Daly's expected wall-clock for exponential
failures (Daly, FGCS 2006). Defaults are calibrated on Llama 3 (arXiv 2407.21783, section 3.3.4 /
Table 5): 419 unexpected interruptions in 54 days on 2,048 nodes, 47 planned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenario import ReliabilitySpec

DAY = 86400.0  # s
# causes that do not need the node replaced (the job restarts on the same nodes). Not silent data corruption: its
# node is drained for a faulty GPU (Llama 3 counts it among the suspected hardware issues of its 78%)
SOFT_CAUSES = frozenset({"software_bug", "nccl_watchdog_timeout", "dependency"})
# causes that live on the GPU board: their per-node rate scales with GPUs per node (calibration nodes had 8)
GPU_CAUSES = frozenset({"faulty_gpu", "gpu_hbm3", "gpu_sram", "gpu_system_processor", "gpu_thermal",
                        "silent_data_corruption"})
CALIBRATION_GPUS_PER_NODE = 8  # Llama 3: 8 x H100 per node
# Expected interruptions per Monte Carlo trial above which trials are not drawn (`_long_run`). A real run has
# far fewer: 1M GPUs at a 2-minute job MTTF for a century is ~3e7. Only a run that never finishes (its
# horizon, train_days, is astronomical because the ETTR is ~0) goes past it.
MC_MAX_EVENTS = 1e12
Z95 = 1.6448536269514722  # standard normal quantile at 0.95 (p5/p95 of a normal limit)


def daly_interval(delta: float, mttf: float) -> float:
    """Daly's higher-order optimum checkpoint interval (s of compute between checkpoints).
    delta: checkpoint write time (s); mttf: job mean time to interrupt (s)."""
    if delta >= 2 * mttf:
        return mttf
    x = delta / (2 * mttf)
    return math.sqrt(2 * delta * mttf) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def daly_ettr(tau: float, delta: float, restart: float, mttf: float) -> float:
    """Fraction of wall-clock time spent on useful work for exponential failures (Daly 2006, eq. 13):
    T_wall / T_solve = (M / tau) e^(R/M) (e^((tau + delta)/M) - 1).

    Summed in logs: e^(R/M) overflows a float once R > ~710 M (a day-long restart against a 2-minute job MTTF),
    where the ETTR is simply 0 to double precision; the ratio is >= 1, so its log is >= 0 and exp(-log) cannot
    overflow."""
    if not math.isfinite(mttf):
        return tau / (tau + delta)
    if mttf <= 0:  # a job that is always failing does no work
        return 0.0
    x = (tau + delta) / mttf
    # log(e^x - 1) = x + log(1 - e^-x): finite for every x > 0
    log_ratio = math.log(mttf / tau) + restart / mttf + x + math.log(-math.expm1(-x))
    return math.exp(-log_ratio)


@dataclass(kw_only=True, slots=True)
class ReliabilityResult:
    nodes: int
    duration_days: float
    job_mttf_h: float  # mean time between unexpected interruptions of the whole job, h
    unexpected: float  # expected unexpected interruptions over the duration
    planned: float  # expected planned interruptions
    by_cause: dict[str, float]  # expected unexpected interruptions per cause
    checkpoint_interval_s: float
    ettr: float  # effective training time ratio (analytic)
    idle_fraction: float  # share of wall time with every GPU idle: recoveries and checkpoint writes (analytic)
    spare_wait_s: float  # mean extra wait per hardware failure for a spare node
    mc: dict  # Monte Carlo: trials, percentiles of interruptions and ETTR

    @property
    def interruptions(self) -> float:
        return self.unexpected + self.planned


def cause_rates(spec: ReliabilitySpec, nodes: int, gpus_per_node: float = CALIBRATION_GPUS_PER_NODE) -> dict[str, float]:
    """Job-level unexpected interruption rate per cause, per second. The node rate is for 8-GPU nodes; GPU-board
    causes scale with `gpus_per_node` (a 4-GPU GB200 tray has half the GPU faults of an 8-GPU HGX node)."""
    total_w = sum(spec.causes.values()) or 1.0
    per_node_s = spec.node_failures_per_1000_node_days / 1000 / DAY
    scale = gpus_per_node / CALIBRATION_GPUS_PER_NODE
    return {c: nodes * per_node_s * w / total_w * (scale if c in GPU_CAUSES else 1.0) for c, w in spec.causes.items()}


def spare_wait(spec: ReliabilitySpec, hw_rate: float) -> float:
    """Mean extra wait (s) per hardware failure for a replacement node. Nodes in repair form an M/G/inf queue:
    X ~ Poisson(hw_rate x repair time); with S spares a failure finds none free with probability P(X >= S),
    and then waits for the first of the S+1 repairs in progress to finish (~ repair / (S + 1))."""
    if spec.spare_nodes is None:
        return 0.0
    repair = spec.repair_h * 3600
    mu = hw_rate * repair
    s = spec.spare_nodes
    p_short = 1.0 - _poisson_cdf(s - 1, mu) if s > 0 else 1.0
    return p_short * repair / (s + 1)


def _poisson_cdf(k: int, mu: float) -> float:
    if k < 0:
        return 0.0
    if mu > 50:  # normal approximation with continuity correction
        return 0.5 * (1 + math.erf((k + 0.5 - mu) / math.sqrt(2 * mu)))
    term = total = math.exp(-mu)
    for i in range(1, k + 1):
        term *= mu / i
        total += term
        if i > 2 * mu and term < 1e-17 * total:  # the terms now shrink by > 2x: the rest is below double precision
            break  # (without it reliability.spare_nodes = 1e18 looped 1e18 times)
    return min(total, 1.0)


def analyse(spec: ReliabilitySpec, nodes: int, duration_days: float, *, mc: bool = True,
            gpus_per_node: float = CALIBRATION_GPUS_PER_NODE) -> ReliabilityResult:
    """Failures, checkpoint interval and ETTR for a job on `nodes` nodes (of `gpus_per_node` GPUs on average)
    running `duration_days`."""
    rates = cause_rates(spec, nodes, gpus_per_node)
    lam = sum(rates.values())
    hw_rate = sum(r for c, r in rates.items() if c not in SOFT_CAUSES)
    mttf = 1.0 / lam if lam > 0 else math.inf
    wait = spare_wait(spec, hw_rate)
    restart = spec.restart_s + (wait * hw_rate / lam if lam > 0 else 0.0)  # mean over causes
    delta = spec.checkpoint_write_s
    tau = spec.checkpoint_interval_s or (daly_interval(delta, mttf) if math.isfinite(mttf) else 86400.0)
    tau = max(tau, 1.0)  # a Daly optimum under a second (given intervals are >= 1 s: scenario.py)
    planned_rate = spec.planned_per_day / DAY
    ettr = analytic_ettr(spec, tau, restart, mttf, planned_rate)
    dur = duration_days * DAY  # infinite for a run that never finishes (predict: ETTR 0 -> train_days inf)
    res = ReliabilityResult(nodes=nodes, duration_days=duration_days, job_mttf_h=mttf / 3600,
                            unexpected=_events(lam, dur), planned=_events(planned_rate, dur),
                            by_cause={c: _events(r, dur) for c, r in rates.items()}, checkpoint_interval_s=tau,
                            ettr=ettr, idle_fraction=idle_fraction(spec, tau, restart, lam, planned_rate),
                            spare_wait_s=wait, mc={})
    if mc:
        res.mc = monte_carlo(spec, rates, planned_rate, dur, tau, restart)
    return res


def analytic_ettr(spec: ReliabilitySpec, tau: float, restart: float, mttf: float, planned_rate: float) -> float:
    """Daly's ETTR for the unexpected failures times the share of time the planned interruptions leave (each
    a fresh checkpoint, then a restart)."""
    delta = spec.checkpoint_write_s
    return daly_ettr(tau, delta, restart, mttf) * (1 - min(planned_rate * (spec.restart_s + delta), 1.0))


def idle_fraction(spec: ReliabilitySpec, tau: float, restart: float, lam: float, planned_rate: float) -> float:
    """Share of wall time the GPUs draw only their waiting power: recoveries (`restart` s per unexpected
    interruption, restart_s + a checkpoint write per planned one) and, of the time left, the checkpoint writes
    (delta of every tau + delta). Redone work after a failure is computed at full power, so it is not idle.
    First order in the rates: a failure inside a recovery is not counted twice."""
    delta = spec.checkpoint_write_s
    down = min(lam * restart + planned_rate * (spec.restart_s + delta), 1.0) if lam < math.inf else 1.0
    return down + (1 - down) * delta / (tau + delta)


def _events(rate: float, dur: float) -> float:
    """Expected events in `dur` s at `rate` per s; 0 for a zero rate also over an infinite run (not 0 x inf = nan)."""
    return rate * dur if rate > 0 else 0.0


def monte_carlo(spec: ReliabilitySpec, rates: dict[str, float], planned_rate: float, dur: float, tau: float,
                restart: float) -> dict:
    """`spec.trials` runs of `dur` seconds of wall time, vectorised. Failures are a Poisson process in wall
    time (counts per cause and trial). They split the run into segments: each segment after a failure opens
    with a recovery of `restart` s; a failure inside a recovery only restarts it (the window grows by the
    time already spent, no work is lost twice), otherwise work runs in periods of tau compute + delta write
    and the failure loses the unfinished period. Segments are simulated exactly for <= 256 failures per
    trial and by their normal limit above (renewal-reward moments of the per-segment useful work). Above
    MC_MAX_EVENTS interruptions per trial the run effectively never finishes and `_long_run` answers instead."""
    expected = sum(_events(r, dur) for r in rates.values()) + _events(planned_rate, dur)
    if not (expected <= MC_MAX_EVENTS and math.isfinite(dur)):
        return _long_run(spec, rates, planned_rate, dur, tau, restart)
    rng = np.random.default_rng(spec.seed)
    trials = spec.trials
    lam = np.fromiter(rates.values(), float, len(rates))
    counts = rng.poisson(lam * dur, size=(trials, len(lam)))  # (trials, causes)
    n = counts.sum(axis=1)
    planned = rng.poisson(planned_rate * dur, size=trials)
    period = tau + spec.checkpoint_write_s  # s of wall time per checkpointed chunk of tau s of work
    useful = _useful_work(rng, n, dur, restart, tau, period)  # s of work kept, per trial
    # planned interruptions: a fresh checkpoint, then a restart (no work lost), taken out of the working time
    useful *= np.clip(1 - planned * (spec.restart_s + spec.checkpoint_write_s) / dur, 0.0, None)
    ettr = useful / dur
    pct = (5, 50, 95)
    return {"trials": trials,
            "interruptions_p5_p50_p95": np.percentile(n + planned, pct).tolist(),
            "unexpected_p5_p50_p95": np.percentile(n, pct).tolist(),
            "ettr_mean": float(ettr.mean()), "ettr_p5_p50_p95": np.percentile(ettr, pct).tolist(),
            "by_cause_mean": dict(zip(rates, counts.mean(axis=0).tolist())), "regime": "simulated"}


def _long_run(spec: ReliabilitySpec, rates: dict[str, float], planned_rate: float, dur: float, tau: float,
              restart: float) -> dict:
    """The Monte Carlo's answer for a run with more than MC_MAX_EVENTS expected interruptions per trial (or an
    infinite run): one whose ETTR is so small (~1e-17 with a 5,000 s restart against a 2-minute job MTTF) that
    train_days, the horizon, is astronomical. Its trials cannot be drawn (numpy's Poisson sampler refuses
    means above ~9e18, int64) and need not be: a trial's counts and kept work are sums over >= 1e12 segments,
    so their relative spread is <= 1/sqrt(1e12) = 1e-6 and every trial equals the renewal-reward limit. That
    limit of the simulated model is Daly's closed form (see `segment_moments`) times the planned-interruption
    loss, i.e. the analytic ETTR; counts are Poisson's normal limit, mean +- 1.645 sd for p5/p95."""
    lam = sum(rates.values())
    ettr = analytic_ettr(spec, tau, restart, 1 / lam if lam > 0 else math.inf, planned_rate)
    unexpected, planned = _events(lam, dur), _events(planned_rate, dur)
    return {"trials": spec.trials,
            "interruptions_p5_p50_p95": _normal_pcts(unexpected + planned),
            "unexpected_p5_p50_p95": _normal_pcts(unexpected),
            "ettr_mean": ettr, "ettr_p5_p50_p95": [ettr] * 3,
            "by_cause_mean": {c: _events(r, dur) for c, r in rates.items()}, "regime": "long-run limit"}


def _normal_pcts(mean: float) -> list[float]:
    """p5, p50, p95 of Poisson(mean) by its normal limit (mean >= 1e12 here); an infinite mean stays infinite."""
    if math.isinf(mean):
        return [mean] * 3
    sd = math.sqrt(mean)
    return [mean - Z95 * sd, mean, mean + Z95 * sd]


def _useful_work(rng: np.random.Generator, n: np.ndarray, dur: float, restart: float, tau: float, period: float,
                 exact_max: int = 256) -> np.ndarray:
    """Per trial, seconds of checkpointed work in `dur` s with n[i] failures at uniform times."""
    out = np.empty(n.shape, float)
    small = n <= exact_max
    if small.any():
        out[small] = _useful_exact(rng, n[small], dur, restart, tau, period)
    big = ~small
    if big.any():
        rate = (n[big] + 1.0) / dur  # per-trial failure rate: n + 1 segments share the run
        mean, var = segment_moments(rate, restart, tau, period)
        segs = n[big] + 1.0
        out[big] = segs * mean + np.sqrt(segs * var) * rng.standard_normal(segs.shape)
    return np.clip(out, 0.0, dur)


def _useful_exact(rng: np.random.Generator, n: np.ndarray, dur: float, restart: float, tau: float,
                  period: float) -> np.ndarray:
    k = max(int(n.max()), 0)
    times = rng.random((n.size, k)) * dur  # (trials, k) failure times, s; row i uses its first n[i]
    times = np.sort(np.where(np.arange(k)[None, :] < n[:, None], times, dur), axis=1)  # padding: empty segments
    edges = np.concatenate([np.zeros((n.size, 1)), times, np.full((n.size, 1), dur)], axis=1)
    seg = np.diff(edges, axis=1)  # (trials, k + 1) segment lengths, s
    seg[:, 1:] -= restart  # every segment after a failure opens with a recovery
    work = np.clip(seg, 0.0, None)  # a failure inside the recovery: no work, the recovery starts again
    done = np.floor(work / period) * tau
    last = np.arange(k + 1)[None, :] == n[:, None]  # the run ends mid-period: that work is kept
    done += last * np.minimum(work - np.floor(work / period) * period, tau)
    return done.sum(axis=1)


def segment_moments(rate, restart: float, tau: float, period: float):
    """Mean and variance of the work kept in one inter-failure segment g ~ Exp(rate), conditioned on the
    segments summing to the run (variance less the part explained by g). Work kept = tau K 1{g > R}, with
    K = floor((g - R) / period) geometric: P(K >= k) = q^k, q = e^(-rate period). Its mean over E[g] is Daly's
    ETTR, tau e^(-R/M) / (M (e^(period/M) - 1)), so the Monte Carlo mean and the closed form agree."""
    q = np.exp(-rate * period)
    alive = np.exp(-rate * restart)  # P(no failure during the recovery)
    ek = q / (1 - q)
    ek2 = q * (1 + q) / (1 - q) ** 2
    ef = tau * alive * ek
    var_f = tau ** 2 * alive * ek2 - ef ** 2
    er = 1 / rate - period * ek  # mean remainder of the period cut by the failure (memoryless)
    efg = tau * alive * (restart * ek + period * ek2 + ek * er)  # E[f g]
    cov = efg - ef / rate
    return ef, np.maximum(var_f - cov ** 2 * rate ** 2, 0.0)
