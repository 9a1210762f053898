"""Power, energy, cost, synchronous load swing and batteries; solar/radiator sizing for orbital and Mars sites.

A synchronous training step is a two-level square wave per GPU: compute (board at ~TDP) and the phases where
every GPU waits at once (pipeline bubble, exposed data-parallel collective, optimizer, checkpoint stalls).
Node overhead (CPUs, DRAM, NICs, NVSwitch, fans) and scale-out network draw are flat. Facility = IT x PUE.
Sources: DGX H100 system max 10.2 kW for 8 x 700 W GPUs (NVIDIA DGX H100 datasheet); solar constant
1361 W/m^2; radiator: Stefan-Boltzmann, two-sided panel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hardware import get_gpu
from .scenario import PoolSpec, PowerSpec, SiteSpec

SIGMA = 5.670374419e-8  # W m^-2 K^-4
DEFAULT_NODE_OVERHEAD_W = 3500.0  # W per 8-GPU node (DGX H100: 10.2 kW max - 8 x 700 W GPUs = 4.6 kW at max)


@dataclass(kw_only=True, slots=True)
class PowerResult:
    it_mw: float  # IT draw at full training load (compute phase)
    facility_mw: float  # facility draw at full training load = IT x PUE
    facility_avg_mw: float  # time-averaged over a step
    facility_low_mw: float  # while every GPU waits (collective, bubble, checkpoint)
    load_swing_mw: float  # facility_mw - facility_low_mw
    battery_mw_needed: float
    battery_mwh_needed: float
    battery_ok: bool  # the installed battery covers the need
    grid_ok: bool  # the average draw fits under the grid cap
    trace: list  # [(t_s, facility_mw)] over one step, for plots


def pool_watts(pool: PoolSpec, spec: PowerSpec) -> tuple[float, float]:
    """(W at compute, W while waiting) for all GPUs of a pool including node overhead and network."""
    gpu = get_gpu(pool.gpu)
    overhead = (spec.node_overhead_w if spec.node_overhead_w is not None
                else DEFAULT_NODE_OVERHEAD_W * pool.gpus_per_node / 8) / pool.gpus_per_node
    flat = overhead + spec.network_w_per_gpu
    idle = max(gpu.idle_w, gpu.tdp_w * spec.gpu_comm_power_frac)
    return pool.count * (gpu.tdp_w * spec.gpu_compute_power_frac + flat), pool.count * (idle + flat)


def analyse(pools: list[PoolSpec], spec: PowerSpec, step_s: float, busy_s: float | list[float],
            stall_s: float) -> PowerResult:
    """Power for a step of `step_s` seconds of which each pool computes its `busy_s` (one figure for all, or
    one per pool: in a mixed fleet a faster pool finishes its share and waits for the slowest); `stall_s`:
    longest all-idle stretch (a restart) the battery must absorb to keep the grid draw flat."""
    pue = spec.pue
    watts = [pool_watts(p, spec) for p in pools]
    busy = [min(max(b, 0.0), step_s) for b in (busy_s if isinstance(busy_s, list) else [busy_s] * len(pools))]
    hi = sum(w[0] for w in watts) * pue / 1e6  # MW, every pool computing (the start of a step)
    lo = sum(w[1] for w in watts) * pue / 1e6
    # the draw over a step: a staircase down from hi as pools finish computing, to lo
    ends = sorted(set(busy) | {0.0, step_s})
    steps = [(t0, t1, lo + sum((w[0] - w[1]) * pue / 1e6 for w, b in zip(watts, busy) if b >= t1))
             for t0, t1 in zip(ends, ends[1:])]  # (from s, to s, MW)
    avg = sum((t1 - t0) * mw for t0, t1, mw in steps) / step_s if step_s > 0 else hi

    def above(level: float) -> float:  # MWh per step drawn above `level`
        return sum((t1 - t0) * max(mw - level, 0.0) for t0, t1, mw in steps) / 3600
    grid = spec.grid_mw
    if grid is None or grid < avg:  # flatten around the average (and flag a grid shortfall)
        target = avg
        bat_mw = max(hi - avg, avg - lo)
        bat_mwh = max(above(avg), (avg - lo) * stall_s / 3600)
    else:  # only shave the peaks above the cap; recharge in the low phases
        target = grid
        bat_mw = max(hi - grid, 0.0)
        bat_mwh = above(grid)
    ok = bat_mw <= spec.battery_mw + 1e-9 and bat_mwh <= spec.battery_mwh + 1e-9
    trace = [pt for t0, t1, mw in steps for pt in ((t0, mw), (t1, mw))] + [(step_s, target)]
    return PowerResult(it_mw=hi / pue, facility_mw=hi, facility_avg_mw=avg, facility_low_mw=lo,
                       load_swing_mw=hi - lo, battery_mw_needed=bat_mw, battery_mwh_needed=bat_mwh,
                       battery_ok=ok, grid_ok=grid is None or grid >= avg, trace=trace)


def site_defaults(site: SiteSpec) -> dict:
    """Irradiance, sunlit fraction, sink temperature and light time for the site kind (explicit keys win)."""
    d = {"earth": (0.0, 1.0, 290.0, 0.0), "orbit": (1361.0, 0.99, 4.0, 0.002), "mars": (590.0, 0.5, 210.0, 750.0)}
    solar, sun, sink, light = d[site.kind]
    return {"solar_w_m2": site.solar_w_m2 if site.solar_w_m2 is not None else solar,
            "sunlit_fraction": site.sunlit_fraction if site.sunlit_fraction is not None else sun,
            "sink_temp_k": site.sink_temp_k if site.sink_temp_k is not None else sink,
            "light_time_s": site.light_time_s if site.light_time_s is not None else light}


def site(site: SiteSpec, facility_avg_mw: float) -> dict:
    """Solar array and radiator sizing off Earth. The array charges the eclipse battery while sunlit, so it
    delivers average power / sunlit fraction; the radiator rejects all of it (two-sided, at radiator_temp_k)."""
    d = site_defaults(site)
    out = {"kind": site.kind, "light_time_s": d["light_time_s"]}
    if site.kind == "earth":
        return out
    per_m2 = d["solar_w_m2"] * site.panel_efficiency  # W/m^2 of array while lit
    array_m2_per_mw = 1e6 / (per_m2 * d["sunlit_fraction"]) if per_m2 > 0 else float("inf")
    flux = 2 * site.emissivity * SIGMA * (site.radiator_temp_k ** 4 - d["sink_temp_k"] ** 4)  # W/m^2 of panel
    radiator_m2_per_mw = 1e6 / flux if flux > 0 else float("inf")
    eclipse_h = (1 - d["sunlit_fraction"]) * (1.6 if site.kind == "orbit" else 24.6)  # orbit ~96 min, sol 24.6 h
    out.update(array_m2_per_mw=array_m2_per_mw, radiator_m2_per_mw=radiator_m2_per_mw,
               array_km2=array_m2_per_mw * facility_avg_mw / 1e6, radiator_km2=radiator_m2_per_mw * facility_avg_mw / 1e6,
               eclipse_battery_mwh=facility_avg_mw * eclipse_h, sunlit_fraction=d["sunlit_fraction"])
    return out
