"""`megacluster train` flags. Each dedicated flag is an alias of exactly one config key (FLAGS)."""

from __future__ import annotations

import argparse
import sys

from .. import config
from ..cli import Once
from . import inputs, zygote
from .signals import outside_steps

# flag dest -> config key it sets (applied after preset, --config and --set, so flags win)
FLAGS = {
    "workers": "run.workers",
    "device": "run.device",
    "max_steps": "run.max_steps",
    "run_dir": "run.run_dir",
    "balance": "run.balance",
    "chaos": "run.chaos",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    once = {"action": Once}  # a single-value flag given twice is refused, not overwritten
    p.add_argument("--preset", default="tiny", help=f"named config: {', '.join(config.PRESETS)} (default tiny)",
                   **once)
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model] [data] [optim] [run] tables", **once)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="text files, directories (hidden ones skipped), globs, .jsonl (field 'text'), or token "
                        "shards: .npy, or .bin of raw uint16 ids (text or shards, not both; repeatable; default: "
                        "the Python standard library source; text is read up to data.max_bytes, 12 MB)")
    p.add_argument("--workers", type=int, help="local worker processes (data parallel: gloo on CPU, NCCL on GPU)",
                   **once)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device (default auto)", **once)
    p.add_argument("--max-steps", type=int, help="optimizer steps to train", **once)
    p.add_argument("--run-dir", help="where checkpoints, metrics.jsonl, config.json and result.json go",
                   **once)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --run-dir")
    p.add_argument("--balance", choices=("equal", "auto"), help="batch shares: equal, or by measured throughput",
                   **once)
    p.add_argument("--chaos", metavar="SPEC", help='fault injection, e.g. "kill:rank=1,step=60; flap:step=90"',
                   **once)


def build_config(args: argparse.Namespace) -> config.Config:
    cfg = config.build(args.preset, args.config, args.set, check=False)  # validated below, with the flags
    for dest, key in FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            config.set_value(cfg, key, value)
    if args.data:
        cfg.data.paths = list(args.data)
    if args.resume:
        cfg.run.resume = True
    config.validate(cfg)
    return cfg


def run(args: argparse.Namespace) -> dict | None:
    cfg = build_config(args)  # bad input fails here and in inputs.check, before torch is imported
    with outside_steps(), inputs.refused_runs_leave_no_dir(cfg.run.run_dir):
        inputs.check(cfg)
        with inputs.run_dir_lock(cfg):  # before torch: a run dir in use is refused at once
            zygote.prestart(cfg.run)  # its imports (when it will fork the workers) run beside ours
            from .supervisor import train

            result = train(cfg, checked=True)
    if result is not None:
        print(summary(result), file=sys.stderr)
    return result


def summary(r: dict) -> str:
    """One human line about a finished run (stderr; the machine-readable result is --json)."""
    val = f", val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    if r.get("stopped"):
        return (f"stopped by {r['stopped']} after step {r['steps']}, loss {r['final_loss']:.4f}: the checkpoint of "
                f"that step is in {r['run_dir']}/checkpoints; the same command with --resume continues exactly")
    rate = f"{r['tokens_per_s']:,.0f} tok/s{mfu}" if r["tokens_per_s"] else "no step left to train"  # (--resume)
    line = (f"done: {r['steps']} steps on {r['world']} worker(s), loss {r['final_loss']:.4f}{val}, {rate}; "
            f"run dir {r['run_dir']}")
    if "goodput" in r:
        line += (f"\nresilience: {r['restarts']} restarts, {r['recoveries_from_peer']} recoveries from a peer, "
                 f"{r['recoveries_from_checkpoint']} from a checkpoint, {r['flaps_survived']} flaps survived, "
                 f"{r['lost_steps']} steps lost, goodput {r['goodput']:.2f}, loss digest {r['loss_digest'][:12]}")
    return line
