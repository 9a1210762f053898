"""Entry point of one worker process: `python -m megacluster.train.worker RUN_DIR`.

Reads RUN_DIR/config.json, trains, and (rank 0 at the end) writes RUN_DIR/result.json atomically.
Started by the supervisor, it takes part in the membership protocol (MC_* environment variables, see
elastic.py); MC_INIT says where its initial state comes from: 'config' (a fresh start, or --resume),
'checkpoint' (the newest good checkpoint) or 'peer' (a survivor sends it when the generation forms).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from .signals import SIGNALS


def main(run_dir: str) -> int:
    # a SIGTERM/SIGINT before the worker exists (imports, data, model) is recorded, not fatal: the worker then
    # stops after its first step with a checkpoint
    early: list[int] = []
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: early.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # the supervisor starts us with them blocked
    from .. import config
    from ..data import reopen
    from .elastic import Membership
    from .loop import Worker, init_place

    cfg = config.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    membership = Membership.from_env()
    init = os.environ.get("MC_INIT", "config") if membership is not None else "config"
    if membership is not None:
        cfg.run.resume = init == "checkpoint" or (init == "config" and cfg.run.resume)
    ref = os.environ.get("MC_CORPUS")  # the corpus the supervisor prepared (every worker reads the same)
    corpus = reopen(json.loads(Path(ref).read_text()), cfg.data, cfg.model.vocab_size) if ref else None
    place = init_place(cfg.run.device)
    worker = Worker(cfg, place, corpus=corpus, run_dir=run_dir, membership=membership,
                    wid=membership.wid if membership is not None else None, needs_state=init == "peer")
    for s in SIGNALS:  # from here on straight to the worker (no window between the early list and its handler)
        signal.signal(s, worker.stop.on_signal)
    if early:
        worker.stop.on_signal(early[0])
    worker.run(result_to=Path(run_dir) / "result.json" if worker.place.is_main else None)
    return 0


def hard_exit(code: int) -> None:
    """Exit without running C++ static destructors: a process that used gloo can otherwise die at exit with
    'terminate called without an active exception' (SIGABRT), which a supervisor or torchrun would take for
    a failure of a run that finished. Everything of ours is flushed and closed before this."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the process was started with that descriptor closed
            stream.flush()
    os._exit(code)


def entry(run_dir: str) -> int:
    """main(), its known failures turned into one line and an exit code the supervisor acts on."""
    from ..errors import InputError
    from .checkpoint import CheckpointError
    from .elastic import CHECKPOINT_FAILED, DIVERGED, INPUT_REFUSED
    from .loop import Diverged

    try:
        return main(run_dir)
    except KeyboardInterrupt as e:  # signalled again: stop at once (train/signals.py), one line, no traceback
        print(f"worker: {e}", file=sys.stderr)
        return 130
    except CheckpointError as e:  # one line, and an exit code the supervisor ends the run on
        print(f"worker {os.environ.get('MC_WORKER_ID', '?')}: checkpoint: {e}", file=sys.stderr)
        return CHECKPOINT_FAILED
    except InputError as e:  # likewise: a replacement would be refused the same input
        print(f"worker {os.environ.get('MC_WORKER_ID', '?')}: error: {e}", file=sys.stderr)
        return INPUT_REFUSED
    except Diverged as e:  # likewise: a replacement would diverge at the same step
        print(f"worker {os.environ.get('MC_WORKER_ID', '?')}: {e}", file=sys.stderr)
        return DIVERGED


if __name__ == "__main__":
    hard_exit(entry(sys.argv[1]))
