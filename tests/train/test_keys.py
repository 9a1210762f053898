"""No dead options: each config key changes what the run does (a key with no effect fails here)."""

import json

import pytest

from megacluster import config
from megacluster.train.supervisor import train

MICRO = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.seq_len=16", "model.vocab_size=300",
         "data.max_bytes=60000", "run.batch_size=4", "run.max_steps=3", "run.log_every=1", "run.progress=false",
         "run.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-2", "optim.grad_clip=1e9"]


def run(tmp_path, name, *extra):
    return train(config.build("tiny", None, MICRO + [f"run.run_dir={tmp_path / name}", *extra]))


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


def test_bookkeeping_keys(tmp_path):
    res = run(tmp_path, "k", "run.ckpt_every=1", "run.ckpt_keep=2", "run.log_every=2", "run.eval_every=2",
              "run.eval_batches=2", "run.max_steps=4")
    ckpts = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000003", "step_00000004"]  # keep the last 2
    recs = [json.loads(x) for x in open(tmp_path / "k" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    one = run(tmp_path, "e1", "run.eval_batches=1", "run.max_steps=4")
    assert one["val_loss"] != res["val_loss"]  # a different number of validation batches
