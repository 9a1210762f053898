"""Trainer code that runs only on CUDA (skipped on CPU machines; run on the lent GPU)."""

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
