"""Monte Carlo of failures and recoveries against Daly's closed form, from 1k to 1M GPUs."""

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
