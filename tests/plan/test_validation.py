"""The public validation set (tests/data/plan_public.toml): one model, one set of parameters, every case."""

import tomllib
from pathlib import Path

import pytest

from megacluster.plan import predict
from megacluster.plan import reliability as rel
from megacluster.plan.power import analyse as power_analyse
from megacluster.plan.scenario import PoolSpec, PowerSpec, ReliabilitySpec

DATA = Path(__file__).resolve().parents[1] / "data" / "plan_public.toml"
PUBLIC = tomllib.loads(DATA.read_text())


def megatron_scenario(row) -> dict:
    """One row of Megatron-LM SC'21 Table 1 as a scenario (Selene: 200 Gb/s IB per GPU, fp16, full recompute)."""
    _, heads, h, layers, tp, pp, gpus, batch, _ = row
    return {"model": {"layers": layers, "hidden": h, "ffn_hidden": 4 * h, "mlp": "gelu", "heads": heads,
                      "vocab": 51200, "seq_len": 2048},
            "train": {"global_batch": batch, "dtype": "fp16", "recompute": "full", "sequence_parallel": False,
                      "zero": 0},
            "parallel": {"tp": tp, "pp": pp, "cp": 1, "dp": gpus // (tp * pp)},
            "fleet": {"gpu": "A100-80GB", "count": gpus, "gpus_per_node": 8, "scale_out_gbps": 200}}


def megatron_published_time(row) -> float:
    """t = F / (GPUs x published TF/s), F = 96 B s l h^2 (1 + s/6h + V/16lh) (the validation file's formula)."""
    _, _, h, l, _, _, gpus, b, tf = row
    s, v = 2048, 51200
    flops = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return flops / (gpus * tf * 1e12)


def test_shipped_copy_is_verbatim():
    # the project's shared/ folder sits beside the repository checkout; a clean clone of the repository alone
    # (as .ci/run uses) has none, and then there is nothing to compare the shipped copy with
    shared = Path(__file__).resolve().parents[3] / "shared" / "validation" / "plan_public.toml"
    if not shared.exists():
        pytest.skip(f"no {shared} beside this checkout to compare tests/data/plan_public.toml with")
    assert shared.read_text() == DATA.read_text()


@pytest.mark.parametrize("case", PUBLIC["perf"], ids=lambda c: c["id"])
def test_llama3_table4(case):
    p = predict({k: case[k] for k in ("model", "train", "parallel", "fleet")}, mc=False)
    tol = case["tolerance_rel"]
    assert p.model_tflops_per_gpu == pytest.approx(case["expect"]["model_tflops_per_gpu"], rel=tol)
    assert p.mfu == pytest.approx(case["expect"]["mfu"], rel=tol)
    assert p.chosen == ["vpp"]  # the source gives all but the interleave depth: the planner chose only that
    assert {k: p.plan[k] for k in case["parallel"]} == case["parallel"]
    assert p.plan["vpp"] > 1 and p.plan["pp"] * p.plan["vpp"] <= case["model"]["layers"]  # interleaved, as Llama 3


@pytest.mark.parametrize("row", PUBLIC["megatron"][0]["rows"], ids=lambda r: f"{r[0]}B")
def test_megatron_sc21_table1(row):
    p = predict(megatron_scenario(row), mc=False)
    assert p.step_time_s == pytest.approx(megatron_published_time(row), rel=PUBLIC["megatron"][0]["tolerance_rel"])
    assert p.fits_in_memory
    assert "micro_batch" in p.chosen and ("vpp" in p.chosen) == (p.plan["pp"] > 1)  # vpp is 1 without a pipeline


def test_llama3_interruptions_by_cause():
    case = PUBLIC["reliability"][0]
    f = case["fleet"]
    r = rel.analyse(ReliabilitySpec(), f["count"] // f["gpus_per_node"], case["duration_days"], mc=True)
    tol = case["tolerance_rel"]
    assert r.unexpected == pytest.approx(case["expect"]["unexpected_interruptions"], rel=tol)
    assert r.planned == pytest.approx(case["expect"]["planned_interruptions"], rel=tol)
    for cause, n in case["causes"].items():
        assert r.by_cause[cause] == pytest.approx(n, rel=tol, abs=1.0)
    assert r.ettr >= case["expect"]["effective_training_time_min"] * (1 - tol)
    lo, mid, hi = r.mc["unexpected_p5_p50_p95"]
    assert lo < 419 < hi and mid == pytest.approx(419, rel=0.05)


@pytest.mark.parametrize("c", PUBLIC["checkpoint_interval"][0]["cases"], ids=lambda c: str(c["mttf_min"]))
def test_daly(c):
    tau = rel.daly_interval(5 * 60, c["mttf_min"] * 60) / 60
    assert tau == pytest.approx(c["tau_min"], rel=PUBLIC["checkpoint_interval"][0]["tolerance_rel"])


def test_colossus_facility_mw():
    case = PUBLIC["power"][0]
    f = case["fleet"]
    pool = PoolSpec(gpu=f["gpu"], count=f["count"], gpus_per_node=f["gpus_per_node"])
    p = power_analyse([pool], PowerSpec(), step_s=1.0, busy_s=1.0, stall_s=0.0)
    assert case["expect"]["facility_mw_min"] <= p.facility_mw <= case["expect"]["facility_mw_max"]
