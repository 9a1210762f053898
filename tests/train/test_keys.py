"""No dead options: each config key changes what the run does (a key with no effect fails here)."""

import json
import subprocess
import sys

import pytest
import torch

from megacluster import config
from megacluster.train.loop import Worker, init_place, lr_at
from megacluster.train.supervisor import train

MICRO = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.seq_len=16", "model.vocab_size=300",
         "data.max_bytes=60000", "run.batch_size=4", "run.max_steps=3", "run.log_every=1", "run.progress=false",
         "run.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-2", "optim.grad_clip=1e9"]


def micro_cfg(tmp_path, name, *extra):
    return config.build("tiny", None, MICRO + [f"run.run_dir={tmp_path / name}", *extra])


def run(tmp_path, name, *extra):
    return train(micro_cfg(tmp_path, name, *extra))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"), "base")


@pytest.mark.parametrize("override", [
    "model.rope_theta=100", "model.norm_eps=0.5", "model.init_std=0.05", "model.tie_embeddings=false",
    "optim.weight_decay=50", "optim.beta1=0.5", "optim.beta2=0.5", "optim.eps=1.0", "optim.grad_clip=0.01",
    "optim.lr=1e-4", "optim.min_lr_ratio=0.9", "optim.schedule=constant", "run.seed=7", "run.dtype=bf16",
])
def test_key_changes_the_losses(tmp_path, baseline, override):
    res = run(tmp_path, "x", override)
    assert res["loss_digest"] != baseline["loss_digest"], f"{override} had no effect"


@pytest.fixture(scope="module")
def master_baseline(tmp_path_factory):
    return run(tmp_path_factory.mktemp("master"), "base", "optim.master_weights=on")


@pytest.mark.parametrize("override", ["optim.weight_decay=50", "optim.beta1=0.5", "optim.beta2=0.5", "optim.eps=1.0"])
def test_optimizer_key_changes_the_losses_with_master_weights(tmp_path, master_baseline, override):
    """The same keys reach MasterAdamW (its own update, not torch's AdamW)."""
    res = run(tmp_path, "x", "optim.master_weights=on", override)
    assert res["master_weights"] and res["loss_digest"] != master_baseline["loss_digest"], f"{override} had no effect"


def test_bookkeeping_keys(tmp_path):
    res = run(tmp_path, "k", "run.ckpt_every=1", "run.ckpt_keep=2", "run.log_every=2", "run.eval_every=2",
              "run.eval_batches=2", "run.max_steps=4")
    ckpts = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000003", "step_00000004"]  # keep the last 2
    recs = [json.loads(x) for x in open(tmp_path / "k" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    one = run(tmp_path, "e1", "run.eval_batches=1", "run.max_steps=4", "run.eval_every=0", "run.ckpt_every=0")
    assert one["val_loss"] != res["val_loss"]  # a different number of validation batches
    recs = [json.loads(x) for x in open(tmp_path / "e1" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "val_loss" in r] == [4]  # eval_every=0: only at the end
    assert [p.name for p in (tmp_path / "e1" / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        "step_00000004"]  # ckpt_every=0: only at the end


def test_micro_batch_sets_the_passes_per_step(tmp_path, monkeypatch):
    calls = []
    real = Worker.micro_step

    def counted(self, rows, scale):
        calls.append(rows.shape[0])
        return real(self, rows, scale)

    monkeypatch.setattr(Worker, "micro_step", counted)
    split = run(tmp_path, "mb2", "run.batch_size=6", "run.micro_batch=2")
    assert calls == [2] * 3 * 3  # 3 steps x 3 forward/backward passes of 2 sequences
    calls.clear()
    whole = run(tmp_path, "mb6", "run.batch_size=6", "run.micro_batch=6")
    assert calls == [6] * 3  # one pass per step
    assert split["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)  # same gradients, same training
    assert split["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


def test_progress_bar_on_stderr(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width off a terminal: wide enough for the whole bar
    on = run(tmp_path, "on", "run.progress=true")
    err = capfd.readouterr().err
    # off a terminal rich draws no live bar, but prints its final state once when the bar stops
    assert "3/3" in err and f"loss {on['final_loss']:.4f}" in err and "tok/s" in err, err
    off = run(tmp_path, "off", "run.progress=false")
    err = capfd.readouterr().err
    assert "3/3" not in err and f"loss {off['final_loss']:.4f}" not in err and "tok/s" not in err, err


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compile_wraps_the_forward(tmp_path):
    on = Worker(micro_cfg(tmp_path, "on", "run.compile=on"), init_place("cpu"))
    assert isinstance(on.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert on.forward is not on.model and on.forward._orig_mod is on.model  # compiles the module it trains
    for mode in ("off", "auto"):  # auto = on for cuda only
        plain = Worker(micro_cfg(tmp_path, mode, f"run.compile={mode}"), init_place("cpu"))
        assert plain.forward is plain.model


def test_wsd_decay_fraction_moves_the_decay_start():
    o = config.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd")

    def first_below_peak():
        return next(s for s in range(o.warmup_steps + 1, 101) if lr_at(s, o, 100) < o.lr)

    o.decay_fraction = 0.5
    assert first_below_peak() == 51 and lr_at(100, o, 100) == pytest.approx(0.1)
    o.decay_fraction = 0.2
    assert first_below_peak() == 81 and lr_at(100, o, 100) == pytest.approx(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_device_cuda_without_cuda_exits_2(tmp_path, workers):
    r = subprocess.run([sys.executable, "-m", "megacluster", "train", "--device", "cuda", "--max-steps", "1",
                        "--workers", workers, "--run-dir", str(tmp_path / "runs" / "d"),
                        *[a for kv in MICRO for a in ("--set", kv)]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--device cuda" in r.stderr
    assert not (tmp_path / "runs").exists()  # refused once torch was up: the directories made for it are gone


@pytest.mark.parametrize("choice, device, compiled, on", [
    ("auto", "cuda", True, True), ("auto", "cuda", False, False), ("auto", "cpu", True, False),
    ("auto", "cpu", False, False), ("on", "cpu", False, True), ("off", "cuda", True, False),
])
def test_auto_switches_are_on_for_compiled_cuda_only(choice, device, compiled, on):
    """optim.master_weights and run.fused_loss default to auto: on where they were measured faster (compiled, CUDA:
    benchmarks/RESULTS.md), off elsewhere, so CPU runs keep the plain path and its loss digests."""
    from megacluster.train import optim

    assert optim.on_for_compiled_cuda(choice, torch.device(device), compiled) is on


@pytest.mark.parametrize("key", ["optim.master_weights", "run.fused_loss"])
def test_auto_defaults_follow_the_switch_in_the_worker(tmp_path, key):
    """The Worker applies the switch: the default (auto) on CPU builds the plain path; `on` builds the other."""
    from megacluster.train.optim import MasterAdamW

    def built(*extra):
        w = Worker(micro_cfg(tmp_path, "w", *extra), init_place("cpu"))
        return isinstance(w.opt, MasterAdamW) if key.startswith("optim") else w.model.fused_loss

    section, name = key.split(".")
    assert getattr(getattr(config.build("tiny", None, []), section), name) == "auto"
    assert built() is False and built("run.compile=on") is False  # CPU: auto is off, compiled or not
    assert built(f"{key}=on") is True


def test_kernel_keys_reach_every_block(tmp_path):
    """run.swiglu_kernel and run.rope_kernel: auto asks every block for the Triton backward (used where it can run:
    CUDA with Triton; tests/test_kernels.py checks the math, benchmarks/RESULTS.md the speed); off keeps autograd's.
    run.loss_kernel the same for the fused loss's softmax (model.HeadLoss)."""
    for choice, on in (("auto", True), ("off", False)):
        w = Worker(micro_cfg(tmp_path, choice, f"run.swiglu_kernel={choice}"), init_place("cpu"))
        assert [b.mlp.kernel for b in w.model.blocks] == [on] * len(w.model.blocks)
        w = Worker(micro_cfg(tmp_path, "rope" + choice, f"run.rope_kernel={choice}"), init_place("cpu"))
        assert [b.attn.rope_kernel for b in w.model.blocks] == [on] * len(w.model.blocks)
        w = Worker(micro_cfg(tmp_path, "loss" + choice, f"run.loss_kernel={choice}"), init_place("cpu"))
        assert w.model.loss_kernel is on and w.resolved()["loss_kernel"] is False  # asked; no GPU to run it here
    default = Worker(micro_cfg(tmp_path, "default"), init_place("cpu")).model
    assert default.blocks[0].mlp.kernel and default.blocks[0].attn.rope_kernel  # both auto by default
    assert not default.loss_kernel  # off until timed on a GPU


def test_update_kernel_key_picks_the_in_place_optimizer_step(tmp_path, monkeypatch):
    """optim.update_kernel: auto gives MasterAdamW the block table of kernels.BlockTable where the kernels can run
    (here made to say so: no GPU; tests/test_kernels.py runs them through the interpreter, the GPU tests in the
    trainer), off keeps the gather; without master weights there is nothing to switch."""
    from megacluster import kernels

    monkeypatch.setattr(kernels, "available", lambda x: True)
    for choice, on in (("auto", True), ("off", False)):
        w = Worker(micro_cfg(tmp_path, choice, "optim.master_weights=on", f"optim.update_kernel={choice}"),
                   init_place("cpu"))
        assert (w.opt.table is not None) is on
    assert not hasattr(Worker(micro_cfg(tmp_path, "torch"), init_place("cpu")).opt, "table")
