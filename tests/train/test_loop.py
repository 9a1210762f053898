"""The trainer: 1 vs N processes compute the same thing; checkpoint -> resume is bit-identical; CLI contract."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megacluster import config
from megacluster.errors import InputError
from megacluster.train.checkpoint import CheckpointManager
from megacluster.train.loop import Worker, init_place, lr_at
from megacluster.train.supervisor import train

SMALL = ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.seq_len=32",
         "model.vocab_size=512", "data.max_bytes=300000", "run.batch_size=6", "run.micro_batch=2",
         "run.log_every=1", "run.eval_batches=2", "run.progress=false", "optim.warmup_steps=2"]


def small_cfg(tmp_path, name, *extra):
    return config.build("tiny", None, SMALL + [f"run.run_dir={tmp_path / name}", *extra])


def train_cli(run_dir, *args):
    """`megacluster train --run-dir RUN_DIR --json` with SMALL's keys and `args`; its exit code must be 0.
    Returns the last stdout line, parsed."""
    r = subprocess.run([sys.executable, "-m", "megacluster", "train", "--run-dir", str(run_dir), "--json",
                        *[a for kv in SMALL for a in ("--set", kv)], *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def losses(run_dir):
    recs = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_one_vs_two_gloo_processes_same_losses(tmp_path):
    one = train(small_cfg(tmp_path, "one", "run.max_steps=5"))
    two = train(small_cfg(tmp_path, "two", "run.max_steps=5", "run.workers=2"))
    assert one["world"] == 1 and two["world"] == 2 and one["steps"] == two["steps"] == 5
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5)
    assert a[5] < a[1]  # it learns
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full = train(small_cfg(tmp_path, "full", "run.max_steps=8", "run.ckpt_every=4", "run.eval_every=0"))
    # the interrupted run: same run dir content up to the step-4 checkpoint, then --resume
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000004", tmp_path / "cut" / "checkpoints" / "step_00000004")
    resumed = train(small_cfg(tmp_path, "cut", "run.max_steps=8", "run.ckpt_every=4", "run.eval_every=0",
                              "run.resume=true"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == [5, 6, 7, 8]  # only the steps after the checkpoint were trained
    assert all(a[s] == b[s] for s in b)  # bit-identical, not approximately
    assert resumed["loss_digest"] == full["loss_digest"]  # the digest covers restored steps 1-4 too
    assert resumed["val_loss"] == full["val_loss"] is not None


def test_resume_without_a_checkpoint_says_so_and_starts_at_step_1(tmp_path, capfd):
    res = train(small_cfg(tmp_path, "empty", "run.max_steps=2", "run.resume=true"))
    assert "resume: no good checkpoint in" in capfd.readouterr().err
    assert res["steps"] == 2 and sorted(losses(tmp_path / "empty")) == [1, 2]


def test_resume_refuses_another_model_before_starting(tmp_path, capfd):
    train(small_cfg(tmp_path, "r", "run.max_steps=2", "run.ckpt_every=2"))
    for workers in ("1", "2"):
        differ = r"model.d_model = 64 there, 32 here; model.ffn_hidden = 256 there, 128 here; model.n_head = 4 "
        with pytest.raises(InputError, match=differ):
            train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.resume=true", "model.d_model=32", "model.n_head=2",
                            f"run.workers={workers}"))
    same = ["model.ffn_hidden=256"]  # the width SMALL derives (8/3 x 64, to a multiple of 128): the same model
    res = train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.resume=true", "optim.lr=1e-4", *same))
    assert res["steps"] == 4 and sorted(losses(tmp_path / "r")) == [1, 2, 3, 4]
    with pytest.raises(InputError, match=r"is at step 4, past run.max_steps \(--max-steps\) = 3; give --max-steps 5"):
        train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.resume=true", *same))  # it would train nothing
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3, 4]
    capfd.readouterr()
    res = train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.resume=true", *same))  # a re-run of a finished job
    assert res["steps"] == 4 and "step_00000004 is at run.max_steps = 4 already: nothing to train" in \
        capfd.readouterr().err
    model = tmp_path / "r" / "checkpoints" / "step_00000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))  # same size: only the loader
    res = train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.resume=true", *same))  # sees it: resumes from 2
    assert res["steps"] == 3


def test_micro_batching_does_not_change_the_gradient(tmp_path):
    a = train(small_cfg(tmp_path, "mb2", "run.max_steps=3"))
    b = train(small_cfg(tmp_path, "mb6", "run.max_steps=3", "run.micro_batch=6"))
    la, lb = losses(tmp_path / "mb2"), losses(tmp_path / "mb6")
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    assert all(la[s] == pytest.approx(lb[s], rel=1e-5) for s in la)
    assert a["tokens"] == b["tokens"] == 3 * 6 * 32


def test_lr_schedules():
    o = config.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(5, o, 100) == 0.5 and lr_at(10, o, 100) == 1.0
    assert lr_at(100, o, 100) == pytest.approx(0.1)
    assert lr_at(55, o, 100) == pytest.approx(0.55)  # cosine midpoint
    o.schedule = "wsd"
    assert lr_at(80, o, 100) == 1.0 and lr_at(100, o, 100) == pytest.approx(0.1)
    assert lr_at(90, o, 100) == pytest.approx(0.55)
    o.schedule = "constant"
    assert lr_at(99, o, 100) == 1.0


def test_wsd_decays_over_the_rounded_fraction_and_never_before_warmup_ends():
    o = config.OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.29)
    assert [s for s in range(1, 101) if lr_at(s, o, 100) < 1.0] == list(range(72, 101))  # 29 steps, not 28
    o.warmup_steps, o.decay_fraction = 4, 0.8  # the decay would start at step 2, inside the warm-up
    lrs = [lr_at(s, o, 10) for s in range(1, 11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(lrs[3:], lrs[4:])) and lrs[4] == pytest.approx(1.0 - 0.9 / 6)  # no jump


def test_throughput_counts_every_step_and_intervals_leave_out_evaluation(tmp_path, monkeypatch):
    """The run's tok/s counts the steps done, not the last logged one (a run stopped between log steps, or with
    no log step, reported too little or 0), and a logged interval's tok/s leaves out the evaluation before it.
    A fake clock that only an evaluation moves: every interval then takes no time at all."""
    import time

    from megacluster.train import metrics

    timer = metrics.StepTimer(first_step=0)
    timer.first_done(timer.t0 + 1.0)
    assert timer.tokens_per_s(10, 100, t_end=timer.t0 + 10.0) == pytest.approx(100.0)  # 9 steps in 9 s
    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(Worker, "evaluate", lambda self: clock.__setitem__(0, clock[0] + 100.0) or 1.0)
    train(small_cfg(tmp_path, "r", "run.max_steps=6", "run.log_every=2", "run.eval_every=2", "run.ckpt_every=0"))
    recs = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "tokens_per_s" in r] == [2, 4, 6]
    assert all(r["tokens_per_s"] > 1e9 for r in recs if "tokens_per_s" in r)  # 0 s: the 100 s evals left out


def test_evaluation_reads_each_validation_window_at_most_once(tmp_path):
    w = Worker(small_cfg(tmp_path, "v", "run.eval_batches=100000"), init_place("cpu"))
    assert 1 <= w.eval_batches() == w.val_order.n // 6 < 100000  # whole batches of B=6 the split holds
    calls, rows = [], []
    w.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]) or rows.extend(
        tuple(r) for r in args[0].tolist()))
    assert w.evaluate() > 0
    assert sum(calls) == 6 * w.eval_batches() and max(calls) == 2  # in micro-batches of 2
    assert len(set(rows)) == len(rows) == 6 * w.eval_batches()  # each window once: no window read twice


def test_cli_json_contract(tmp_path):
    run_dir = tmp_path / "cli"
    out = train_cli(run_dir, "--max-steps", "3")
    for key in ("steps", "final_loss", "val_loss", "tokens", "tokens_per_s", "mfu", "run_dir"):
        assert key in out
    assert out["steps"] == 3 and out["mfu"] is None and out["tokens"] == 3 * 6 * 32
    assert sorted(losses(run_dir)) == [1, 2, 3]


def test_clipping_inside_fused_adamw_equals_explicit_clipping(tmp_path):
    """On CUDA the clip is handed to the fused AdamW kernel (grad_scale); it must equal dividing the grads."""
    import torch

    cfg = small_cfg(tmp_path, "clip", "optim.grad_clip=0.01", "run.max_steps=3")  # small: every step clips
    plain, fused = (Worker(cfg, init_place("cpu"), run_dir=str(tmp_path / n)) for n in ("a", "b"))
    params = [p for p in fused.model.parameters() if p.requires_grad]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.opt.opt.param_groups]
    fused.opt.opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                      eps=cfg.optim.eps, fused=True)  # the CUDA path, on CPU
    for step in (1, 2, 3):
        assert float(plain.train_step(step)) == pytest.approx(float(fused.train_step(step)), rel=1e-6)
        assert float(plain.grad_norm) > 10 * cfg.optim.grad_clip  # the clip really acted
    assert getattr(fused.opt.opt, "grad_scale", None) is not None and not hasattr(plain.opt.opt, "grad_scale")
    for p, q in zip(plain.model.parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_fresh_run_sets_the_earlier_run_aside(tmp_path, capfd):
    train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.ckpt_every=2"))
    with pytest.raises(InputError, match=r"no such file, directory or glob match: /.*/missing.txt$"):  # a fresh run
        # refused on its input moves nothing
        train(small_cfg(tmp_path, "r", "run.max_steps=2", f"data.paths=['{tmp_path / 'missing.txt'}']"))
    assert not list((tmp_path / "r").glob("earlier-*"))
    (tmp_path / "r" / "chaos").mkdir(exist_ok=True)
    (tmp_path / "r" / "chaos" / "kill-r1-s2.r1.fired").touch()  # a one-shot fault that fired in the earlier run
    train(small_cfg(tmp_path, "r", "run.max_steps=2", "run.ckpt_every=2"))  # fresh, same dir: nothing lost
    assert "moved to" in capfd.readouterr().err
    (earlier,) = (tmp_path / "r").glob("earlier-*")
    assert (earlier / "chaos" / "kill-r1-s2.r1.fired").exists()
    assert not (tmp_path / "r" / "chaos" / "kill-r1-s2.r1.fired").exists()  # it would fire again in this run
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert sorted(losses(earlier)) == [1, 2, 3, 4] and sorted(losses(tmp_path / "r")) == [1, 2]
    # so a resume of the second run continues it, not the first run's newer step 4
    res = train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.ckpt_every=2", "run.resume=true"))
    assert res["steps"] == 3 and sorted(losses(tmp_path / "r")) == [1, 2, 3]


def test_a_fresh_run_moves_files_of_the_names_it_writes_even_where_nothing_trained(tmp_path, capfd):
    """A project directory given as --run-dir, holding a config.json, a result.json and a chaos/ of its own: a
    supervised run (which writes config.json, corpus.json and result.json, and clears chaos/) moves them aside."""
    d = tmp_path / "proj"
    (d / "chaos").mkdir(parents=True)
    (d / "chaos" / "notes.txt").write_text("notes")
    (d / "config.json").write_text("precious")
    (d / "result.json").write_text('{"mine": 1}')
    (d / "workers.json").write_text('{"0": 1, "1": 2}')  # an earlier supervised run's pids
    (d / "checkpoints").mkdir()  # empty: left where it is
    train(small_cfg(tmp_path, "proj", "run.max_steps=1", "run.workers=2"))
    assert "the earlier run's result.json, config.json, chaos, workers.json moved to" in capfd.readouterr().err
    (earlier,) = d.glob("earlier-*")
    assert (earlier / "workers.json").read_text() == '{"0": 1, "1": 2}'
    assert json.loads((d / "workers.json").read_text()).keys() == {"0", "1"}
    assert json.loads((d / "workers.json").read_text()) != {"0": 1, "1": 2}
    assert (earlier / "config.json").read_text() == "precious" and (earlier / "chaos" / "notes.txt").exists()
    assert (earlier / "result.json").read_text() == '{"mine": 1}' and not (earlier / "checkpoints").exists()
    assert json.loads((d / "result.json").read_text())["steps"] == 1


def test_a_run_dir_and_a_cache_inside_the_data_directory_are_never_read_as_data(tmp_path):
    """`--data . --run-dir runs/x` (or the token cache under --data): the second run used to tokenize the first
    run's checkpoints and metrics as text (then a --resume refused its own run: "the tokenizer ... differs")."""
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", corpus,
                    ignore=shutil.ignore_patterns("__pycache__"))
    keys = [f"data.paths=['{corpus}']", f"data.cache_dir={corpus / 'cache'}", "run.max_steps=2", "run.ckpt_every=2"]
    first = train(small_cfg(corpus, "run", *keys))
    assert (corpus / "run" / "checkpoints").is_dir() and (corpus / "cache").is_dir()
    again = train(small_cfg(corpus, "run", *keys))  # fresh: the first run is set aside inside the data directory
    assert again["loss_digest"] == first["loss_digest"] and list((corpus / "run").glob("earlier-*"))
    resumed = train(small_cfg(corpus, "run", *keys[:2], "run.max_steps=3", "run.resume=true"))
    assert resumed["steps"] == 3


def test_data_inside_the_cache_root_and_a_users_earlier_file_are_data(tmp_path):
    """Only what the cache and the runs write is left out: the cache root itself may hold the inputs
    (MEGACLUSTER_CACHE=$SCRATCH, data in $SCRATCH/corpus), and a file named earlier-notes.txt is the user's."""
    from megacluster.data import check_inputs
    from megacluster.files import run_outputs

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text("x = 1\n")
    (tmp_path / "corpus" / "earlier-notes.txt").write_text("notes\n")
    (tmp_path / "corpus-0123456789abcdef").mkdir()  # a cache entry beside the data
    (tmp_path / "corpus-0123456789abcdef" / "train.bin").write_bytes(b"\0" * 8)
    cfg = small_cfg(tmp_path, "run", f"data.paths=['{tmp_path}']", f"data.cache_dir={tmp_path}")
    files = check_inputs(cfg.data, cfg.model.vocab_size, [run_outputs(tmp_path / "corpus")])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["corpus/a.py", "corpus/earlier-notes.txt"]


def test_a_run_dir_in_use_by_a_live_run_is_refused_and_left_alone(tmp_path):
    """A second fresh run in the same dir would have set the live run's checkpoints aside under it."""
    import fcntl
    import os

    first = train(small_cfg(tmp_path, "r", "run.max_steps=2", "run.ckpt_every=2"))
    lock = tmp_path / "r" / ".lock"
    assert lock.read_text() != "" and first["steps"] == 2
    with open(lock, "r+") as held:  # as a live run holds it (another open file: the flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.truncate(0)
        held.write("4242")
        held.flush()
        with pytest.raises(InputError, match=r"r is in use by another run \(pid 4242\); wait for it to end"):
            train(small_cfg(tmp_path, "r", "run.max_steps=2"))
        assert lock.exists() and not list((tmp_path / "r").glob("earlier-*"))  # nothing moved, lock kept
        assert sorted(losses(tmp_path / "r")) == [1, 2]
    again = train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.resume=true"))  # released: runs
    assert again["steps"] == 3 and lock.read_text() == str(os.getpid())


def test_a_refused_resume_leaves_the_run_dir_as_it_was_and_one_without_a_supervisor_rewrites_its_files(tmp_path,
                                                                                                         capfd):
    """A user audit: a supervised --resume refused by its workers (a --max-steps below the checkpoint) had deleted
    result.json and rewritten config.json and workers.json, after saying the run "goes on"; a resume without a
    supervisor left the supervised run's result.json ("stopped at step 15" after a finished run), config.json and
    workers.json, never said where it resumed, and counted the earlier invocation's seconds as kept."""
    from megacluster.train.checkpoint import newest_meta

    train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.ckpt_every=2", "run.workers=2"))
    d = tmp_path / "r"
    files = {n: (d / n).read_bytes() for n in ("result.json", "config.json", "workers.json", "corpus.json")}
    capfd.readouterr()
    with pytest.raises(InputError, match=r"is at step 4, past run.max_steps \(--max-steps\) = 3"):
        train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.resume=true", "run.workers=2", "optim.lr=1e-4"))
    assert {n: (d / n).read_bytes() for n in files} == files
    assert "goes on" not in capfd.readouterr().err
    res = train(small_cfg(tmp_path, "r", "run.max_steps=6", "run.ckpt_every=2", "run.resume=true"))  # 1 process
    assert "resume: from step_00000004, after step 4" in capfd.readouterr().err
    assert json.loads((d / "result.json").read_text()) == json.loads(json.dumps(res)) and res["steps"] == 6
    assert json.loads((d / "config.json").read_text())["run"]["workers"] == 1
    assert not (d / "workers.json").exists() and not (d / "corpus.json").exists()
    costs = newest_meta(d / "checkpoints")["costs"]
    assert len(costs) == 6 and res["kept_worker_s"] == pytest.approx(sum(costs[4:]), rel=1e-9) and sum(costs[:4]) > 0


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(InputError, match="exists and is not a directory"):
        train(small_cfg(tmp_path, "f", "run.max_steps=1"))


def test_a_refused_run_leaves_no_directory_made_for_it(tmp_path):
    """inputs.check makes the run dir (to probe that it can write there) before later checks refuse the run:
    what it made goes again; a directory that was there stays, with what it held."""
    with pytest.raises(InputError, match="tokens, too few for one sequence"):
        train(small_cfg(tmp_path, "runs/new", "data.max_bytes=10"))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(InputError, match="tokens, too few for one sequence"):
        train(small_cfg(tmp_path, "mine/new", "data.max_bytes=10"))
    assert sorted(tmp_path.iterdir()) == [tmp_path / "mine"] and not any((tmp_path / "mine").iterdir())


def test_master_weights_one_vs_two_workers_and_exact_resume(tmp_path):
    on = ["optim.master_weights=on", "run.max_steps=6", "run.ckpt_every=3", "run.eval_every=0"]
    off = train(small_cfg(tmp_path, "off", *on[1:]))
    one = train(small_cfg(tmp_path, "one", *on))
    two = train(small_cfg(tmp_path, "two", *on, "run.workers=2"))  # reads the flat all-reduce buffer
    a, b, c = (losses(tmp_path / n) for n in ("off", "one", "two"))
    assert sorted(a) == sorted(b) == sorted(c) == [1, 2, 3, 4, 5, 6]
    for s in a:  # fp32 on CPU: the same AdamW, so the same run as torch's (up to the order of the norm's sum)
        assert b[s] == pytest.approx(a[s], rel=1e-6) and c[s] == pytest.approx(b[s], rel=1e-5)
    assert b[6] < b[1]
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step_00000003", tmp_path / "cut" / "checkpoints" / "step_00000003")
    resumed = train(small_cfg(tmp_path, "cut", *on, "run.resume=true"))
    assert resumed["loss_digest"] == one["loss_digest"] and off["steps"] == two["steps"] == 6
    # torch's AdamW gives the same losses: that each run used the optimizer it was asked for is shown here
    assert not off["master_weights"] and one["master_weights"] and two["master_weights"]
    # a checkpoint of the torch optimizer resumes under the master one (same weights and state dict forms)
    shutil.copytree(tmp_path / "off" / "checkpoints" / "step_00000003", tmp_path / "cross" / "checkpoints" / "step_00000003")
    train(small_cfg(tmp_path, "cross", *on, "run.resume=true"))
    d = losses(tmp_path / "cross")
    assert sorted(d) == [4, 5, 6] and all(d[s] == pytest.approx(a[s], rel=1e-6) for s in d)


def test_master_weights_with_bf16_compute(tmp_path):
    """bf16 autocast on CPU: the model holds bf16 weights, training learns, 2 workers agree with 1 to bf16
    precision, and the checkpoint holds fp32 weights equal to the optimizer's master."""
    on = ["optim.master_weights=on", "run.dtype=bf16", "run.max_steps=6", "run.eval_every=0", "optim.lr=1e-2"]
    import torch

    w = Worker(small_cfg(tmp_path, "w", *on), init_place("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in w.model.parameters())
    one = train(small_cfg(tmp_path, "one", *on))
    two = train(small_cfg(tmp_path, "two", *on, "run.workers=2"))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a[6] < a[1] - 0.3
    assert all(b[s] == pytest.approx(a[s], rel=2e-2) for s in a)
    loaded = CheckpointManager(tmp_path / "one" / "checkpoints").latest()
    assert loaded.meta["step"] == 6 and all(t.dtype == torch.float32 for t in loaded.model.values())
    assert one["steps"] == two["steps"] == 6 and one["master_weights"] and two["master_weights"]
    assert one["dtype"] == two["dtype"] == "bf16"


def test_master_weights_state_transfer_to_a_replacement_worker(tmp_path):
    """A killed worker's replacement takes the master, moments and step count from its peer (broadcast): the
    run's losses are the clean run's, bit for bit."""
    on = ["optim.master_weights=on", "run.max_steps=6", "run.eval_every=0", "run.workers=2", "run.hang_timeout=8"]
    clean = train(small_cfg(tmp_path, "clean", *on))
    chaos = train(small_cfg(tmp_path, "chaos", *on, "run.chaos=kill:rank=1,step=3"))
    assert chaos["recoveries_from_peer"] == 1 and chaos["steps"] == 6
    assert chaos["loss_digest"] == clean["loss_digest"] and chaos["master_weights"] and clean["master_weights"]


def test_master_weights_trainer_sums_micro_batches_in_fp32(tmp_path):
    """Through the Worker (bf16 compute, 3 micro-batches of 1): the sum the update takes is the fp32 sum of the
    micro-batches' own bf16 gradients, bit for bit (a sum in bf16 p.grad would round twice)."""
    import torch

    cfg = small_cfg(tmp_path, "acc", "optim.master_weights=on", "run.dtype=bf16", "run.batch_size=3",
                    "run.micro_batch=1")
    w = Worker(cfg, init_place("cpu"))
    opt, scale = w.opt, 1.0 / w.tokens_per_step
    reference = torch.zeros(opt.n)
    for i in range(3):  # each micro-batch alone, its gradients summed in fp32 here
        w.micro_step(w.to_device(w.order.rows(1, i, 1)), scale)
        reference += torch.cat([p.grad.float().reshape(-1) for p in opt.params])
        for p in opt.params:
            p.grad = None
    taken = []
    take = opt.take_accumulated
    opt.take_accumulated = lambda: taken.append(take()) or taken[-1]
    w.train_step(1)
    assert taken[0] is not None and taken[0].dtype == torch.float32
    assert torch.equal(taken[0], reference)


def test_master_weights_flap_with_micro_batches_matches_a_clean_run(tmp_path):
    """A flap right after the micro-batches were summed (before the all-reduce): the redone step starts a new
    sum, and the run is the clean one, bit for bit."""
    on = ["optim.master_weights=on", "run.dtype=bf16", "run.max_steps=6", "run.eval_every=0", "run.workers=2",
          "run.hang_timeout=8"]  # bf16: the micro-batches are summed in the optimizer (fp32 ones in p.grad)
    clean = train(small_cfg(tmp_path, "clean", *on))
    flap = train(small_cfg(tmp_path, "flap", *on, "run.chaos=flap:step=3"))
    assert flap["flaps_survived"] == 1 and flap["loss_digest"] == clean["loss_digest"]
    assert flap["master_weights"] and clean["master_weights"] and flap["dtype"] == "bf16"


def test_fused_loss_trains_like_the_plain_loss(tmp_path, monkeypatch):
    """run.fused_loss=on routes every training micro-batch through model.HeadLoss, and the run is the plain
    run's (fp32: to rounding), with 1 worker and with 2 (micro-batches of 2, so gradient accumulation too).
    The calls are counted in this process only: the 2-worker run's workers are subprocesses, whose result says
    whether they used it."""
    from megacluster import model

    calls = []
    real = model.HeadLoss.forward
    monkeypatch.setattr(model.HeadLoss, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    base = ["run.max_steps=4", "run.eval_every=0"]
    off = train(small_cfg(tmp_path, "off", *base))
    assert calls == []
    one = train(small_cfg(tmp_path, "one", *base, "run.fused_loss=on"))
    assert len(calls) == 4 * 3  # 4 steps x 3 micro-batches of 2 (validation takes the plain path, no grad)
    two = train(small_cfg(tmp_path, "two", *base, "run.fused_loss=on", "run.workers=2"))
    a, b, c = (losses(tmp_path / n) for n in ("off", "one", "two"))
    assert sorted(a) == sorted(b) == sorted(c) == [1, 2, 3, 4]
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) and c[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    norms = [[json.loads(x)["grad_norm"] for x in open(tmp_path / n / "metrics.jsonl") if '"grad_norm"' in x]
             for n in ("off", "one", "two")]  # AdamW would hide a gradient off by a constant factor: the norm not
    assert len(norms[0]) == 4 and all(x == pytest.approx(y, rel=1e-5) for n in norms[1:] for x, y in zip(n, norms[0]))
    assert one["val_loss"] == pytest.approx(off["val_loss"], rel=1e-5) and two["steps"] == 4
    assert not off["fused_loss"] and one["fused_loss"] and two["fused_loss"]


def test_every_train_flag_sets_its_key_and_flags_win():
    """Layering: preset -> --config -> --set -> dedicated flags; each flag sets exactly its config key."""
    import argparse

    from megacluster.train import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--preset", "gpt2-124m", "--set", "run.workers=3", "--workers", "2", "--device", "cpu",
                         "--max-steps", "7", "--run-dir", "somewhere", "--balance", "auto", "--chaos", "flap:step=3",
                         "--resume", "--data", "a.txt", "b/"])
    cfg = cli.build_config(args)
    assert cfg.model.d_model == 768 and cfg.run.batch_size == 32  # the preset
    assert (cfg.run.workers, cfg.run.device, cfg.run.max_steps, cfg.run.run_dir, cfg.run.balance, cfg.run.chaos,
            cfg.run.resume, cfg.data.paths) == (2, "cpu", 7, "somewhere", "auto", "flap:step=3", True, ["a.txt", "b/"])
    plain = cli.build_config(p.parse_args([]))
    assert (plain.run.workers, plain.run.balance, plain.run.resume, plain.model.d_model) == (1, "equal", False, 128)
    # a check that depends on a flag sees the flag: the chaos step against --max-steps, not the preset's 300
    late = cli.build_config(p.parse_args(["--set", "run.chaos=kill:rank=0,step=400", "--max-steps", "500"]))
    assert late.run.max_steps == 500
    with pytest.raises(InputError, match="run.max_steps=350"):
        cli.build_config(p.parse_args(["--set", "run.chaos=kill:rank=0,step=400", "--max-steps", "350"]))


def test_cli_config_file_and_resume(tmp_path):
    """--config FILE.toml sets keys (overridden by --set and flags); --resume continues the run in --run-dir
    (nothing set aside, only the new step trained) and ends where an uninterrupted run ends, exactly."""
    toml = tmp_path / "run.toml"
    toml.write_text("[run]\nmax_steps = 2\nckpt_every = 1\neval_every = 0\n[optim]\nlr = 2e-3\n")
    first = train_cli(tmp_path / "cut", "--config", str(toml))
    assert first["steps"] == 2  # max_steps from the file
    resumed = train_cli(tmp_path / "cut", "--config", str(toml), "--max-steps", "3", "--resume")
    assert resumed["steps"] == 3 and not list((tmp_path / "cut").glob("earlier-*"))
    recs = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    whole = train_cli(tmp_path / "whole", "--config", str(toml), "--max-steps", "3")
    assert resumed["loss_digest"] == whole["loss_digest"]


def test_resume_says_which_keys_changed_and_refuses_another_validation_split(tmp_path):
    """--resume goes on with the keys given now: it names those that differ from the checkpoint's run (a forgotten
    --max-steps would stretch the schedule unsaid), and refuses a changed data.val_fraction (tokens already trained
    on would move into the validation split), exit 2, before anything runs."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "megacluster", "train", "--run-dir", str(tmp_path / "r"),
                               *[a for kv in SMALL for a in ("--set", kv)], *args], capture_output=True, text=True,
                              timeout=300)
    assert run("--max-steps", "2").returncode == 0
    r = run("--max-steps", "3", "--resume", "--set", "optim.lr=1e-3", "--set", "run.progress=false")
    assert r.returncode == 0, r.stderr
    said = [x for x in r.stderr.splitlines() if x.startswith("--resume:")]
    assert len(said) == 1 and said[0].endswith("optim.lr 0.003 -> 0.001; run.max_steps 2 -> 3"), r.stderr
    bad = run("--max-steps", "4", "--resume", "--set", "data.val_fraction=0.2")
    assert bad.returncode == 2 and "data.val_fraction is 0.2 here" in bad.stderr and "Traceback" not in bad.stderr
    assert run("--max-steps", "4", "--resume").stderr.count("--resume: the run goes on") == 1  # max_steps only


def test_metrics_lines_after_the_restored_step_and_a_torn_line_are_dropped(tmp_path):
    from megacluster.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)] + ['{"step": 3, "val_loss": 2.0}\n']
    path.write_text("".join(lines) + '{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # killed as it wrote step 5
    before = path.stat().st_ino
    log = MetricsLog(tmp_path, 5)  # nothing after step 5, only the torn line goes
    log.close()
    assert path.read_text() == "".join(lines) + '{"step": 4, "loss": 1.0}\n' and path.stat().st_ino != before
    log = MetricsLog(tmp_path, 3)  # resumed from the step-3 checkpoint: step 4 is redone
    log.write({"step": 4, "loss": 0.5})
    log.close()
    assert path.read_text() == "".join(lines) + '{"step": 4, "loss": 0.5}\n'
    unchanged = path.stat().st_ino
    MetricsLog(tmp_path, 4).close()
    assert path.stat().st_ino == unchanged  # nothing to drop: not rewritten


def test_tensorboard_scalars_follow_the_metrics_file_through_a_rewind(tmp_path):
    """With tensorboard installed (the test extra), every numeric field of a metrics line is a scalar at its step,
    and the steps a rewind drops from metrics.jsonl are purged from the event files too."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megacluster.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, 0)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 10.0 - step, "lr": 0.1, "stragglers": []})
    log.rewind(2)  # back to the step-2 checkpoint: steps 3 and 4 are redone
    for step in (3, 4):
        log.write({"step": step, "loss": 1.0 / step, "lr": 0.1, "stragglers": []})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]  # the list is not a scalar
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([9.0, 8.0, 1 / 3, 0.25])  # float32 in the event file
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and [r["loss"] for r in lines] == [9.0, 8.0, 1 / 3, 0.25]


def test_a_shard_rewritten_mid_run_ends_the_run_with_input_error(tmp_path):
    """Shards are memmapped inputs: a rewrite (here the same size, so nothing else would notice) ends the run at
    the next step's check instead of training on other tokens."""
    import numpy as np

    shard = tmp_path / "a.npy"
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 500)
    w = Worker(small_cfg(tmp_path, "r", f"data.paths=['{shard}']", "run.eval_every=0"), init_place("cpu"))
    w.train_step(1)
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 400)
    w.corpus.checked_at = 0.0  # as if a second had passed since the last check
    with pytest.raises(InputError, match="token shard changed"):
        w.train_step(2)


def test_a_resume_on_rewritten_shards_says_so(tmp_path, capfd):
    """A user may --resume with other shards at the same paths (a torchrun restart may not): it goes on, and now
    says the run is no longer exact (a user audit: it was taken without a word, though the checkpoint records the
    shards' key)."""
    import os

    import numpy as np

    shard = tmp_path / "a.npy"
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 500)
    keys = [f"data.paths=['{shard}']", "run.ckpt_every=2"]
    train(small_cfg(tmp_path, "r", "run.max_steps=2", *keys))
    capfd.readouterr()
    assert train(small_cfg(tmp_path, "r", "run.max_steps=3", "run.resume=true", *keys))["steps"] == 3
    assert "token shards differ" not in capfd.readouterr().err  # the same shards: nothing to say
    np.save(shard, np.arange(20_000, dtype=np.uint16) % 400)
    os.utime(shard, ns=(1, 1))  # another mtime, whatever the clock's resolution
    assert train(small_cfg(tmp_path, "r", "run.max_steps=4", "run.resume=true", *keys))["steps"] == 4
    assert "--resume: the token shards differ from those the checkpoint was trained on" in capfd.readouterr().err
