"""Every scenario key changes what the planner says, by the amount its meaning implies.

The model-shape, parallel, fleet, schedule and reliability-rate keys have their own tests (test_model.py,
test_memory.py, test_reliability.py, test_validation.py). These are the ones whose only tests were bounds or
parsing: each case sets one key on a preset and checks the figure it drives against the preset's own, mostly
exactly (the power formulas are linear in these keys)."""

import copy

import pytest

from megacluster.hardware import get_gpu
from megacluster.plan import ScenarioError, load_scenario, predict
from megacluster.plan.options import compare
from megacluster.plan.power import SIGMA


def _raw(preset: str) -> dict:
    return copy.deepcopy(load_scenario(preset).raw)


def _set(raw: dict, key: str, value) -> dict:
    out = copy.deepcopy(raw)
    section, name = key.split(".")
    out.setdefault(section, {})[name] = value
    return out


def _pair(preset: str, key: str, value, mc: bool = False):
    """(prediction of the preset, prediction with `key` = `value`), as dicts."""
    raw = _raw(preset)
    return predict(raw, mc=mc).to_dict(), predict(_set(raw, key, value), mc=mc).to_dict()


def test_gpu_power_fractions_scale_the_compute_and_the_waiting_draw():
    """llama3-405b: 16,384 H100 (700 W TDP); compute draw 0.95 -> 0.5 of TDP; waiting draw 0.35 -> 0.9."""
    gpus, tdp = 16384, get_gpu("H100-SXM").tdp_w
    base, new = _pair("llama3-405b", "power.gpu_compute_power_frac", 0.5)
    assert base["power"]["it_mw"] - new["power"]["it_mw"] == pytest.approx(gpus * tdp * 0.45 / 1e6)
    assert new["power"]["facility_low_mw"] == pytest.approx(base["power"]["facility_low_mw"])
    base, new = _pair("llama3-405b", "power.gpu_comm_power_frac", 0.9)
    pue = load_scenario("llama3-405b").power.pue
    assert new["power"]["facility_low_mw"] - base["power"]["facility_low_mw"] == pytest.approx(
        gpus * tdp * (0.9 - 0.35) * pue / 1e6)
    assert new["power"]["it_mw"] == pytest.approx(base["power"]["it_mw"])
    assert new["energy_mwh"] > base["energy_mwh"] and new["cost_usd"] > base["cost_usd"]


@pytest.mark.parametrize("key, value, watts_per_gpu", [
    ("power.node_overhead_w", 7000.0, (7000.0 - 3500.0) / 8),  # per 8-GPU node; None is 3,500 W per 8 GPUs
    ("power.network_w_per_gpu", 140.0, 140.0 - 40.0),
])
def test_flat_draws_add_to_every_phase(key, value, watts_per_gpu):
    """Node overhead and network draw while computing and while waiting alike (IT draw, then x PUE)."""
    base, new = _pair("llama3-405b", key, value)
    added = 16384 * watts_per_gpu / 1e6  # MW
    assert new["power"]["it_mw"] - base["power"]["it_mw"] == pytest.approx(added)
    pue = load_scenario("llama3-405b").power.pue
    assert new["power"]["facility_low_mw"] - base["power"]["facility_low_mw"] == pytest.approx(added * pue)
    assert new["energy_mwh"] > base["energy_mwh"]


def test_the_installed_battery_must_cover_both_power_and_energy():
    raw = _raw("llama3-405b")
    need = predict(raw, mc=False).to_dict()["power"]
    assert need["battery_mw_needed"] > 0 and need["battery_mwh_needed"] > 0 and not need["battery_ok"]
    mw, mwh = need["battery_mw_needed"] * 1.01, need["battery_mwh_needed"] * 1.01
    enough = {**raw, "power": {**raw.get("power", {}), "battery_mw": mw, "battery_mwh": mwh}}
    assert predict(enough, mc=False).power["battery_ok"]
    assert not any("battery" in x for x in predict(enough, mc=False).limits)
    assert not any("battery" in x for x in predict(raw, mc=False).limits)  # none installed: the need is a size
    for key in ("battery_mw", "battery_mwh"):  # either one short: not ok, and said
        short = copy.deepcopy(enough)
        short["power"][key] *= 0.5
        p = predict(short, mc=False)
        assert not p.power["battery_ok"], key
        assert any(x.startswith("the battery (") and "cannot flatten the load" in x for x in p.limits), key


@pytest.mark.parametrize("power, match", [
    ({"gpu_compute_power_frac": 0.3, "gpu_comm_power_frac": 0.9}, "power.gpu_comm_power_frac = 0.9 exceeds"),
    ({"gpu_compute_power_frac": 0.05, "gpu_comm_power_frac": 0.0}, "below its idle"),
])
def test_power_fractions_that_contradict_each_other_are_refused(power, match):
    """Waiting drawing more than computing made the full-load figure lower than the low phase and the battery
    need negative (-1.9 MW for llama3-405b at 0.3 / 0.9)."""
    raw = _raw("llama3-405b")
    with pytest.raises(ScenarioError, match=match):
        predict({**raw, "power": {**raw.get("power", {}), **power}}, mc=False)


def test_a_grid_below_the_average_draw_is_said_in_limits():
    raw = _raw("llama3-405b")
    avg = predict(raw, mc=False).power["facility_avg_mw"]
    for grid, ok in ((avg * 1.01, True), (avg * 0.5, False)):
        p = predict({**raw, "power": {**raw.get("power", {}), "grid_mw": grid}}, mc=False)
        assert p.power["grid_ok"] is ok
        assert any(x.startswith(f"average draw {avg:,.1f} MW is above power.grid_mw") for x in p.limits) is not ok


def test_a_pools_lease_rate_is_what_leasing_it_earns():
    """colossus-1: leasing the 20,480 A100s at 3 instead of 1 $/GPU-hour earns 20,480 x 2 x 24 $ more a day."""
    raw = _raw("colossus-1")
    leased = [p for p in raw["fleet"]["pools"] if p["gpu"] == "A100-80GB"]
    assert len(leased) == 1 and leased[0]["lease_usd_per_gpu_hour"] == 1.0
    before = {o["option"]: o for o in compare(load_scenario(raw))["options"]}
    leased[0]["lease_usd_per_gpu_hour"] = 3.0
    after = {o["option"]: o for o in compare(load_scenario(raw))["options"]}
    option = next(k for k in before if "lease" in k)
    assert after[option]["lease_usd_per_day"] - before[option]["lease_usd_per_day"] == pytest.approx(20480 * 2 * 24)
    assert after[option]["net_usd_per_mtok"] < before[option]["net_usd_per_mtok"]
    others = [k for k in before if k != option]
    assert others and all(after[k]["net_usd_per_mtok"] == before[k]["net_usd_per_mtok"] for k in others)


@pytest.mark.parametrize("key, value, figure, factor", [
    ("solar_w_m2", 2 * 1361.0, "array_m2_per_mw", 0.5),
    ("panel_efficiency", 0.15, "array_m2_per_mw", 2.0),
    ("sunlit_fraction", 0.495, "array_m2_per_mw", 2.0),
    ("emissivity", 0.45, "radiator_m2_per_mw", 2.0),
])
def test_orbit_site_sizing_is_inverse_in_each_key(key, value, figure, factor):
    base, new = _pair("orbital-1gw", f"site.{key}", value)
    assert new["site"][figure] == pytest.approx(base["site"][figure] * factor)


def test_radiator_area_follows_stefan_boltzmann_in_both_temperatures():
    sc, raw = load_scenario("orbital-1gw"), _raw("orbital-1gw")
    base = predict(sc, mc=False).site
    eps, t_rad = sc.site.emissivity, sc.site.radiator_temp_k
    assert base["radiator_m2_per_mw"] == pytest.approx(1e6 / (2 * eps * SIGMA * (t_rad ** 4 - 4.0 ** 4)))  # sink: 4 K
    for key, value, t, sink in (("radiator_temp_k", 350.0, 350.0, 4.0), ("sink_temp_k", 250.0, t_rad, 250.0)):
        new = predict(_set(raw, f"site.{key}", value), mc=False).site
        assert new["radiator_m2_per_mw"] == pytest.approx(1e6 / (2 * eps * SIGMA * (t ** 4 - sink ** 4))), key
    shorter_sun = predict(_set(raw, "site.sunlit_fraction", 0.6), mc=False).site
    assert shorter_sun["eclipse_battery_mwh"] > base["eclipse_battery_mwh"]


def test_light_time_is_reported_as_given_and_moves_no_other_figure():
    base, new = _pair("orbital-1gw", "site.light_time_s", 1.5)
    assert base["site"]["light_time_s"] == 0.002 and new["site"]["light_time_s"] == 1.5
    assert {k: v for k, v in new["site"].items() if k != "light_time_s"} == \
        {k: v for k, v in base["site"].items() if k != "light_time_s"}
    assert new["goodput"] == base["goodput"] and new["cost_usd"] == base["cost_usd"]


def test_causes_split_the_interruptions_by_their_weights():
    """Weights are relative: on 8-GPU nodes the total stays the preset's 419 in 54 days, split 1 : 3."""
    base, new = _pair("llama3-405b", "reliability.causes", {"faulty_gpu": 1.0, "psu": 3.0})
    total = base["reliability"]["unexpected"]
    assert new["reliability"]["unexpected"] == pytest.approx(total)
    assert new["reliability"]["by_cause"] == pytest.approx({"faulty_gpu": total / 4, "psu": total * 3 / 4})


def test_a_checkpoint_interval_off_the_optimum_costs_goodput():
    base, new = _pair("llama3-405b", "reliability.checkpoint_interval_s", 36000.0)
    assert new["checkpoint_interval_s"] == 36000.0 != base["checkpoint_interval_s"]
    assert new["ettr"] < base["ettr"] and new["goodput"] < base["goodput"] and new["cost_usd"] > base["cost_usd"]


def test_monte_carlo_seed_and_trials():
    raw = _set(_raw("llama3-405b"), "reliability.trials", 200)
    mc = predict(raw).reliability["monte_carlo"]
    assert mc["trials"] == 200 and predict(raw).reliability["monte_carlo"] == mc  # the seed makes it repeatable
    assert predict(_set(raw, "reliability.seed", 1)).reliability["monte_carlo"]["ettr_mean"] != mc["ettr_mean"]
    more = predict(_set(raw, "reliability.trials", 400)).reliability["monte_carlo"]
    assert more["trials"] == 400 and more["ettr_mean"] != mc["ettr_mean"]


def test_kv_heads_and_sequence_parallel_move_memory():
    """Llama 3 405B, tp = 8: full multi-head attention (kv_heads = heads) has more weights and KV activations
    than 8 KV heads; without sequence parallelism each tensor-parallel rank holds whole-sequence norms."""
    base, mha = _pair("llama3-405b", "model.kv_heads", 128)
    assert mha["memory"]["weights"] > base["memory"]["weights"]
    assert mha["memory"]["activations"] > base["memory"]["activations"]
    assert mha["step_time_s"] > base["step_time_s"]
    assert load_scenario("llama3-405b").train.sequence_parallel
    base, no_sp = _pair("llama3-405b", "train.sequence_parallel", False)
    assert no_sp["memory"]["activations"] > base["memory"]["activations"]


def test_name_and_description_are_shown(tmp_path):
    """In --json, the summary (as written: brackets are not rich markup) and the report."""
    import io

    from megacluster.plan.report import print_summary, write_report

    raw = _raw("llama3-405b")
    raw.update(name="run[1]", description="what if [fleet] went [/fleet]")
    pred = predict(raw, mc=False)
    d = pred.to_dict()
    assert d["name"] == "run[1]" and d["description"] == "what if [fleet] went [/fleet]"
    out = io.StringIO()
    print_summary(pred, file=out)
    assert "megacluster plan: run[1] (16,384 GPUs)" in out.getvalue()
    assert "what if [fleet] went [/fleet]" in out.getvalue()
    pytest.importorskip("matplotlib")
    html = write_report(tmp_path, load_scenario(raw), pred).read_text()
    assert "<em>what if [fleet] went [/fleet]</em>" in html and "megacluster plan: run[1]</h1>" in html
    for key, bad in (("name", 123), ("description", {"a": [1, 2]})):
        with pytest.raises(ScenarioError, match=f"{key} = .* is invalid: must be a string"):
            load_scenario({**raw, key: bad})


def test_the_software_stack_is_shown_and_fp16s_is_named_when_inferred():
    """fp16 resolves the left-out software keys to the 2018-21 stack (unfused attention, the gradient reduce after
    the backward): a bf16 plan's MFU halved in fp16 with the cause only in --json (a user audit)."""
    import io

    from megacluster.plan.report import print_summary

    raw = _raw("llama3-405b")
    lines = {}
    for dtype, extra in (("bf16", {}), ("fp16", {}), ("fp16", {"attention": "flash"}),
                         ("fp16", {"attention": "flash", "overlap_grad_reduce": True})):
        raw["train"] = {**{k: v for k, v in raw["train"].items() if k not in ("attention", "overlap_grad_reduce")},
                        "dtype": dtype, **extra}
        pred = predict(raw, mc=False)
        out = io.StringIO()
        print_summary(pred, file=out)
        text = " ".join(out.getvalue().split())
        lines[(dtype, len(extra))] = [x for x in pred.limits if x.startswith("fp16 is taken")]
        row = {0: "unfused attention, gradient reduce after the backward", 1: "flash attention, gradient reduce "
               "after the backward", 2: "flash attention, gradient reduce overlapped"}[len(extra)]
        assert f"software │ {row if dtype == 'fp16' else 'flash attention, gradient reduce overlapped'}" in text
    assert lines[("bf16", 0)] == [] == lines[("fp16", 2)]
    assert "train.attention and train.overlap_grad_reduce left out" in lines[("fp16", 0)][0]
    assert "train.overlap_grad_reduce left out" in lines[("fp16", 1)][0]
    assert 'set train.overlap_grad_reduce = true for' in lines[("fp16", 1)][0]  # not the attention it was given
    assert "flash" not in lines[("fp16", 1)][0]


def test_small_figures_are_shown_in_units_that_show_them():
    """An 8-GPU plan of 1e8 tokens printed "train days 0.0", "energy 0 MWh in 0.0 days", "interruptions 0 in 0.0
    days" and "battery 0.00 MWh" (a user audit): each figure now takes the unit that shows it."""
    from megacluster.plan.report import _fmt

    assert [_fmt("days", x) for x in (75.0, 0.5, 34.9 / 86400, float("inf"))] == [
        "75.0 days", "12.00 h", "34.9 s", "never"]
    assert [_fmt("hours", x) for x in (3.09, 0.5, 6334.63)] == ["3.09 h", "30.0 min", "6,334.63 h"]
    assert [_fmt("energy", x) for x in (36335.2, 2.5, 0.0025, 0.000107, 0.0)] == [
        "36,335 MWh", "2.50 MWh", "2.5 kWh", "107.0 Wh", "0.00 MWh"]
    assert [_fmt("count", x) for x in (466.2, 3.25, 0.00035, 0.0)] == ["466", "3.2", "0.00035", "0"]
    assert [_fmt("usd", x) for x in (61912245.4, 12.345, 0.0043, 0.0)] == ["$61,912,245", "$12.35", "$0.0043", "$0"]
