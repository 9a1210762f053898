"""Durable file writes, shared by the data cache, the run directory's JSON files, chaos markers and checkpoints;
and the write probe that refuses an unwritable output directory before any work."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path


# What a run writes in its run dir: a fresh run sets these aside (supervisor.set_aside_earlier_run), and none is
# ever read as --data (a run dir inside a --data directory would otherwise train on its own checkpoints).
# tb: TensorBoard (metrics.py); chaos: the one-shot faults' markers (chaos.py); workers.json: the supervised
# workers' pids; earlier-*: runs set aside.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "result.json", "tb", "config.json", "corpus.json", "chaos",
               "workers.json")
RUN_LOCK = ".lock"  # in the run dir: the live run's flock (train/inputs.run_dir_lock); hidden, so never data


CHECKPOINT_NAME = re.compile(r"step_(\d{8,})")  # a complete (renamed-into-place) checkpoint directory: its step


def is_run_dir(directory: str | Path, names: set[str]) -> bool:
    """Whether `directory` (whose entries are `names`) holds a megacluster run that has saved a checkpoint: a
    checkpoints/ of step_<8+ digits> entries beside its lock or its metrics.jsonl. Another run's dir below --data
    is never read as data: its checkpoints would be tokenized as text (and then refused as binary), and the
    tokenizer they change would refuse that run's --resume. Other tools' checkpoints/ (checkpoint-1000/, ...)
    are not these."""
    if "checkpoints" not in names or not {RUN_LOCK, "metrics.jsonl"} & names:
        return False
    try:
        return any(CHECKPOINT_NAME.fullmatch(n) for n in os.listdir(Path(directory, "checkpoints")))
    except OSError:
        return False


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making it will create."""
    return [p for p in (path, *path.parents) if not os.path.lexists(p)]


def remove_made(made: list[Path]) -> None:
    """Remove again, deepest first, the directories `missing_dirs` listed, each only while empty: a refused run
    leaves no directory made for it, and one that wrote anything keeps what it wrote."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            break


def under_launcher() -> bool:
    """Started by torchrun (or a launcher like it): this process is a worker, there is no supervisor."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_outputs(run_dir: str | Path) -> tuple[Path, str]:
    """What a run writes in `run_dir`, as (directory, regex of the names directly in it), whether or not they exist
    yet: a torchrun rank may walk --data while rank 0 sets an earlier run aside. `earlier-<UTC stamp>[-n]` only
    (set_aside_earlier_run's names): a user's earlier-notes.txt is data."""
    names = "|".join(re.escape(n) for n in RUN_OUTPUTS)
    return Path(run_dir), rf"{names}|earlier-[0-9]{{8}}T[0-9]{{6}}(-[0-9]+)?"


CONFIG_MAX_BYTES = 1 << 20  # a config or scenario file is a few KB; more is not one


def read_config(path: str | Path, limit: int = CONFIG_MAX_BYTES) -> bytes:
    """The bytes of a small regular file. ValueError (the reason) for anything else: a FIFO would block the
    reader forever and /dev/zero would fill the memory; OSError as open/read raise it (missing, no permission)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ValueError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is larger than {limit // 1024} KiB: not a config")
    return data


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_writable(directory: Path) -> None:
    """Create and remove a file in `directory`; OSError if it cannot (a read-only mount, another user's
    directory), so a caller refuses the run before its work instead of failing at the first write."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
    except OSError as e:  # its filename is the random probe's, which no user made: name the directory
        raise OSError(e.errno, e.strerror, str(directory)) from None
    os.close(fd)
    os.unlink(probe)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: temp file, fsync, rename, fsync the directory (a crash leaves the
    old file or none)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    """`obj` as JSON, atomically (see atomic_write)."""
    atomic_write(path, json.dumps(obj).encode())
