"""The large presets: searched plans respect the NVL72 rack, and the output says why MFU is low."""

from megacluster.plan import predict


def test_colossus2_searched_plan_is_plausible():
    p = predict("colossus-2", mc=False)
    assert p.plan["tp"] <= 8 and 72 % p.plan["tp"] == 0  # tp groups tile a 72-GPU rack
    assert 0.30 <= p.mfu <= 0.50 and p.fits_in_memory


def test_1m_gpu_is_bubble_bound_and_says_so():
    p = predict("1m-gpu", mc=False)
    assert p.bubble_fraction > 0.3
    assert any("bubble" in line for line in p.limits) and "64 tokens per GPU" in p.limits[0]
    bigger = predict({**_raw("1m-gpu"), "train": {**_raw("1m-gpu")["train"], "global_batch": 16384}}, mc=False)
    assert bigger.bubble_fraction < p.bubble_fraction and bigger.mfu > p.mfu


def _raw(name):
    import tomllib
    from pathlib import Path

    import megacluster.plan as plan
    return tomllib.loads((Path(plan.__file__).parent / "presets" / f"{name}.toml").read_text())


def test_colossus1_default_is_searched_and_says_why_as_is_is_slow():
    from megacluster.plan.options import compare
    from megacluster.plan.scenario import load_preset
    sc = load_preset("colossus-1")
    p = predict(sc, mc=False)
    assert set(p.chosen) >= {"tp", "pp", "cp"} and p.fits_in_memory  # searched, not fixed
    assert p.bubble_fraction < 0.15
    assert 30e6 <= sc.train.global_batch * sc.model.seq_len <= 70e6  # frontier-sized step
    assert any("equal shares" in line and "A100" in line for line in p.limits)
    o = compare(sc, as_is=p)
    as_is, balanced, hopper = o["options"]
    assert as_is["tokens_per_s"] == p.tokens_per_s  # option (a) is the headline prediction
    assert balanced["tokens_per_s"] > 1.5 * as_is["tokens_per_s"]  # A100s no longer set the pace
    assert o["best"] == hopper["option"] and "lease A100" in o["best"]
