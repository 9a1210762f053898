"""CheckpointManager: round trip, snapshot semantics, keep-K, corruption fallback, SIGKILL mid-write."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from megacluster.errors import InputError
from megacluster.train import checkpoint as ck
from megacluster.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[2]


def _same(a, b) -> bool:
    """Deep equality with tensors compared by dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class Log(list):
    def __call__(self, msg):
        self.append(msg)


@pytest.fixture
def mgr(tmp_path):
    log = Log()
    m = CheckpointManager(tmp_path / "ckpt", keep=3, log=log)
    m.test_log = log
    yield m
    m.close()


def _model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.arange(3, dtype=torch.int64) + int(value)}


def _trained_optimizer():
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(5, 3)).sum().backward()
    opt.step()
    return layer, opt


def test_round_trip_with_tied_weights_optimizer_and_meta(mgr):
    layer, opt = _trained_optimizer()
    model = dict(layer.state_dict())
    model["tied"] = model["weight"]  # same storage twice, as with tied embeddings
    model["view"] = model["weight"].t()  # non-contiguous
    state = {"optim": opt.state_dict(), "data": {"epoch": 1, "pos": [3, 4]}, "np_float": np.float64(0.25)}
    mgr.save(7, model, state, {"loss": 1.5, "note": "x"}, blocking=True)
    got = mgr.load(7)
    assert got.step == 7 and got.path.name == "step_00000007"
    assert _same(got.model, {k: v.contiguous() for k, v in model.items()})
    assert _same(got.state["optim"], opt.state_dict())
    assert got.state["data"] == {"epoch": 1, "pos": [3, 4]}
    assert type(got.state["np_float"]) is float and got.state["np_float"] == 0.25
    assert got.meta == {"loss": 1.5, "note": "x"}
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(got.state["optim"])  # the loaded state is usable as-is
    manifest = (got.path / "manifest.json").read_text()
    assert '"sha256"' in manifest and '"format": 2' in manifest


def test_snapshot_is_taken_before_save_returns(mgr, monkeypatch):
    gate = threading.Event()
    real = ck._write_files

    def gated(*args):
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(ck, "_write_files", gated)
    model = _model(1.0)
    state = {"m": {"inner": [torch.ones(3)]}}
    mgr.save(1, model, state, {})
    model["w"].add_(100)  # the caller keeps training right away
    state["m"]["inner"][0].mul_(-5)
    gate.set()
    mgr.wait()
    got = mgr.load(1)
    assert torch.equal(got.model["w"], torch.full((4, 3), 1.0))
    assert torch.equal(got.state["m"]["inner"][0], torch.ones(3))


def test_second_save_waits_for_the_first(mgr, monkeypatch):
    gate = threading.Event()
    real = ck._write_files
    monkeypatch.setattr(ck, "_write_files", lambda *a: (gate.wait(10), real(*a))[1])
    mgr.save(1, _model(1.0), {}, {})
    second = threading.Thread(target=mgr.save, args=(2, _model(2.0), {}, {}))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # blocked behind the first write
    assert mgr.steps() == []
    gate.set()
    second.join(10)
    assert not second.is_alive()
    mgr.wait()
    assert mgr.steps() == [1, 2]


def test_keeps_last_k(mgr):
    for step in range(1, 6):
        mgr.save(step, _model(step), {"step": step}, {})
    mgr.wait()
    assert mgr.steps() == [3, 4, 5]
    got = mgr.latest()
    assert got.step == 5 and torch.equal(got.model["w"], torch.full((4, 3), 5.0))
    assert not [p for p in mgr.directory.iterdir() if p.name.startswith(".")]


def test_rolled_back_run_never_deletes_newer_checkpoints(tmp_path):
    m = CheckpointManager(tmp_path, keep=2, log=Log())
    for step in (10, 20, 30):
        m.save(step, _model(step), {}, {}, blocking=True)
    m.save(25, _model(25), {}, {}, blocking=True)  # resumed from 20 (say 30 was corrupt)
    assert m.steps() == [20, 25, 30]
    m.close()


def test_broken_checkpoints_never_count_among_the_kept_ones(tmp_path):
    """Resumed from 10 past a corrupt 12 (and a 11 with no manifest), keep=2: saving 15 keeps 10, the good one
    below it, not the broken 12; both broken ones go once they are older than the kept ones."""
    m = CheckpointManager(tmp_path, keep=3, log=Log())
    for step in (5, 10, 11, 12):
        m.save(step, _model(step), {}, {}, blocking=True)
    m.close()
    (tmp_path / "step_00000011" / "manifest.json").unlink()
    _flip_byte(tmp_path / "step_00000012" / "model.safetensors", (tmp_path / "step_00000012" / "model.safetensors")
               .stat().st_size - 5)
    reader = CheckpointManager(tmp_path, keep=2, log=Log())
    assert reader.latest().step == 10 and reader.rejected == {11, 12}
    m = CheckpointManager(tmp_path, keep=2, log=Log(), rejected=reader.rejected)
    m.save(15, _model(15), {}, {}, blocking=True)
    assert [s for s, _ in m._step_dirs()] == [10, 11, 12, 15]  # 5 went; 10 is the one good checkpoint kept
    m.save(20, _model(20), {}, {}, blocking=True)
    assert [s for s, _ in m._step_dirs()] == [15, 20]
    m.close()


def test_a_checkpoint_that_cannot_be_deleted_stays_and_training_goes_on(tmp_path, monkeypatch):
    log = Log()
    m = CheckpointManager(tmp_path, keep=1, log=log)
    m.save(1, _model(1), {}, {}, blocking=True)
    real_replace = os.replace

    def replace(src, dst):  # the kernel's answer for a busy (mounted) or read-only directory; root can't be refused
        if Path(src).name == "step_00000001":
            raise OSError(16, "Device or resource busy", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    m.save(2, _model(2), {}, {}, blocking=True)  # no error: the new checkpoint stands
    assert m.steps() == [1, 2] and "checkpoint: could not remove step_00000001 (Device or resource busy); it stays" \
        in log
    monkeypatch.undo()
    m.save(3, _model(3), {}, {}, blocking=True)
    assert m.steps() == [3]
    m.close()


def test_same_step_saved_again_replaces_it(mgr):
    mgr.save(5, _model(1.0), {}, {"v": 1}, blocking=True)
    mgr.save(5, _model(2.0), {}, {"v": 2}, blocking=True)
    got = mgr.load(5)
    assert got.meta == {"v": 2} and torch.equal(got.model["w"], torch.full((4, 3), 2.0))
    assert mgr.steps() == [5]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_falls_back_to_previous_and_names_it(mgr):
    for step in (1, 2, 3):
        mgr.save(step, _model(step), {}, {}, blocking=True)
    newest = mgr.directory / "step_00000003" / "model.safetensors"
    _flip_byte(newest, newest.stat().st_size - 5)  # inside the tensor data
    got = mgr.latest()
    assert got.step == 2 and torch.equal(got.model["w"], torch.full((4, 3), 2.0))
    # named once (the directory was named twice: "skipping step_00000003: step_00000003: ...")
    assert "checkpoint: skipping step_00000003: model.safetensors sha256 does not match the manifest (corrupt)" \
        in mgr.test_log
    with pytest.raises(CheckpointError, match="step_00000003"):
        mgr.load(3)


def test_truncated_missing_and_garbage_files_are_skipped(mgr):
    mgr.keep = 4
    for step in (1, 2, 3, 4):
        mgr.save(step, _model(step), {"s": torch.tensor(step)}, {}, blocking=True)
    (mgr.directory / "step_00000004" / "manifest.json").write_text("{not json")
    state = mgr.directory / "step_00000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    (mgr.directory / "step_00000002" / "model.safetensors").unlink()
    got = mgr.latest()
    assert got.step == 1 and got.state["s"].item() == 1
    skipped = "\n".join(mgr.test_log)
    for name in ("step_00000004", "step_00000003", "step_00000002"):
        assert name in skipped
    with pytest.raises(CheckpointError, match="missing"):
        mgr.load(2)


def test_empty_and_missing(mgr):
    assert mgr.latest() is None and mgr.steps() == []
    with pytest.raises(CheckpointError):
        mgr.load(3)
    (mgr.directory / "step_00000009").mkdir()  # a directory without a manifest is not a checkpoint
    assert mgr.steps() == [] and mgr.latest() is None


def test_leftovers_of_dead_writers_are_ignored_then_removed(mgr):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftover = mgr.directory / f".step_00000009.tmp-{dead_pid}-1"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    alive = mgr.directory / f".step_00000008.tmp-{os.getppid()}-1"  # a live process's write: not ours to remove
    alive.mkdir()
    assert mgr.steps() == [] and mgr.latest() is None
    mgr.save(1, _model(1.0), {}, {}, blocking=True)
    assert not leftover.exists() and alive.exists()
    assert mgr.steps() == [1]


def test_failed_write_is_raised_once_and_leaves_nothing(mgr, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    mgr.save(1, _model(1.0), {}, {})
    with pytest.raises(CheckpointError, match="step_00000001 failed \\(OSError: disk full\\); the checkpoints already"):
        mgr.wait()
    mgr.wait()  # reported once
    mgr.save(2, _model(2.0), {}, {})
    with pytest.raises(CheckpointError, match="step_00000002 failed"):  # the next save reports it
        mgr.save(3, _model(3.0), {}, {})
    monkeypatch.undo()
    mgr.save(4, _model(4.0), {}, {}, blocking=True)
    assert mgr.steps() == [4]
    assert not [p for p in mgr.directory.iterdir() if p.name.startswith(".")]


def test_a_writer_error_of_any_type_is_a_checkpoint_error(mgr, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (an Exception, not an OSError), torch.save as
    a RuntimeError: either must be the one-line CheckpointError that says the older checkpoints stand."""
    class SafetensorError(Exception):
        pass

    mgr.save(1, _model(1.0), {}, {}, blocking=True)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"step_00000002 failed \(SafetensorError: .*No space left.*untouched"):
        mgr.save(2, _model(2.0), {}, {}, blocking=True)
    assert mgr.steps() == [1] and mgr.latest().step == 1


def test_an_unreadable_file_is_skipped_like_a_corrupt_one(mgr):
    for step in (1, 2):
        mgr.save(step, _model(step), {}, {}, blocking=True)
    state = mgr.directory / "step_00000002" / "state.pt"
    state.unlink()
    state.symlink_to(state.name)  # reading it fails with ELOOP, an OSError other than FileNotFoundError
    assert mgr.latest().step == 1
    assert any("step_00000002" in line and "cannot be read" in line for line in mgr.test_log)


def test_the_manifest_is_checksummed_and_format_1_still_loads(mgr):
    import json

    for step in (1, 2):
        mgr.save(step, _model(step), {}, {"step": step, "losses": [0.5] * step}, blocking=True)
    manifest = mgr.directory / "step_00000002" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"step": 2,\n  "losses"', '"step": 3,\n  "losses"'))  # one rotted digit in meta
    assert manifest.read_text() != text
    assert mgr.latest().step == 1
    assert any("step_00000002" in line and "manifest.json sha256" in line for line in mgr.test_log)
    assert ck.newest_meta(mgr.directory)["step"] == 1  # the pre-resume checks look at the same one
    old = json.loads(text)  # a checkpoint written before the manifest had a hash of its own
    del old["sha256"]
    old["format"] = 1
    manifest.write_text(json.dumps(old))
    assert mgr.latest().step == 2 and ck.newest_meta(mgr.directory)["step"] == 2


def test_newest_meta_skips_a_checkpoint_whose_files_are_not_the_listed_size(mgr):
    for step in (1, 2):
        mgr.save(step, _model(step), {}, {"step": step}, blocking=True)
    state = mgr.directory / "step_00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:-1])
    assert ck.newest_meta(mgr.directory) == {"step": 1} and mgr.latest().step == 1


def test_a_writer_killed_between_the_two_renames_of_a_replay_is_restored(mgr):
    """_publish of a step saved again: old -> .old, tmp -> step. Killed in between, the step has no directory;
    the next save puts the complete new copy (the .tmp with its manifest) in place instead of deleting it."""
    import shutil

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    mgr.save(5, _model(1.0), {}, {"v": "old"}, blocking=True)
    mgr.save(6, _model(6.0), {}, {"v": "other"}, blocking=True)
    shutil.copytree(mgr.directory / "step_00000006", mgr.directory / f".step_00000005.tmp-{dead_pid}-1")
    os.replace(mgr.directory / "step_00000006", mgr.directory / "step_00000005x")  # keep 6 out of the way
    new = mgr.directory / f".step_00000005.tmp-{dead_pid}-1"
    manifest = ck._read_manifest(new, 6)
    manifest.update(step=5)
    manifest["sha256"] = ck._manifest_sha256(manifest)
    (new / "manifest.json").write_text(__import__("json").dumps(manifest))
    os.replace(mgr.directory / "step_00000005", mgr.directory / f".step_00000005.old-{dead_pid}-2")
    shutil.rmtree(mgr.directory / "step_00000005x")
    assert mgr.steps() == []
    mgr.save(7, _model(7.0), {}, {}, blocking=True)
    assert mgr.steps() == [5, 7] and mgr.load(5).meta == {"v": "other"}
    assert not [p for p in mgr.directory.iterdir() if p.name.startswith(".")]
    assert any("restored step_00000005" in line for line in mgr.test_log)


def test_a_dead_writers_half_written_checkpoint_is_not_published(mgr):
    """Only a replay's verified copy is restored: a .tmp whose manifest was cut short (killed inside json.dump),
    and not a replay (no .old of its step), is removed, and never counted against `keep`."""
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    mgr.keep = 2
    mgr.save(2, _model(2.0), {}, {}, blocking=True)
    mgr.save(4, _model(4.0), {}, {}, blocking=True)
    half = mgr.directory / f".step_00000005.tmp-{dead_pid}-1"
    os.replace(mgr.directory / "step_00000004", half)
    text = (half / "manifest.json").read_text()
    (half / "manifest.json").write_text(text[: len(text) // 2])
    mgr.save(6, _model(6.0), {}, {}, blocking=True)
    assert mgr.steps() == [2, 6] and not half.exists() and mgr.latest().step == 6


def test_rejects_what_weights_only_could_not_load(mgr):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['np'\]"):
        mgr.save(1, _model(1.0), {"rng": {"np": np.zeros(3)}}, {})
    with pytest.raises(TypeError, match="JSON"):
        mgr.save(1, _model(1.0), {}, {"bad": object()})
    with pytest.raises(TypeError):
        mgr.save(1, {"w": [1, 2]}, {}, {})
    with pytest.raises(InputError, match="keep"):
        CheckpointManager(mgr.directory, keep=0)
    assert mgr.steps() == []


def test_rng_state_round_trips_through_a_checkpoint(mgr):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    mgr.save(1, _model(0.0), {"rng": rng_state()}, {}, blocking=True)
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(mgr.load(1).state["rng"])  # loaded with weights_only=True
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from megacluster.train import checkpoint as ck
    directory, slow = sys.argv[1], sys.argv[2] == "slow"
    if slow:  # widen the window between the data files and the manifest
        real = ck._digest
        def slow_digest(path, *, sync=False):
            out = real(path, sync=sync)
            time.sleep(0.5 if sync else 0)
            return out
        ck._digest = slow_digest
    m = ck.CheckpointManager(directory, keep=2, log=lambda s: None)
    model = {"w": torch.zeros(2_000_000), "tied": torch.zeros(1)}  # 8 MB
    model["tied"] = model["w"]
    step = 0
    while True:
        step += 1
        model["w"].fill_(step)
        m.save(step, model, {"step": torch.tensor(step)}, {"step": step}, blocking=True)
        print(step, flush=True)
    """
)


def _start_writer(tmp_path, directory, mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(script), str(directory), mode], stdout=subprocess.PIPE, text=True, env=env
    )


def _check_survivor(directory):
    m = CheckpointManager(directory, keep=2, log=Log())
    got = m.latest()
    assert got is not None and got.step == max(m.steps())
    assert torch.equal(got.model["w"], torch.full((2_000_000,), float(got.step)))
    assert got.state["step"].item() == got.step == got.meta["step"]
    return m, got


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    proc = _start_writer(tmp_path, directory, "slow")
    try:
        while int(proc.stdout.readline()) < 2:  # two complete checkpoints
            pass
        deadline = time.monotonic() + 20
        while not list(directory.glob(".step_*.tmp-*/model.safetensors")):  # the third is being written
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
        proc.stdout.close()
    assert list(directory.glob(".step_*.tmp-*")), "the kill did not land mid-write"
    m, got = _check_survivor(directory)
    assert got.step >= 2
    m.save(got.step + 1, {"w": torch.zeros(1)}, {}, {}, blocking=True)
    assert not list(directory.glob(".step_*"))  # the dead writer's leftovers are gone
    m.close()


def test_sigkill_at_random_moments_always_leaves_a_good_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    rnd = random.Random(0)
    for _ in range(2):
        proc = _start_writer(tmp_path, directory, "fast")
        try:
            proc.stdout.readline()  # at least one complete checkpoint in this run
            time.sleep(rnd.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
            proc.stdout.close()
        _check_survivor(directory)[0].close()
