"""Async, atomic, checksummed checkpoints: keep the last K, fall back to the newest one that verifies.

Layout (one directory per checkpoint; see docs/checkpoint.md for why):

    DIR/step_00000042/model.safetensors   weights (safetensors)
                      state.pt            torch.save of `state`: optimizer, RNG, data position, ... (weights_only)
                      manifest.json       written LAST: {"format": 2, "step", "files": {name: {bytes, sha256}},
                                          "meta", "sha256" (of the rest of the manifest)}

A checkpoint is written into a hidden `DIR/.step_00000042.tmp-<pid>-<n>/`, every file fsync'd, then the directory
is renamed into place and DIR fsync'd, so a checkpoint either exists complete or not at all, even if the process
is SIGKILLed mid-write. Use (rank 0 only):

    ckpt = CheckpointManager(run_dir / "ckpt", keep=3)
    if (got := ckpt.latest()) is not None:            # newest checkpoint that verifies
        model.load_state_dict(got.model); opt.load_state_dict(got.state["optim"]); set_rng_state(got.state["rng"])
        start = got.step + 1
    ...
    ckpt.save(step, model.state_dict(), {"optim": opt.state_dict(), "rng": rng_state()}, {"loss": loss})
    ...                                               # training goes on while the write runs in the background
    ckpt.close()
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch

from megacluster.errors import InputError
from megacluster.files import CHECKPOINT_NAME, fsync_dir

FORMAT = 2  # manifest.json "format"; 2 adds the manifest's own sha256 (1 is still read, without it)
_READABLE = (1, 2)
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
_HIDDEN = re.compile(r"\.step_(\d+)\.(tmp|del|old)-(\d+)-\d+")  # in-progress or being-deleted: step, kind, pid
_CHUNK = 8 << 20  # bytes read at a time when hashing
# Plain values torch.load(weights_only=True) accepts as leaves of `state`.
_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt (the message names its directory and what failed)."""


@dataclass(kw_only=True, slots=True)
class Loaded:
    step: int  # the step number stored (the caller decides where training resumes)
    model: dict[str, torch.Tensor]  # CPU tensors
    state: dict  # as given to save(): optimizer state_dict, RNG states, data position, ...
    meta: dict  # JSON-able dict given at save time
    path: Path  # the checkpoint's directory


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def step_dir_name(step: int) -> str:
    """Directory name of a checkpoint: step_00000042."""
    return f"step_{step:08d}"


class CheckpointManager:
    """Writes checkpoints in a background thread (one at a time) and reads back the newest good one.

    Not thread-safe: call it from one thread (the training loop). One manager per directory per run.
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, log: Callable[[str], None] = _stderr,
        rejected: set[int] | None = None,
    ) -> None:
        """rejected: steps whose checkpoints a loader found broken (`latest` records its own in `self.rejected`):
        pruning does not count them among the `keep` good ones."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InputError(f"checkpoint keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.log = log
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._pending: Future | None = None  # the write in flight (or finished, result not yet collected)
        self._ids = itertools.count(1)  # unique suffixes for hidden directory names (thread-safe next())
        self.rejected = rejected if rejected is not None else set()  # shared: the owner may add to it later

    # ---- saving -------------------------------------------------------------------------------------------

    def save(
        self, step: int, model: dict[str, torch.Tensor], state: dict, meta: dict, *, blocking: bool = False
    ) -> None:
        """Snapshot everything to host memory now, write it in the background, return.

        Every tensor (in `model` and anywhere inside `state`) is copied to CPU before save returns, so the caller
        may keep training and mutate its tensors at once. At most one write is in flight: if one is, save waits
        for it first; if that write failed, save raises its error (once) and starts nothing. blocking=True also
        waits for this write. `state` may hold only what torch.load(weights_only=True) reads back (tensors,
        numbers, strings, None, lists, tuples, dicts): anything else raises TypeError here, not at resume time.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        snapshot = (_snapshot_model(model), _snapshot_state(state, "state"), _snapshot_meta(meta))
        self.wait()
        tmp = self._hidden(step, "tmp")
        self._pending = self._pool.submit(self._write, step, tmp, *snapshot)
        if blocking:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its exception if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the write in flight (re-raising its error) and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _write(self, step: int, tmp: Path, model: dict, state: dict, meta: dict) -> None:
        """Runs in the writer thread: write tmp, rename into place, prune."""
        started = time.monotonic()
        self._remove_leftovers()
        final = self.directory / step_dir_name(step)
        try:
            files = _write_files(tmp, step, model, state, meta)
            self._publish(step, tmp, final)
        except Exception as e:  # disk full, quota, a lost mount (safetensors and torch.save raise their own types
            # for these, not OSError): say which checkpoint, and that older ones stand
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing {final} failed ({type(e).__name__}: {e}); the checkpoints already "
                                  "there are untouched") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(f["bytes"] for f in files.values())
        self.log(f"checkpoint: saved {final.name} ({size / 1e6:.1f} MB in {time.monotonic() - started:.2f} s)")
        self._prune(step)

    def _hidden(self, step: int, what: str) -> Path:
        """A hidden sibling directory name: .step_00000042.<what>-<pid>-<n> (ignored by steps() and latest())."""
        return self.directory / f".{step_dir_name(step)}.{what}-{os.getpid()}-{next(self._ids)}"

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        """Atomically make tmp the checkpoint `final` (replacing an older one of the same step)."""
        if final.exists():  # same step saved again (e.g. replayed after a restart): set the old one aside first
            aside = self._hidden(step, "old")
            os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(self.directory)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(self.directory)

    def _prune(self, just_written: int) -> None:
        """Delete the checkpoints below the one just written that are older than the keep-1 newest good ones
        below it. Good: complete (a manifest) and not rejected by a loader, so a corrupt checkpoint never takes
        a good one's place; a broken one goes once it is older than those kept.

        Checkpoints with a higher step (a timeline rolled back from, or a corrupt newer one) are not counted and
        never deleted here: one of them may be the newest good checkpoint. A checkpoint that cannot be deleted
        (a read-only or busy directory) is left, and said so: the one just written stands, and training goes on.
        """
        below = [(s, p) for s, p in self._step_dirs() if s < just_written]
        good = [s for s, p in below if s not in self.rejected and (p / MANIFEST_FILE).is_file()]
        kept = good[max(0, len(good) - (self.keep - 1)):] if self.keep > 1 else []
        oldest_kept = kept[0] if kept else just_written
        for step, path in below:
            if step >= oldest_kept:
                break
            doomed = self._hidden(step, "del")
            try:
                os.replace(path, doomed)  # gone from steps() atomically
            except OSError as e:
                self.log(f"checkpoint: could not remove {path.name} ({e.strerror or e}); it stays")
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            self.log(f"checkpoint: removed {path.name} (keep={self.keep})")

    def _remove_leftovers(self) -> None:
        """Remove hidden tmp/del/old directories left by writers that are gone (killed, or this process). One
        exception: a writer killed between `_publish`'s two renames of a replayed step (old copy set aside as
        .old, new copy not yet renamed in) left the step with no directory and its complete new copy under the
        tmp name: that copy, if it verifies, is renamed into place."""
        gone = []
        for entry in sorted(self.directory.iterdir()):
            m = _HIDDEN.fullmatch(entry.name)
            if m and (int(m.group(3)) == os.getpid() or not _pid_alive(int(m.group(3)))):
                gone.append((entry, int(m.group(1)), m.group(2)))
        replayed = {step for _, step, kind in gone if kind == "old"}
        for entry, step, kind in gone:
            final = self.directory / step_dir_name(step)
            if kind == "tmp" and step in replayed and not final.exists() and _verifies(entry, step):
                os.replace(entry, final)
                fsync_dir(self.directory)
                self.log(f"checkpoint: restored {final.name} from {entry.name} (its writer was killed while "
                         "publishing it)")
                continue
            shutil.rmtree(entry, ignore_errors=True)
            self.log(f"checkpoint: removed leftover {entry.name}")

    # ---- reading ------------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present (renamed into place, manifest present), ascending."""
        return [s for s, path in self._step_dirs() if (path / MANIFEST_FILE).is_file()]

    def _step_dirs(self) -> list[tuple[int, Path]]:
        return _step_dirs(self.directory)

    def latest(self) -> Loaded | None:
        """The newest checkpoint that verifies, or None. Broken ones are logged by name and skipped."""
        self._settle()
        for step, path in reversed(self._step_dirs()):
            try:
                return _load_dir(path, step)
            except CheckpointError as e:
                self.log(f"checkpoint: skipping {e}")  # each reason starts with the directory's name
                self.rejected.add(step)
        return None

    def load(self, step: int) -> Loaded:
        """The checkpoint of `step`, verified; raises CheckpointError if it is missing or corrupt."""
        self._settle()
        return _load_dir(self.directory / step_dir_name(step), step)

    def _settle(self) -> None:
        """Let an in-flight write finish (its error, if any, stays for wait()/save() to raise)."""
        if self._pending is not None:
            wait_futures([self._pending])


# ---- snapshot (caller's thread) -------------------------------------------------------------------------------


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that shares nothing with t (synchronous, so t may be mutated right after)."""
    return t.detach().to("cpu", copy=True)


def _snapshot_model(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Private contiguous CPU copies; tied weights become separate tensors (safetensors refuses shared memory)."""
    if not isinstance(model, dict):
        raise TypeError(f"model must be a dict of name -> tensor, got {type(model).__name__}")
    out = {}
    for name, t in model.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"model[{name!r}] must be a tensor under a str name, got {type(t).__name__}")
        out[name] = _to_host(t).contiguous()
    return out


def _snapshot_state(value: Any, where: str) -> Any:
    """Deep copy of `state` with tensors on CPU; rejects what weights_only loading would refuse."""
    if isinstance(value, torch.Tensor):
        return _to_host(value)
    if isinstance(value, dict):
        items = ((k, _snapshot_state(v, f"{where}[{k!r}]")) for k, v in value.items())
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        copied = [_snapshot_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return copied if isinstance(value, list) else tuple(copied)
    for plain in (bool, int, float, str):  # numpy scalars and other subclasses -> the plain Python type
        if isinstance(value, plain) and type(value) is not plain:
            return plain(value)
    if isinstance(value, _LEAVES):
        return value
    raise TypeError(
        f"{where}: {type(value).__module__}.{type(value).__qualname__} cannot be loaded with weights_only=True; "
        "store tensors, numbers, strings, lists and dicts (for RNG states use checkpoint.rng_state())"
    )


def _snapshot_meta(meta: dict) -> dict:
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be a JSON-able dict: {e}") from e


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_NNNNNNNN directory under `directory`, ascending by step."""
    found = []
    for entry in directory.iterdir():
        m = CHECKPOINT_NAME.fullmatch(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def newest_meta(directory: str | os.PathLike, *, hashed: bool = False) -> dict | None:
    """The `meta` of the newest checkpoint under `directory` whose manifest verifies and whose files have the
    listed sizes, or None: for checks before a resume, cheaply (the files' hashes are checked when the run loads
    it, once), and of the checkpoint the loader will take unless a file rotted at the same size. hashed: the
    files' hashes checked too, so it is the one the loader takes (before refusing a resume for its step)."""
    directory = Path(directory)
    for step, path in reversed(_step_dirs(directory) if directory.is_dir() else []):
        try:
            return _verified_manifest(path, step, sizes_only=not hashed)["meta"]
        except CheckpointError:
            continue
    return None


def check_max_steps(step: int | None, last: int, directory: Path) -> None:
    """A checkpoint past run.max_steps would train nothing and report the old run as this one. Checked before any
    worker starts (`supervisor.check_resume`: a supervised run refused by its workers had already rewritten the
    run dir's files) and again when a worker loads the checkpoint (`Worker.restore`)."""
    if isinstance(step, int) and step > last:
        raise InputError(f"--resume: the newest good checkpoint in {directory} is at step {step}, past "
                         f"run.max_steps (--max-steps) = {last}; give --max-steps {step + 1} or more to train further")


def meta_of(directory: str | os.PathLike, step: int) -> dict:
    """The `meta` of checkpoint `step` under `directory` (its manifest verified, not its files): CheckpointError
    if it is missing or its manifest is bad."""
    return _read_manifest(Path(directory) / step_dir_name(step), step)["meta"]


# ---- writing (writer thread) ----------------------------------------------------------------------------------


def _write_files(tmp: Path, step: int, model: dict, state: dict, meta: dict) -> dict[str, dict]:
    """Write the three files into tmp (manifest last), fsync them and tmp; return the manifest's file table."""
    tmp.mkdir()
    safetensors.torch.save_file(model, tmp / MODEL_FILE, metadata={"format": str(FORMAT), "step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    files = {name: _digest(tmp / name, sync=True) for name in (MODEL_FILE, STATE_FILE)}
    manifest = {"format": FORMAT, "step": step, "files": files, "meta": meta}
    manifest["sha256"] = _manifest_sha256(manifest)
    with open(tmp / MANIFEST_FILE, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    return files


def _manifest_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest without its own hash, as canonical JSON (sorted keys): it covers `meta`, which
    holds the step, the loss history and the config a resume takes on trust. Meta was JSON round-tripped when
    saved, so the parsed manifest gives the same text again."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest(path: Path, *, sync: bool = False) -> dict:
    """{"bytes", "sha256"} of a file's contents; sync=True also fsyncs it to disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ---- loading and verification ---------------------------------------------------------------------------------


def _load_dir(path: Path, step: int) -> Loaded:
    """Verify a checkpoint directory against its manifest and load it; CheckpointError if anything is off."""
    manifest = _verified_manifest(path, step)
    try:
        model = safetensors.torch.load_file(path / MODEL_FILE, device="cpu")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # verified bytes that still do not load: report as a broken checkpoint
        raise CheckpointError(f"{path.name}: cannot load: {e}") from e
    return Loaded(step=step, model=model, state=state, meta=manifest["meta"], path=path)


def _read_manifest(path: Path, step: int) -> dict:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no {MANIFEST_FILE} (missing or incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable {MANIFEST_FILE}: {e}") from e
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") in _READABLE
        and manifest.get("step") == step
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("meta"), dict)
    )
    if not ok:
        raise CheckpointError(f"{path.name}: {MANIFEST_FILE} is not a manifest (format 1 or 2) for step {step}")
    if manifest["format"] >= 2 and manifest.get("sha256") != _manifest_sha256(manifest):
        raise CheckpointError(f"{path.name}: {MANIFEST_FILE} sha256 does not match its contents (corrupt)")
    if manifest["meta"].get("step", step) != step:
        raise CheckpointError(f"{path.name}: {MANIFEST_FILE} meta is of step {manifest['meta']['step']}")
    return manifest


def _verified_manifest(path: Path, step: int, *, sizes_only: bool = False) -> dict:
    """The manifest of the checkpoint of `step` in `path`, after checking it and each listed file (size and hash,
    or size only); CheckpointError naming what is off."""
    manifest = _read_manifest(path, step)
    for name in (MODEL_FILE, STATE_FILE):
        _verify_file(path / name, manifest["files"].get(name), sizes_only=sizes_only)
    return manifest


def _verifies(path: Path, step: int) -> bool:
    """Whether the directory holds a checkpoint of `step` that verifies (manifest, sizes and hashes)."""
    try:
        _verified_manifest(path, step)
    except CheckpointError:
        return False
    return True


def _verify_file(path: Path, expected: dict | None, *, sizes_only: bool = False) -> None:
    """CheckpointError unless the file has the listed size and hash. Any read error counts (a bad sector, a
    stale NFS handle, no permission): the loader then falls back to an older checkpoint."""
    if not isinstance(expected, dict):
        raise CheckpointError(f"{path.parent.name}: {path.name} is not listed in {MANIFEST_FILE}")
    try:
        size = path.stat().st_size
        if size != expected.get("bytes"):
            listed = expected.get("bytes")
            raise CheckpointError(f"{path.parent.name}: {path.name} has {size} bytes, manifest says {listed}")
        if not sizes_only and _digest(path)["sha256"] != expected.get("sha256"):
            raise CheckpointError(f"{path.parent.name}: {path.name} sha256 does not match the manifest (corrupt)")
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent.name}: {path.name} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path.parent.name}: {path.name} cannot be read ({e})") from None


# ---- RNG state helpers ----------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python `random`, numpy's global RNG and torch's CPU (and CUDA, if initialised) RNG states.

    Everything is a tensor, int, float, None or list, so it loads with torch.load(weights_only=True), which
    refuses numpy arrays. Restore with set_rng_state(). numpy Generator objects you create yourself are not
    covered: keep their seeds/positions in `state` yourself.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # uint32 words, widened
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(d: dict) -> None:
    """Restore what rng_state() captured (keys that are absent are left alone)."""
    if "python" in d:
        p = d["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "numpy" in d:
        n = d["numpy"]
        key = np.asarray(n["key"].numpy() if isinstance(n["key"], torch.Tensor) else n["key"], dtype=np.uint32)
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": key, "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
    if "torch" in d:
        torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        for device, s in enumerate(d["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
