"""The mixed-fleet question (Colossus-1): train on the fleet as is, balance it, or train on the homogeneous
part and lease the rest to inference. Compared by net cost per million useful training tokens:
(GPU-hours of the whole fleet + electricity - lease revenue) / (tokens/s x ETTR)."""

from __future__ import annotations

import copy
import math

from ..hardware import get_gpu
from .perf import Plan, capacity_gb
from .predict import Prediction, mean_draw_mw, predict, usd
from .scenario import Scenario, ScenarioError, from_dict
from .search import within_tolerance

DEFAULT_LEASE_USD_PER_GPU_HOUR = 1.0  # inference lease rate when a pool does not give one


def _variant(sc: Scenario, **fleet) -> dict:
    raw = copy.deepcopy(sc.raw)
    raw["fleet"] = {**raw["fleet"], **fleet}
    raw.setdefault("parallel", {})
    raw["parallel"] = {k: v for k, v in raw["parallel"].items() if k != "dp"}
    return raw


def compare(sc: Scenario, as_is: Prediction | None = None) -> dict:
    """Three options for a mixed fleet, each predicted in full, and the cheapest per useful token.
    `as_is`: the scenario's own prediction, reused for option (a) when the scenario already uses equal shares.
    An option the scenario's keys do not allow (e.g. a global batch that the fewer replicas of the training
    pools cannot split equally) is listed with `available = false` and the reason, not raised: the user
    asked about the scenario, not about the option's variant of it."""
    pools = sc.raw["fleet"]["pools"]
    peak = {p["gpu"]: get_gpu(p["gpu"]).peak(sc.train.dtype) for p in pools}
    keep = [p for p in pools if peak[p["gpu"]] == max(peak.values())]
    lease = [p for p in pools if p not in keep]
    variants = [("as is (equal shares)", _variant(sc, balance="equal"), []),
                ("balanced (throughput shares)", _variant(sc, balance="throughput"), [])]
    if lease:
        variants.append((f"train on {'+'.join(p['gpu'] for p in keep)}, lease {'+'.join(p['gpu'] for p in lease)}",
                         _variant(sc, pools=keep, balance="throughput"), lease))
    out = []
    for label, raw, leased in variants:
        reuse = as_is is not None and not leased and raw["fleet"]["balance"] == sc.fleet.balance
        try:
            p = as_is if reuse else predict(from_dict(raw), mc=False)
        except ScenarioError as e:
            out.append({"option": label, "available": False, "reason": str(e), "training_gpus":
                        sum(q["count"] for q in raw["fleet"]["pools"]), "fits_in_memory": False,
                        "net_usd_per_mtok": float("inf")})
            continue
        lease_day = sum(q["count"] * q.get("lease_usd_per_gpu_hour", DEFAULT_LEASE_USD_PER_GPU_HOUR) * 24
                        for q in leased)
        assumed = [q["gpu"] for q in leased if "lease_usd_per_gpu_hour" not in q]
        mean_mw = mean_draw_mw(p.power["facility_avg_mw"], p.power["facility_low_mw"], p.reliability["idle_fraction"])
        cost_day = sc.fleet.count * sc.power.usd_per_gpu_hour * 24 + mean_mw * 24 * sc.power.usd_per_mwh
        useful_tok_day = p.tokens_per_s * p.ettr * 86400 if _usable(p) else 0.0
        net = (cost_day - lease_day) / useful_tok_day * 1e6 if useful_tok_day else float("inf")
        out.append({"option": label, "available": True, "training_gpus": p.gpus, "tokens_per_s": p.tokens_per_s,
                    "mfu": p.mfu, "goodput": p.goodput, "train_days": p.train_days, "fits_in_memory": p.fits_in_memory,
                    "lease_usd_per_day": lease_day, "lease_rate_assumed_for": assumed, "net_usd_per_mtok": net,
                    "plan": p.plan})
    ok = [o for o in out if o["available"]]
    if not ok:
        return {"options": out, "recommendation": "no option is available (see each option's reason)", "best": None}
    ok = [o for o in ok if math.isfinite(o["net_usd_per_mtok"])]
    if not ok:  # none fits in memory (or none keeps any progress between failures): none is better than another
        return {"options": out, "recommendation": "no option trains: none fits in GPU memory by the memory model, "
                "or none makes progress between failures (see each option's figures)", "best": None}
    best = min(ok, key=lambda o: o["net_usd_per_mtok"])
    rec = (f"{best['option']}: {usd(best['net_usd_per_mtok'])} net per 1M useful tokens "
           f"({best['tokens_per_s']:,.0f} tok/s)")
    # against the fleet as the scenario plans it (its own fleet.balance), not the dearest option (a user audit: a
    # throughput-balanced plan was set against the equal-shares row; two pools of one GPU read "as is vs as is")
    planned = next(o for o in out if o["option"] == variants[0 if sc.fleet.balance == "equal" else 1][0])
    if best is planned or best["net_usd_per_mtok"] == planned["net_usd_per_mtok"]:
        rec = (f"{planned['option']}, as planned: {usd(planned['net_usd_per_mtok'])} net per 1M useful tokens; no "
               "option is cheaper")
        best = planned
    elif planned["available"]:
        rec += f", against {usd(planned['net_usd_per_mtok'])} as planned: {planned['option']}"
    if best.get("lease_rate_assumed_for"):
        rec += (f"; the lease rate of {', '.join(best['lease_rate_assumed_for'])} is assumed "
                f"(${DEFAULT_LEASE_USD_PER_GPU_HOUR:.2f} per GPU-hour): give fleet.pools[].lease_usd_per_gpu_hour")
    return {"options": out, "recommendation": rec, "best": best["option"]}


def _usable(p: Prediction) -> bool:
    """The option's plan fits, or is over by the memory model only within its tolerance (the search's own rule
    for recommending it: `search.rank`). A plan further over (no plan fits) trains nothing."""
    if p.fits_in_memory:
        return True
    over = max(q["memory_gb_per_gpu"] / capacity_gb(q["gpu"]) for q in p.pools)
    return within_tolerance(Plan(**p.plan), over)
