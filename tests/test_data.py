import json

import numpy as np
import pytest

from megacluster.config import DataConfig
from megacluster.data import SampleOrder, default_corpus, prepare, resolve
from megacluster.errors import InputError


def test_default_corpus_is_stdlib_source():
    files = default_corpus()
    names = {f.name for f in files}
    assert {"os.py", "json"} & names or "os.py" in names
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def _write_corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(5):
        (tmp_path / "docs" / f"f{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"hello world number {i} " * 10}) + "\n")
    return tmp_path


def test_inputs_dirs_globs_jsonl(tmp_path):
    _write_corpus(tmp_path)
    files = resolve([str(tmp_path / "docs"), str(tmp_path / "*.jsonl"), str(tmp_path / "docs" / "f0.txt")])
    assert [f.name for f in files] == ["f0.txt", "f1.txt", "f2.txt", "f3.txt", "f4.txt", "d.jsonl"]  # deduped
    cfg = DataConfig(paths=[str(tmp_path / "docs"), str(tmp_path / "d.jsonl")], val_fraction=0.1)
    c = prepare(cfg, 300)
    assert c.vocab_size <= 300 and len(c.val) > 0 and len(c.train) > 9 * len(c.val) - 10
    from megacluster.tokenizer import load

    tok = load(c.tokenizer_path)
    text = tok.decode([int(t) for t in c.train[:50]])
    assert "def f0(x):" in text  # the stream decodes back to the source text
    again = prepare(cfg, 300)  # cached: same directory, same tokens
    assert again.directory == c.directory and np.array_equal(again.train, c.train)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="--data: no such file"):
        resolve([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2: each .jsonl line needs a string field 'text'"):
        prepare(DataConfig(paths=[str(bad)], cache_dir=str(tmp_path / "c")), 300)
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 999], dtype=np.int32))
    with pytest.raises(InputError, match="token id 999 >= model.vocab_size 500"):
        prepare(DataConfig(paths=[str(big)]), 500)


def test_pretokenized_shards(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16) % 50)
    (np.arange(1000, dtype=np.uint16) % 7).tofile(tmp_path / "b.bin")
    c = prepare(DataConfig(paths=[str(tmp_path / "a.npy"), str(tmp_path / "b.bin")], val_fraction=0.1), 64)
    assert len(c.train) + len(c.val) == 2000 and c.tokenizer_path is None


def test_sample_order_is_a_function_of_seed_and_step_only():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = SampleOrder(tokens, seq_len=16, batch_size=8, seed=3)
    b = SampleOrder(tokens, seq_len=16, batch_size=8, seed=3)
    full = a.rows(17, 0, 8)
    # any split of the batch over workers gives the same rows; a fresh object (a resumed run) too
    parts = np.concatenate([b.rows(17, 0, 3), b.rows(17, 3, 1), b.rows(17, 4, 4)])
    assert np.array_equal(full, parts)
    assert np.array_equal(full[:, 1:], full[:, :-1] + 1)  # targets are inputs shifted by one token
    assert not np.array_equal(full, SampleOrder(tokens, 16, 8, seed=4).rows(17, 0, 8))
    # one epoch visits every window exactly once
    n = a.n
    seen = np.concatenate([a.windows(s, 0, 8) for s in range(n // 8)])
    assert len(set(seen.tolist())) == len(seen) == n // 8 * 8
