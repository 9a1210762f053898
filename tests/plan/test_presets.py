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
