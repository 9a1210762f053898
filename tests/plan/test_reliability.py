"""Monte Carlo of failures and recoveries against Daly's closed form, from 1k to 1M GPUs."""

import math

import numpy as np
import pytest

from megacluster.plan import reliability as rel
from megacluster.plan.scenario import ReliabilitySpec

SPECS = {"llama3-restarts": ReliabilitySpec(), "fast-restarts": ReliabilitySpec(checkpoint_write_s=5, restart_s=60)}


@pytest.mark.parametrize("gpus", [1024, 16384, 131072, 1 << 20])
@pytest.mark.parametrize("name", SPECS)
def test_monte_carlo_mean_matches_daly(gpus, name):
    r = rel.analyse(SPECS[name], gpus // 8, 90)
    assert r.mc["ettr_mean"] == pytest.approx(r.ettr, rel=0.02)
    lo, _, hi = r.mc["ettr_p5_p50_p95"]
    assert lo <= r.ettr <= hi


@pytest.mark.parametrize("gpus,days", [(1024, 30), (16384, 10), (131072, 2), (1 << 20, 0.5)])
def test_exact_segment_simulation_matches_daly(gpus, days):
    """The exact path (failure times drawn, every segment simulated) shares no formula with Daly's; at 1M
    GPUs the job MTTF (~170 s) is below the 240 s restart and most failures land inside a recovery."""
    spec = SPECS["llama3-restarts"]
    r = rel.analyse(spec, gpus // 8, days, mc=False)
    lam = sum(rel.cause_rates(spec, gpus // 8).values())
    dur = days * 86400.0
    rng = np.random.default_rng(3)
    n = rng.poisson(lam * dur, 400)
    tau = r.checkpoint_interval_s
    useful = rel._useful_work(rng, n, dur, spec.restart_s, tau, tau + spec.checkpoint_write_s, exact_max=10**9)
    unplanned = rel.daly_ettr(tau, spec.checkpoint_write_s, spec.restart_s, 1 / lam)
    assert useful.mean() / dur == pytest.approx(unplanned, rel=0.03)


def test_failures_during_recovery_extend_it_instead_of_charging_a_restart_each():
    spec = SPECS["llama3-restarts"]
    r = rel.analyse(spec, (1 << 20) // 8, 90)
    assert r.job_mttf_h * 3600 < spec.restart_s  # a full restart per failure would leave nothing
    assert r.unexpected * spec.restart_s > 90 * 86400
    assert 0.05 < r.mc["ettr_mean"] < 0.3


def test_normal_limit_matches_exact_percentiles():
    spec = SPECS["fast-restarts"]
    lam = sum(rel.cause_rates(spec, (1 << 20) // 8).values())
    dur = 86400.0
    n = np.random.default_rng(0).poisson(lam * dur, 1000)
    tau = rel.daly_interval(5, 1 / lam)
    exact, normal = (rel._useful_work(np.random.default_rng(1), n, dur, 60, tau, tau + 5, exact_max=m) / dur
                     for m in (10**9, 0))
    assert np.percentile(normal, [5, 50, 95]) == pytest.approx(np.percentile(exact, [5, 50, 95]), abs=0.005)


def _daly_direct(tau, delta, restart, mttf):
    """Daly's eq. 13 as written (overflows for R >> M): the reference in the range where it does not."""
    return 1 / (mttf / tau * np.exp(restart / mttf) * np.expm1((tau + delta) / mttf))


@pytest.mark.parametrize("tau, delta, restart, mttf", [(1800, 30, 240, 11_000), (33, 5, 60, 128), (1, 5, 3600, 128),
                                                       (5e4, 30, 600, 1e6)])
def test_daly_ettr_in_logs_is_the_closed_form(tau, delta, restart, mttf):
    assert rel.daly_ettr(tau, delta, restart, mttf) == pytest.approx(_daly_direct(tau, delta, restart, mttf), rel=1e-12)


@pytest.mark.parametrize("tau, delta, restart, mttf", [(33, 5, 2 * 86400, 128), (1e6, 5, 60, 128), (1, 1e300, 0, 1)])
def test_daly_ettr_is_zero_where_the_closed_form_overflows(tau, delta, restart, mttf):
    """e^(R/M) or e^((tau+delta)/M) past ~e^710 overflows a float; the ETTR there is 0 to double precision."""
    assert rel.daly_ettr(tau, delta, restart, mttf) == 0.0


def test_monte_carlo_continues_across_the_long_run_switch():
    """Either side of MC_MAX_EVENTS interruptions per trial the simulated trials and the long-run limit agree
    with each other and with Daly (restart 2,000 s against a ~2-minute job MTTF: ETTR ~1e-7)."""
    spec = ReliabilitySpec(checkpoint_write_s=5, restart_s=2000)
    nodes = (1 << 20) // 4
    lam = sum(rel.cause_rates(spec, nodes, 4).values()) + spec.planned_per_day / rel.DAY
    below, above = (rel.analyse(spec, nodes, f * rel.MC_MAX_EVENTS / lam / rel.DAY, gpus_per_node=4) for f in (0.5, 2))
    assert below.mc["regime"] == "simulated" and above.mc["regime"] == "long-run limit"
    assert below.ettr < 1e-6
    assert below.mc["ettr_mean"] == pytest.approx(below.ettr, rel=0.02)
    assert above.mc["ettr_mean"] == pytest.approx(above.ettr, rel=1e-9) == pytest.approx(below.ettr, rel=1e-9)
    assert above.mc["unexpected_p5_p50_p95"][1] == pytest.approx(above.unexpected, rel=1e-9)
    lo, mid, hi = above.mc["interruptions_p5_p50_p95"]
    assert lo < mid < hi and (hi - lo) / mid < 1e-5  # Poisson: sd / mean = 1 / sqrt(mean)


def test_an_infinite_run_with_no_failures_counts_none():
    """A run that never finishes because planned restarts (1 a day, each a day long) take all its time: zero
    failures over an infinite horizon is 0, not 0 x inf = nan, and the Monte Carlo says ETTR 0 too."""
    spec = ReliabilitySpec(node_failures_per_1000_node_days=0, planned_per_day=1, restart_s=86400)
    r = rel.analyse(spec, 1024, math.inf)
    assert r.ettr == 0 and r.unexpected == 0 and r.planned == math.inf and set(r.by_cause.values()) == {0.0}
    assert r.mc["ettr_mean"] == 0 and r.mc["unexpected_p5_p50_p95"] == [0, 0, 0]
    assert r.mc["interruptions_p5_p50_p95"] == [math.inf] * 3


def _poisson_tail(s: int, mu: float) -> float:
    """P(X >= s), X ~ Poisson(mu), summed from the pmf in logs (an independent reference)."""
    return 1.0 - sum(math.exp(i * math.log(mu) - mu - math.lgamma(i + 1)) for i in range(s))


@pytest.mark.parametrize("spares, mu", [(1, 0.5), (3, 2.0), (10, 4.0), (40, 30.0)])
def test_spare_wait_is_the_chance_of_no_free_spare_times_the_first_repair(spares, mu):
    """Nodes in repair ~ Poisson(hw_rate x repair): a failure that finds all S spares out waits repair / (S + 1)."""
    spec = ReliabilitySpec(spare_nodes=spares, repair_h=24.0)
    rate = mu / (24.0 * 3600)  # hardware failures per s
    want = _poisson_tail(spares, mu) * 24.0 * 3600 / (spares + 1)
    assert rel.spare_wait(spec, rate) == pytest.approx(want, rel=1e-9)
    assert rel.spare_wait(ReliabilitySpec(spare_nodes=0, repair_h=24.0), rate) == 24.0 * 3600  # never a spare
    assert rel.spare_wait(ReliabilitySpec(spare_nodes=None), rate) == 0.0  # enough hot spares


def test_a_huge_spare_pool_never_waits_and_costs_no_loop():
    """The Poisson sum stops once its terms are below double precision: spare_nodes = 1e18 used to loop 1e18
    times (the plan never answered)."""
    spec = ReliabilitySpec(spare_nodes=10**18, repair_h=24.0)
    assert 0.0 <= rel.spare_wait(spec, 10 / (24.0 * 3600)) < 1e-20  # s: 1 - P(X < S) is 0 up to rounding
    assert 0.0 <= rel.spare_wait(ReliabilitySpec(spare_nodes=1000, repair_h=24.0), 40 / (24.0 * 3600)) < 1e-12


def test_idle_fraction_by_hand():
    """Recoveries (restart x rate, plus restart + a write per planned stop) and, of the rest, delta / (tau + delta)."""
    from megacluster.plan.reliability import idle_fraction
    spec = ReliabilitySpec(restart_s=100.0, checkpoint_write_s=10.0)
    assert idle_fraction(spec, 90.0, 100.0, 1e-4, 0.0) == pytest.approx(0.01 + 0.99 * 0.1)
    assert idle_fraction(spec, 90.0, 100.0, 1e-4, 1e-4) == pytest.approx(0.021 + 0.979 * 0.1)  # + 1e-4 x 110 s
    assert idle_fraction(spec, 90.0, 100.0, 1.0, 0.0) == 1.0  # always recovering
