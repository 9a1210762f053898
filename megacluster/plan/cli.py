"""`megacluster plan [SCENARIO | --preset NAME] [--report DIR] [--sweep key=v1,v2,...]`.

Parse, predict, print (stderr), return the dict the CLI prints with `--json`. No modelling here."""

from __future__ import annotations

import argparse
import copy
import math
import tomllib
from pathlib import Path

from ..cli import Once
from .predict import predict
from .scenario import SECTIONS, ScenarioError, from_dict, load_preset, load_scenario

DEFAULT_PRESET = "colossus-1"
TABLE_SECTIONS = tuple(s for s in SECTIONS if s not in ("name", "description"))  # the ones --sweep can reach into


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", help="scenario TOML/JSON file or preset name (default: colossus-1)")
    parser.add_argument("--preset", action=Once,
                        help="embedded preset: colossus-1, colossus-2, 1m-gpu, llama3-405b, orbital-1gw")
    parser.add_argument("--report", metavar="DIR", action=Once, help="write DIR/report.html with PNG plots (needs "
                        "matplotlib: pip install 'megacluster[plot]')")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", action=Once,
                        help="vary one scenario key, e.g. fleet.count=8192,16384 (one --sweep per run)")
    parser.add_argument("--no-mc", action="store_true", help="skip the Monte Carlo (analytic reliability only)")


def run(args) -> dict:
    if args.scenario is not None and args.preset is not None:
        raise ScenarioError("give a SCENARIO file or --preset NAME, not both")
    if args.report is not None and not args.report.strip():  # "" is no directory (it used to write no report)
        raise ScenarioError("--report: an empty path; give the directory to write report.html in")
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise ScenarioError(f"--report {args.report}: exists and is not a directory")
    if args.report:  # refuse before computing: the plots need matplotlib, an optional extra (pyproject.toml)
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ScenarioError(f"--report {args.report}: needs matplotlib, which cannot be imported ({e}); "
                                "install it with: pip install 'megacluster[plot]'") from None
    if args.sweep:
        _sweep_key(args.sweep)  # a malformed --sweep is refused before the (slow) prediction, not after it
    sc = load_preset(args.preset) if args.preset is not None else load_scenario(
        DEFAULT_PRESET if args.scenario is None else args.scenario)
    variants = sweep_scenarios(sc.raw, args.sweep) if args.sweep else None  # its values too
    if args.report:
        from .report import prepare_dir
        prepare_dir(Path(args.report))  # a directory that cannot be made or written: refused before computing
    pred = predict(sc, mc=not args.no_mc)
    result = pred.to_dict()
    options = None
    if len(sc.fleet.pools) > 1:
        from .options import compare
        options = compare(sc, as_is=pred)
        result["mixed_fleet"] = options
    sweep = sweep_rows(variants) if variants else None
    if sweep:
        result["sweep"] = sweep
    from .report import print_summary, write_report
    print_summary(pred, options, sweep)
    if args.report:
        path = write_report(Path(args.report), sc, pred, sweep, args.sweep.split("=")[0] if args.sweep else None)
        result["report"] = str(path)
    return finite(result)


def finite(x):
    """`x` with every non-finite float (a job MTTF with no failures, the cost of an option that does not fit)
    replaced by None: `--json` must stay JSON, which has no Infinity or NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def sweep_scenarios(raw: dict, spec: str) -> list[tuple]:
    """(value, scenario) for each value of a dotted key (`section.key=v1,v2`), each checked as a scenario: a bad
    value is refused before any prediction."""
    section, name = _sweep_key(spec)
    key, values = spec.split("=", 1)
    out = []
    for text in values.split(","):
        value = _parse_value(text.strip())
        r = copy.deepcopy(raw)
        if section == "fleet" and name in ("count", "gpu") and "pools" in r.get("fleet", {}):
            raise ScenarioError(f"--sweep {key}: this fleet has pools; sweep fleet.pools is not supported")
        r.setdefault(section, {})[name] = value
        if section == "fleet" and name == "count":
            r.get("parallel", {}).pop("dp", None)
        out.append((value, from_dict(r)))
    return out


def sweep_rows(variants: list[tuple]) -> list[dict]:
    """Predict each of `sweep_scenarios`' scenarios."""
    rows = []
    for value, sc in variants:
        p = predict(sc, mc=False)
        rows.append({"value": value, "step_time_s": p.step_time_s, "mfu": p.mfu, "job_mttf_h": p.job_mttf_h,
                     "ettr": p.ettr, "goodput": p.goodput, "facility_mw": p.facility_mw,
                     "fits_in_memory": p.fits_in_memory})
    return rows


def _sweep_key(spec: str) -> tuple[str, str]:
    """(section, key) of a `--sweep SECTION.KEY=V1,...`; `ScenarioError` unless SECTION is a table section
    (`name` and `description` are strings: there is no key inside them to vary)."""
    if "=" not in spec or "." not in spec.split("=")[0]:
        raise ScenarioError(f"--sweep {spec!r}: expected SECTION.KEY=V1,V2,... (e.g. fleet.count=8192,16384)")
    key = spec.split("=", 1)[0]
    section, name = key.split(".", 1)
    if section not in TABLE_SECTIONS:
        what = "a string, not a table of keys" if section in SECTIONS else "not a section"
        raise ScenarioError(f"--sweep {key}: {section!r} is {what}; a sweep varies SECTION.KEY with SECTION one "
                            f"of {', '.join(TABLE_SECTIONS)} (e.g. fleet.count=8192,16384)")
    return section, name


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
