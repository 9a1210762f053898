"""`megacluster <verb>`: parse, build, run, close. No logic lives here.

Each verb module exposes ``add_arguments(parser)`` and ``run(args) -> dict``. The dict is the run's
result; with ``--json`` it is printed as one JSON object on the last line of stdout (the contract other
tools parse). Human output goes to stderr. Exit codes: 0 ok, 2 bad input (`InputError`), 1 runtime failure
(one line: a worker that died, a full disk, ...),
128 + N stopped by signal N after saving what resumes it (a result with "stopped": "SIGTERM", as a shell
reports a process ended by that signal).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .errors import InputError
from .train.signals import exit_code

# verb -> module that implements it (imported lazily so `plan` never pays for importing torch)
VERBS = {
    "train": ("megacluster.train.cli", "train a GPT-style model (resilient, heterogeneity-aware)"),
    "plan": ("megacluster.plan.cli", "digital twin: step time, memory, failures, goodput, power, cost"),
}


class Once(argparse.Action):
    """A flag that takes one value. Given twice, argparse's usage error (exit 2) names it: the last one silently
    winning dropped the first (an invalid --chaos given first was never checked)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} given more than once; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv and argv[0] in VERBS else None
    parser = argparse.ArgumentParser(prog="megacluster", description="megacluster: train, plan")
    sub = parser.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}")
    mod = None
    for name, (modname, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
        if name == verb:  # only the chosen verb's module is imported
            mod = importlib.import_module(modname)
            mod.add_arguments(p)
    args = parser.parse_args(argv)
    if mod is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result = mod.run(args)
    except InputError as e:
        print(f"megacluster {verb}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that failed (a worker died, ...): say why, exit 1
        print(f"megacluster {verb}: failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine refused a file operation (a full disk, a read-only mount): say which
        print(f"megacluster {verb}: failed: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # host memory ran out (CUDA's OutOfMemoryError is a RuntimeError, above)
        print(f"megacluster {verb}: failed: out of host memory{': ' + str(e) if str(e) else ''}; a smaller "
              "model, batch or run.micro_batch, or fewer --workers", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a SIGTERM/SIGINT outside the steps, or a second one: stopped at once
        print(f"megacluster {verb}: {str(e) or 'interrupted'}", file=sys.stderr)  # (train/signals.py)
        return 128 + getattr(e, "signum", 2)  # as a shell reports the signal (SIGINT's default: 130)
    if args.json and result is not None:  # None: a non-main rank under torchrun, which stays quiet
        print(json.dumps(result, default=_jsonable), flush=True)
    code = exit_code(result)
    if "RANK" in os.environ and "torch.distributed" in sys.modules:  # a worker under torchrun
        from .train.worker import hard_exit

        hard_exit(code)
    return code


def _jsonable(x):
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
