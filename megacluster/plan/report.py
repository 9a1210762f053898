"""Human output: a rich table on stderr, and `--report DIR` (report.html + PNG plots, matplotlib Agg)."""

from __future__ import annotations

import html
import math
import sys
from dataclasses import replace
from pathlib import Path

from ..files import probe_writable
from ..hardware import get_gpu
from . import reliability as rel
from .perf import Plan, fleet_step, model_flops_per_token
from .predict import Prediction, duration, usd
from .scenario import PoolSpec, Scenario, ScenarioError

ROWS = (  # (key, label, format: a str.format pattern or one of _fmt's units[, joiner, path, format of a 2nd value])
    ("step_time_s", "step time", "{:.2f} s"), ("tokens_per_s", "throughput", "{:,.0f} tok/s"),
    ("model_tflops_per_gpu", "model TFLOP/s per GPU", "{:.0f}"), ("mfu", "MFU", "{:.1%}"),
    ("memory_gb_per_gpu", "memory per GPU", "{:.1f} GB"), ("fits_in_memory", "fits in memory", "{}"),
    ("bubble_fraction", "pipeline bubble", "{:.1%}"), ("exposed_comm_fraction", "exposed communication", "{:.1%}"),
    ("job_mttf_h", "job MTTF", "hours"),
    ("interruptions", "interruptions", "count", " in ", ("reliability", "duration_days"), "days"),
    ("checkpoint_interval_s", "checkpoint interval", "{:,.0f} s"), ("ettr", "ETTR", "{:.1%}"),
    ("goodput", "goodput (MFU x ETTR)", "{:.1%}"), ("train_days", "train time", "days"),
    ("facility_mw", "facility power (full load)", "power"), ("load_swing_mw", "load swing", "power"),
    ("battery_mwh_needed", "battery to flatten", "energy"),
    ("energy_mwh", "energy", "energy", " in ", ("energy_days",), "days"),
    ("cost_usd", "cost", "usd", " in ", ("energy_days",), "days"),
)


def _row(row: tuple, d: dict) -> str:
    key, _, fmt, *more = row
    text = _fmt(fmt, d[key])
    if more and d[key] is not None:
        joiner, path, fmt2 = more
        second = d
        for k in path:
            second = second[k]
        text += joiner + _fmt(fmt2, second)
    return text


def _software(d: dict) -> str:
    sw = d["software"]
    return f"{sw['attention']} attention, gradient reduce " + (
        "overlapped with the backward" if sw["overlap_grad_reduce"] else "after the backward")


def _fmt(fmt: str, v) -> str:
    """A figure in units that show it: small plans printed "0 MWh in 0.0 days" and "train days 0.0" (a user audit)."""
    if v is None:
        return "-"
    if fmt == "power":  # MW, or kW below 1 MW (a 16-GPU plan drew "0.0 MW")
        return f"{v:,.1f} MW" if v >= 1 or v == 0 else f"{v * 1000:,.1f} kW"
    if fmt == "energy":  # MWh, or kWh below 1 MWh, Wh below 1 kWh
        if v >= 1 or v == 0:
            return f"{v:,.0f} MWh" if v >= 10 else f"{v:,.2f} MWh"
        return f"{v * 1000:,.1f} kWh" if v >= 1e-3 else f"{v * 1e6:,.1f} Wh"
    if fmt == "usd":
        return usd(v)
    if fmt == "count":
        return f"{v:,.0f}" if v >= 10 or v == 0 else f"{v:.2g}"
    if fmt in ("days", "hours"):  # in its own unit down to 1, then h, min, s
        return duration(v * (86400 if fmt == "days" else 3600), fmt)
    return fmt.format(v)


def print_summary(pred: Prediction, options: dict | None = None, sweep: list | None = None, file=None) -> None:
    """Readable summary on stderr (rich when available)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console(file=file or sys.stderr, width=110)
    d = pred.to_dict()
    plan = ", ".join(f"{k}={v}" for k, v in d["plan"].items())
    # Text, not markup: a name or description of the user's such as "see [fleet]" is printed as written
    t = Table(title=Text(f"megacluster plan: {pred.name} ({pred.gpus:,} GPU{'s' if pred.gpus > 1 else ''})"),
              caption=Text(pred.description) if pred.description else None, show_header=False)
    for row in ROWS:
        t.add_row(row[1], _row(row, d))
    t.add_row("parallel plan", plan + (f"  (chosen: {', '.join(d['chosen'])})" if d["chosen"] else ""))
    t.add_row("software", _software(d))
    con.print(t)
    for line in pred.limits:
        con.print(f"  - {line}", markup=False)
    if options:
        _print_options(con, options)
    if sweep:
        st = Table(title="sweep")
        for col in sweep[0]:
            st.add_column(col)
        for row in sweep:
            st.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        con.print(st)


def _print_options(con, options: dict) -> None:
    from rich.table import Table

    t = Table(title="mixed fleet: what to do with it")
    for col in ("option", "training GPUs", "tokens/s", "MFU", "train time", "lease $/day", "net $ per 1M tokens"):
        t.add_column(col)
    for o in options["options"]:
        if not o["available"]:
            t.add_row(o["option"], f"{o['training_gpus']:,}", "-", "-", "-", "-", "unavailable")
            continue
        t.add_row(o["option"], f"{o['training_gpus']:,}", f"{o['tokens_per_s']:,.0f}", f"{o['mfu']:.1%}",
                  _fmt("days", o["train_days"]), f"{o['lease_usd_per_day']:,.0f}",
                  usd(o["net_usd_per_mtok"]).lstrip("$"))
    con.print(t)
    for o in options["options"]:
        if not o["available"]:
            con.print(f"unavailable: {o['option']}: {o['reason']}", markup=False)
    con.print(f"[bold]recommendation:[/bold] {options['recommendation']}")


# ---------------------------------------------------------------------------------------------- html
def prepare_dir(out: Path) -> None:
    """Make the report directory `out` and check that a file can be written in it; `ScenarioError` naming it
    (exit 2) if not. The CLI calls it before the prediction, so a bad --report costs no computing."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as e:
        raise _cannot_write(out, e) from None


def _cannot_write(out: Path, e: OSError) -> ScenarioError:
    return ScenarioError(f"--report {out}: cannot write the report there: {e.strerror} ({e.filename or out})")


def write_report(out: Path, sc: Scenario, pred: Prediction, sweep: list | None = None,
                 sweep_key: str | None = None) -> Path:
    """Write report.html and PNG plots into `out`; returns the HTML path. A directory that cannot be made or
    written raises `ScenarioError` naming it (exit 2)."""
    try:
        return _write_report(out, sc, pred, sweep, sweep_key)
    except OSError as e:
        raise _cannot_write(out, e) from None


def _write_report(out: Path, sc: Scenario, pred: Prediction, sweep: list | None, sweep_key: str | None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pngs = [_scale_plot(plt, out, sc, pred), _breakdown_plot(plt, out, pred), _power_plot(plt, out, pred)]
    if sweep:
        pngs.append(_sweep_plot(plt, out, sweep, sweep_key))
    d = pred.to_dict()
    cells = [(row[1], _row(row, d)) for row in ROWS] + [("software", _software(d))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in cells)
    imgs = "".join(f'<p><img src="{p.name}" width="640"></p>' for p in pngs)
    about = f"<p><em>{html.escape(pred.description)}</em></p>" if pred.description else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>megacluster plan: {html.escape(pred.name)}"
            f"</title></head><body><h1>megacluster plan: {html.escape(pred.name)}</h1>{about}"
            f"<p>{pred.gpus:,} GPUs; plan {html.escape(str(d['plan']))}</p><table border=1>{rows}</table>"
            f"<ul>{''.join(f'<li>{html.escape(x)}</li>' for x in pred.limits)}</ul>{imgs}"
            "</body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path


def scale_curve(sc: Scenario, pred: Prediction, counts: list[int]) -> list[tuple[int, float, float]]:
    """(GPUs, job MTTF h, goodput) when the scenario's replica is replicated (weak scaling: batch per replica
    fixed) over `counts` GPUs of its first pool."""
    p = pred.plan
    size = p["tp"] * p["pp"] * p["cp"]
    pool0 = sc.fleet.pools[0]
    out = []
    for n in counts:
        dp = max(1, n // size)
        pool = PoolSpec(gpu=pool0.gpu, count=dp * size, gpus_per_node=pool0.gpus_per_node)
        seqs = sc.train.global_batch / p["dp"]
        tr = replace(sc.train, global_batch=max(1, round(seqs * dp)))
        plan = Plan(**{**p, "dp": dp})
        fs = fleet_step(sc.model, tr, plan, [pool], sc.fleet.scale_out_gbps, sc.fleet.oversubscription,
                        rail=sc.fleet.topology == "rail-optimized", rail_nodes=sc.fleet.rail_switch_nodes)
        flops = model_flops_per_token(sc.model) * tr.global_batch * sc.model.seq_len
        mfu = flops / fs.step_time_s / pool.count / get_gpu(pool0.gpu).peak(sc.train.dtype)
        r = rel.analyse(sc.reliability, math.ceil(pool.count / pool.gpus_per_node), 1.0, mc=False,
                        gpus_per_node=pool.gpus_per_node)
        out.append((pool.count, r.job_mttf_h, mfu * r.ettr))
    return out


def _scale_plot(plt, out: Path, sc: Scenario, pred: Prediction) -> Path:
    counts = [1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000]
    pts = scale_curve(sc, pred, counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label="goodput (MFU x ETTR)")
    ax.set_xscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("goodput")
    ax2 = ax.twinx()
    ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="tab:red", label="job MTTF (h)")
    ax2.set_yscale("log")
    ax2.set_ylabel("job MTTF (h)")
    # weak scaling, said on the chart: at 1M GPUs its batch is ~60x the scenario's, unlike a --sweep fleet.count
    seqs = sc.train.global_batch / pred.plan["dp"]
    ax.set_title(f"goodput and job MTTF vs {sc.fleet.pools[0].gpu} count: weak scaling (the plan's replica, "
                 f"{seqs:g} sequences each)", fontsize=9)
    fig.legend(loc="lower left")
    return _save(plt, fig, out / "scale.png")


def _breakdown_plot(plt, out: Path, pred: Prediction) -> Path:
    b = {k: v for k, v in pred.breakdown.items() if k.endswith("_s")}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(b), list(b.values()))
    ax.set_xlabel("s per step (critical replica)")
    ax.set_title("time breakdown")
    return _save(plt, fig, out / "breakdown.png")


def _power_plot(plt, out: Path, pred: Prediction) -> Path:
    tr = pred.power["trace"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step([t for t, _ in tr[:-1]], [mw for _, mw in tr[:-1]], where="post", label="facility")
    ax.axhline(pred.power["facility_avg_mw"], ls="--", color="gray", label="average (flattened grid draw)")
    ax.set_xlabel("s within one step")
    ax.set_ylabel("MW")
    ax.set_title("power over a step")
    ax.legend()
    return _save(plt, fig, out / "power.png")


def _sweep_plot(plt, out: Path, sweep: list, key: str | None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = [str(r["value"]) for r in sweep]
    for metric in ("mfu", "goodput", "ettr"):
        ax.plot(xs, [r[metric] for r in sweep], "o-", label=metric)
    ax.set_xlabel(key or "value")
    ax.legend()
    ax.set_title(f"sweep of {key}")
    return _save(plt, fig, out / "sweep.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
