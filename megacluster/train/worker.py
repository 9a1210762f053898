"""Entry point of one worker process: `python -m megacluster.train.worker RUN_DIR`.

Reads RUN_DIR/config.json, joins the process group named by the environment, trains, and (rank 0)
writes RUN_DIR/result.json atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .. import config
from .loop import Worker, init_place


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(run_dir: str) -> int:
    cfg = config.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    place = init_place(cfg.run.device)
    result = Worker(cfg, place, run_dir=run_dir).run()
    if place.is_main:
        write_json_atomic(Path(run_dir) / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
