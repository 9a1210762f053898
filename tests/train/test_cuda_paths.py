"""Trainer code that runs only on CUDA (skipped on CPU machines; run on the lent GPU)."""

import json

import numpy as np
import pytest
import torch

from megacluster import config
from megacluster.train.loop import PINNED_RING, Worker, init_place

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_to_device_ring_of_pinned_buffers_keeps_every_batch(tmp_path):
    """Reused pinned buffers never hand over a batch overwritten by a later one, also when the GPU is busy and
    the host runs ahead, and for batches of several sizes."""
    cfg = config.build("tiny", None, ["data.max_bytes=60000", "model.vocab_size=300", f"run.run_dir={tmp_path}",
                                      "run.device=cuda", "run.compile=off"])
    w = Worker(cfg, init_place("cuda"))
    rng = np.random.default_rng(0)
    sent, got = [], []
    big = torch.randn(4096, 4096, device="cuda")
    for i in range(5 * PINNED_RING):
        big = big @ big / 64  # keep the stream busy so that copies queue behind work
        rows = rng.integers(0, 300, size=(1 + i % 3, 17), dtype=np.int64)
        sent.append(rows.copy())
        got.append(w.to_device(rows))
    torch.cuda.synchronize()
    assert len(w._pinned) == PINNED_RING
    for a, b in zip(sent, got):
        assert b.device.type == "cuda" and np.array_equal(a, b.cpu().numpy())


def test_update_kernel_trains_like_the_gather_path(tmp_path):
    """optim.update_kernel=auto on CUDA: the trainer builds the in-place norm and update (kernels.BlockTable) and
    trains as the gather path does, the same losses to rounding over 4 steps. Coarse on purpose (the bf16 weights
    of the two runs part by roundings): the update's math is held to the gather path tightly, fed the same
    gradients, by tests/test_kernels.py's check_optimizer."""
    from megacluster.train.supervisor import train

    losses = {}
    for choice in ("auto", "off"):
        cfg = config.build("tiny", None, ["data.max_bytes=60000", "model.vocab_size=300", "run.max_steps=4",
                                          "run.log_every=1", "run.progress=false", "run.device=cuda",
                                          "run.compile=off", "optim.master_weights=on", "run.eval_batches=1",
                                          f"optim.update_kernel={choice}", f"run.run_dir={tmp_path / choice}"])
        w = Worker(cfg, init_place("cuda"))
        assert (w.opt.table is not None) is (choice == "auto")
        train(cfg)
        recs = [json.loads(x) for x in open(tmp_path / choice / "metrics.jsonl")]
        losses[choice] = [r["loss"] for r in recs if "loss" in r]
    assert len(losses["auto"]) == 4
    np.testing.assert_allclose(losses["auto"], losses["off"], rtol=1e-3)
