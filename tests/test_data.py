import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from megacluster import data
from megacluster.config import DataConfig
from megacluster.data import SampleOrder, default_corpus, prepare, resolve
from megacluster.errors import InputError


def test_default_corpus_is_stdlib_source():
    files = default_corpus()
    names = {f.name for f in files}
    assert {"os.py", "__init__.py"} <= names and any(f.parent.name == "json" for f in files)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])  # the pruned walk lists what a full rglob + filter lists
    assert files == sorted(p for p in root.rglob("*.py") if not data._SKIP_DIRS & set(p.relative_to(root).parts))


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
    n = len(c.train) + len(c.val)  # the stream's last 10% held out: at the 2% default this would fail
    assert c.vocab_size <= 300 and len(c.val) == int(n * 0.1) > 2
    from megacluster.tokenizer import load

    tok = load(c.tokenizer_path)
    text = tok.decode([int(t) for t in c.train[:50]])
    assert "def f0(x):" in text  # the stream decodes back to the source text
    again = prepare(cfg, 300)  # cached: same directory, same tokens
    assert again.directory == c.directory and np.array_equal(again.train, c.train)


def _count(monkeypatch, name):
    calls = []
    real = getattr(data, name)
    monkeypatch.setattr(data, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _touch(path, later_s=10):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(later_s * 1e9)))


def test_second_prepare_reads_no_input_and_a_changed_input_rebuilds(tmp_path, monkeypatch):
    _write_corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "cache"))
    first = prepare(cfg, 300)
    builds, reads = _count(monkeypatch, "_build"), _count(monkeypatch, "_read_text")
    again = prepare(cfg, 300)  # what every worker does after the supervisor's call
    assert (builds, reads) == ([], []) and again.directory == first.directory
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    _touch(tmp_path / "docs" / "f3.txt")  # same bytes, newer mtime: rebuilt (as make would)
    touched = prepare(cfg, 300)
    assert len(builds) == 1 and touched.directory != first.directory
    (tmp_path / "docs" / "f3.txt").write_text("def changed():\n    pass\n" * 40)
    changed = prepare(cfg, 300)
    assert len(builds) == 2 and changed.directory not in (first.directory, touched.directory)
    from megacluster.tokenizer import load

    assert "def changed():" in load(changed.tokenizer_path).decode([int(t) for t in changed.train])


def test_second_prepare_of_shards_scans_nothing_and_a_changed_shard_is_rescanned(tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    for i in range(3):
        np.save(tmp_path / "s" / f"{i}.npy", (np.arange(1000 + i, dtype=np.int32) * (i + 1)) % 60)
    cfg = DataConfig(paths=[str(tmp_path / "s")], cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    scans = _count(monkeypatch, "_scan_max_ids")
    first = prepare(cfg, 64)
    again = prepare(cfg, 64)
    assert len(scans) == 1 and list((tmp_path / "cache").glob("shards-*.json"))
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    bad = np.load(tmp_path / "s" / "1.npy")
    bad[5] = 64  # same size: only the newer mtime tells the manifest is stale
    np.save(tmp_path / "s" / "1.npy", bad)
    _touch(tmp_path / "s" / "1.npy")
    with pytest.raises(InputError, match="1.npy: token id 64 >= model.vocab_size 64"):
        prepare(cfg, 64)
    assert len(scans) == 2


def test_max_bytes_reads_at_most_the_cap(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"first\r\nline \xff\n")  # CRLF and a bad byte, as read_text gives them
    (tmp_path / "b.txt").write_text("\u00e9" * 500_000, encoding="utf-8")  # 1 MB, 2 bytes a character
    (tmp_path / "c.txt").write_text("never read")
    files = [tmp_path / n for n in ("a.txt", "b.txt", "c.txt")]
    whole = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    assert list(data._documents(files, 0)) == whole  # no cap: every file whole
    assert list(data._documents(files, 10_000_000)) == whole  # under the cap: the same
    reads = []
    real = data._read_text
    monkeypatch.setattr(data, "_read_text", lambda p, n: reads.append(real(p, n)) or reads[-1])
    a = len(whole[0].encode())
    docs = list(data._documents(files, a + 1001))  # b.txt crosses the cap: cut to whole characters
    assert docs == [whole[0], "\u00e9" * 500] and len(reads) == 2 and len(reads[1]) == 1001
    assert list(data._documents(files, a)) == [whole[0]]  # a cap on a file's end: the next is not opened


def test_a_cap_far_above_the_data_reads_it_whole(tmp_path, monkeypatch):
    """data.max_bytes = 1e18 means no cap in effect: f.read(1e18) sized its buffer by the cap (MemoryError on
    a 6-byte file); the capped read now goes in chunks, and chunking cuts no character or newline."""
    (tmp_path / "a.txt").write_bytes(b"first\r\nline \xff\n" + "\u00e9x".encode() * 7)
    whole = (tmp_path / "a.txt").read_text(encoding="utf-8", errors="replace")
    assert list(data._documents([tmp_path / "a.txt"], 10**18)) == [whole]
    monkeypatch.setattr(data, "READ_CHUNK_CHARS", 3)  # many chunks, boundaries inside \r\n and after \xe9
    assert data._read_text(tmp_path / "a.txt", 10**18) == whole
    assert data._read_text(tmp_path / "a.txt", 8) == whole[:8] and len(whole) > 8


def test_prepare_applies_data_max_bytes(tmp_path):
    """The key itself (not only the helper): prepare() tokenizes at most max_bytes of text, 0 = everything."""
    _write_corpus(tmp_path)
    from megacluster.tokenizer import load

    def text(cap):
        c = prepare(DataConfig(paths=[str(tmp_path / "docs")], max_bytes=cap, val_fraction=0.1,
                               cache_dir=str(tmp_path / "c")), 300)
        tok = load(c.tokenizer_path)
        return tok.decode([int(t) for t in c.train]) + tok.decode([int(t) for t in c.val])

    whole, capped = text(0), text(1000)
    assert len(whole) > 5000 and 900 <= len(capped.encode()) <= 1000 and whole.startswith(capped[:500])


def test_max_bytes_cuts_the_jsonl_line_that_crosses_it(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc", "defgh", "ij"]) + "not json\n")
    assert list(data._documents([f], 6)) == ["abc", "def"]  # the bad line after the cap is never read


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
    stream = np.concatenate([np.arange(1000) % 50, np.arange(1000) % 7])  # what the shards read as, uncopied
    assert np.array_equal(c.train, stream[:1800]) and np.array_equal(c.val, stream[1800:])
    assert np.array_equal(c.train[990:1010], stream[990:1010]) and len(c.train[1790:1900]) == 10
    rows = SampleOrder(c.train, 16, 8, seed=1).rows(5, 0, 8)
    assert np.array_equal(rows, SampleOrder(stream[:1800], 16, 8, seed=1).rows(5, 0, 8))


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


def test_shards_slice_like_one_concatenated_array():
    parts = [np.arange(0, 5), np.zeros(0, np.int64), np.arange(5, 12), np.arange(12, 13), np.zeros(0, np.int64)]
    s, whole = data.Shards(parts), np.arange(13)
    assert len(s) == 13 and np.array_equal(np.asarray(s), whole)
    for a in [None, *range(-15, 16)]:
        for b in [None, *range(-15, 16)]:
            assert np.array_equal(s[a:b], whole[a:b]), (a, b)
    with pytest.raises(TypeError):
        s[3]
    for cut in range(0, 14):  # split at every offset, part boundaries and empty parts included
        head, tail = s.split(cut)
        assert np.array_equal(np.asarray(head), whole[:cut]) and np.array_equal(np.asarray(tail), whole[cut:])
        for side in (head, tail):  # views of the memmapped shards, not copies
            assert all(any(np.shares_memory(p, q) for q in parts) for p in side.parts if len(p)), cut


def test_a_negative_token_id_in_a_shard_is_refused(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([1, 2, -3, 4] * 50, dtype=np.int32))
    with pytest.raises(InputError, match="neg.npy: token id -3 < 0"):
        prepare(DataConfig(paths=[str(tmp_path / "neg.npy")], cache_dir=str(tmp_path / "c")), 64)


def test_unusable_inputs_are_refused_naming_them(tmp_path):
    """Inputs that gave a traceback (exit 1) are an InputError (exit 2) naming the file, and no cache is left
    behind that would fail the same way next time."""
    cache = str(tmp_path / "c")
    cases = {
        "empty.txt": (b"", "no text in 1 file"),
        "one.txt": (b"x", "2 tokens in all, too few"),
        "blank.jsonl": (b"\n  \n\n", "no text in 1 file"),
        "odd.bin": (b"\x01\x00\x02", "odd.bin: not a usable token shard .*not a multiple of 2"),
        "nothing.bin": (b"", "nothing.bin: not a usable token shard .*empty"),
        "text.npy": (b"def f(): pass\n", "text.npy: not a usable token shard"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=message):
            prepare(DataConfig(paths=[str(tmp_path / name)], cache_dir=cache), 300)
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object))
    with pytest.raises(InputError, match="objects.npy: not a usable token shard"):
        prepare(DataConfig(paths=[str(tmp_path / "objects.npy")], cache_dir=cache), 300)
    (tmp_path / "e.txt").write_text("é" * 100)
    with pytest.raises(InputError, match="within data.max_bytes=1"):  # the cap cuts the only character in two
        prepare(DataConfig(paths=[str(tmp_path / "e.txt")], cache_dir=cache, max_bytes=1), 300)
    with pytest.raises(InputError, match="2 tokens in all within data.max_bytes=2, too few"):  # the cap is why
        prepare(DataConfig(paths=[str(tmp_path / "e.txt")], cache_dir=cache, max_bytes=2), 300)
    assert not list(Path(cache).glob("corpus-*/meta.json"))  # nothing marked complete


def test_jsonl_with_bad_bytes_or_lone_surrogates_reads_like_text_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "caf\xff ok"}\n' + json.dumps({"text": "a\ud800b"}).encode() + b"\n"
                  + json.dumps({"text": "smile \U0001F600"}, ensure_ascii=True).encode() + b"\n")
    assert list(data._jsonl_texts(f)) == ["caf\ufffd ok", "a\ufffdb", "smile \U0001F600"]  # a valid pair stays
    c = prepare(DataConfig(paths=[str(f)] * 1, cache_dir=str(tmp_path / "c"), val_fraction=0.1), 300)
    assert len(c.train) > 0


def test_directories_skip_hidden_and_pycache_and_existing_paths_are_not_globs(tmp_path):
    (tmp_path / "repo" / ".git" / "objects").mkdir(parents=True)
    (tmp_path / "repo" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "repo" / ".git" / "objects" / "ab").write_bytes(b"x\x01+)JMU")
    (tmp_path / "repo" / "__pycache__").mkdir()
    (tmp_path / "repo" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00")
    (tmp_path / "repo" / "pkg").mkdir()
    for rel in ("a.py", ".env", "pkg/b.py"):
        (tmp_path / "repo" / rel).write_text("x = 1\n")
    assert [p.relative_to(tmp_path / "repo").as_posix() for p in resolve([str(tmp_path / "repo")])] == \
        ["a.py", "pkg/b.py"]
    (tmp_path / "x[1].txt").write_text("one")
    (tmp_path / "x1.txt").write_text("other")
    assert resolve([str(tmp_path / "x[1].txt")]) == [tmp_path / "x[1].txt"]  # the file named, not a glob match
    assert resolve([str(tmp_path / "x[0-9].txt")]) == [tmp_path / "x1.txt"]  # a pattern still globs


def test_end_of_text_written_in_a_document_is_text(tmp_path):
    (tmp_path / "a.txt").write_text('EOT = "<|endoftext|>"\n' * 30)
    c = prepare(DataConfig(paths=[str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "c"), val_fraction=0.1), 300)
    from megacluster.tokenizer import eot_id, load

    tok = load(c.tokenizer_path)
    stream = np.concatenate([np.asarray(c.train), np.asarray(c.val)])
    assert int((stream == eot_id(tok)).sum()) == 1  # only the separator after the one document
    assert eot_id(tok) not in tok.encode('EOT = "<|endoftext|>"').ids  # a loaded tokenizer encodes as training did
    assert tok.decode([int(t) for t in c.train[:20]]).startswith('EOT = "<|endoftext|>"')


def test_a_split_too_short_for_one_sequence_is_named():
    c = data.Corpus(train=np.zeros(1000, np.uint16), val=np.zeros(200, np.uint16), vocab_size=300,
                    directory=Path("."), tokenizer_path=None)
    c.check(199, 0.02)  # 200 tokens: one sequence of 199 and its shifted target
    with pytest.raises(InputError, match=r"validation split has 200 tokens.*seq_len=200 .*larger data.val_fraction"):
        c.check(200, 0.02)
    with pytest.raises(InputError, match=r"training split has 1,000 tokens.*seq_len=1000"):
        c.check(1000, 0.02)


def test_workers_reopen_the_prepared_corpus_even_after_an_input_changed(tmp_path):
    _write_corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    c = prepare(cfg, 300)
    ref = json.loads(json.dumps(c.reference()))
    (tmp_path / "docs" / "f4.txt").write_text("something else entirely\n" * 50)
    assert prepare(cfg, 300).directory != c.directory  # the inputs now make another corpus
    again = data.reopen(ref, cfg, 300)  # a worker of the run still reads the run's
    assert again.directory == c.directory and np.array_equal(again.train, c.train)
    assert again.identity() == c.identity() and c.identity()["tokenizer_sha256"]

    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16) % 50)
    scfg = DataConfig(paths=[str(tmp_path / "a.npy")], cache_dir=str(tmp_path / "c"))
    ref = json.loads(json.dumps(prepare(scfg, 64).reference()))
    assert np.array_equal(data.reopen(ref, scfg, 64).train, prepare(scfg, 64).train)
    os.chmod(tmp_path / "a.npy", 0o600)  # a new ctime, the same tokens: still the run's shard
    assert np.array_equal(data.reopen(ref, scfg, 64).train, prepare(scfg, 64).train)
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16) % 40)
    with pytest.raises(InputError, match="token shard changed"):
        data.reopen(ref, scfg, 64)


def test_a_cache_missing_its_tokenizer_has_no_tokenizer_identity(tmp_path):
    _write_corpus(tmp_path)
    c = prepare(DataConfig(paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "c"), val_fraction=0.1), 300)
    c.tokenizer_path.unlink()
    assert c.identity()["tokenizer_sha256"] is None and c.identity()["train_tokens"] == len(c.train)


def test_an_unreadable_input_is_refused_naming_it(tmp_path):
    """/proc/self/mem is a regular file whose first bytes fail to read (EIO), as root too: a real I/O error."""
    _write_corpus(tmp_path)
    for name in ("bad.txt", "bad.jsonl"):
        (tmp_path / "docs" / name).symlink_to("/proc/self/mem")
        with pytest.raises(InputError, match=rf"--data .*{name}: cannot read it \(Input/output error\)"):
            prepare(DataConfig(paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "c")), 300)
        (tmp_path / "docs" / name).unlink()


def test_symlinked_directories_are_followed_once_and_an_unlistable_one_is_refused(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.txt").write_text("r")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "own.txt").write_text("o")
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "up").symlink_to(tmp_path / "d")  # a loop: d/linked/up is d again
    assert [p.relative_to(tmp_path).as_posix() for p in resolve([str(tmp_path / "d")])] == \
        ["d/linked/r.txt", "d/own.txt"]
    (tmp_path / "d" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # a directory this user may not list (root may list any, so the OS is told to refuse)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"--data .*/d: cannot list .*/d/locked \(Permission denied\)"):
        resolve([str(tmp_path / "d")])


def test_a_cache_entry_missing_a_file_is_rebuilt(tmp_path):
    _write_corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs")], cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    c = prepare(cfg, 300)
    train = np.array(c.train)
    (c.directory / "train.bin").unlink()  # a tmp cleaner
    again = prepare(cfg, 300)
    assert again.directory == c.directory and np.array_equal(np.asarray(again.train), train)


def test_globs_skip_pycache_and_suffixes_are_read_in_any_case(tmp_path):
    (tmp_path / "d" / "__pycache__").mkdir(parents=True)
    (tmp_path / "d" / "__pycache__" / "c.pyc").write_bytes(b"\x00")
    (tmp_path / "d" / "x.txt").write_text("x")
    for pattern in ("d/*", "d/**", "d/**/*"):
        assert resolve([str(tmp_path / pattern)]) == [tmp_path / "d" / "x.txt"], pattern
    assert resolve([str(tmp_path / "d/__pycache__/*")]) == [tmp_path / "d" / "__pycache__" / "c.pyc"]  # asked for
    with open(tmp_path / "UP.NPY", "wb") as f:  # (np.save to a name would add ".npy")
        np.save(f, np.arange(100, dtype=np.uint16))
    c = prepare(DataConfig(paths=[str(tmp_path / "UP.NPY")], cache_dir=str(tmp_path / "c")), 128)
    assert c.shards == [tmp_path / "UP.NPY"] and np.array_equal(np.asarray(c.train), np.arange(98))


def test_a_shard_rewritten_during_the_run_is_refused_by_the_next_check(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16) % 50)
    c = prepare(DataConfig(paths=[str(tmp_path / "a.npy")], cache_dir=str(tmp_path / "c")), 64)
    c.check_unchanged(every_s=0)
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.uint16) % 40)  # the same size
    c.check_unchanged()  # checked less than a second ago: not stat'ed again yet
    c.checked_at, c.check_cost = time.monotonic() - 2, 0.05  # 2 s ago, but a stat of all shards took 50 ms:
    c.check_unchanged()  # at most 1% of the time goes to it, so not before 5 s
    c.checked_at = 0.0
    with pytest.raises(InputError, match="token shard changed"):
        c.check_unchanged()


def test_a_device_or_a_fifo_given_as_data_is_named_as_such(tmp_path):
    """`--data /dev/null` was reported as "no such file"."""
    os.mkfifo(tmp_path / "pipe")
    for special in ("/dev/null", str(tmp_path / "pipe")):
        with pytest.raises(InputError, match=f"--data {special}: is not a regular file or a directory"):
            resolve([special])


def test_exclusions_go_by_name_so_entries_made_meanwhile_are_left_out_too(tmp_path):
    """Under torchrun a rank may walk --data while rank 0 writes a cache entry or sets an earlier run aside there:
    excluded by name, not by a listing taken before. Names the cache and runs do not write stay data."""
    from megacluster.files import run_outputs
    root = tmp_path / "d"
    for rel in ("a.txt", "corpus-2024/b.txt", "corpus-0123456789abcdef/train.bin", "run/earlier-20261207T101010/x",
                "run/earlier-notes.txt", "run/metrics.jsonl", "shards-0123456789abcdef.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    cache = data.cache_entries(DataConfig(cache_dir=str(root)))
    got = [p.relative_to(root).as_posix() for p in resolve([str(root)], [run_outputs(root / "run"), cache])]
    assert got == ["a.txt", "corpus-2024/b.txt", "run/earlier-notes.txt"]


def test_a_cut_at_max_bytes_is_said_and_kept_in_the_cache(tmp_path, capsys):
    _write_corpus(tmp_path)  # 5 files of 1,280 bytes each
    cfg = DataConfig(paths=[str(tmp_path / "docs")], max_bytes=3000, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    corpus = prepare(cfg, 300)
    err = capsys.readouterr().err
    assert "data: text cut at data.max_bytes=3,000 bytes: 3 of 5 file(s) read, the last (" in err
    assert "f2.txt) in part" in err and "--set data.max_bytes=0" in err
    meta = json.loads((corpus.directory / "meta.json").read_text())
    assert meta["files_read"] == 3 and meta["cut_at_max_bytes"] == 3000
    whole = prepare(DataConfig(paths=[str(tmp_path / "docs")], max_bytes=0, val_fraction=0.1,
                               cache_dir=str(tmp_path / "c")), 300)
    assert "cut" not in capsys.readouterr().err
    meta = json.loads((whole.directory / "meta.json").read_text())
    assert meta["files_read"] == 5 and meta["cut_at_max_bytes"] is None
    # the cap inside a 2-byte character (the cut text is 1 byte short of it) and exactly at a file's end
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "a.txt").write_text("h\u00e9llo " * 100)  # 700 bytes
    (tmp_path / "u" / "b.txt").write_text("more text " * 100)
    for cap, said in ((142, "the last (" + str(tmp_path / "u" / "a.txt") + ") in part"),  # 20 x 7 + 2: in an é
                      (700, "1 of 2 file(s) read, the last (" + str(tmp_path / "u" / "a.txt") + ") whole")):
        (tmp_path / f"u{cap}").mkdir()
        data._build([tmp_path / "u" / "a.txt", tmp_path / "u" / "b.txt"],
                    DataConfig(max_bytes=cap, val_fraction=0.5), 300, tmp_path / f"u{cap}")
        assert said in capsys.readouterr().err
    (tmp_path / "exact").mkdir()
    data._build([tmp_path / "u" / "a.txt"], DataConfig(max_bytes=700, val_fraction=0.5), 300, tmp_path / "exact")
    assert "cut" not in capsys.readouterr().err  # exactly the whole input: nothing cut


def test_other_runs_below_a_data_directory_are_not_data_and_binary_text_is_refused(tmp_path):
    """A run dir below --data (its lock beside an output, or checkpoints/ beside metrics.jsonl for a run from
    before the lock) is skipped whole; a user's directory that merely holds a metrics.jsonl is data. A text file
    with a NUL byte (a checkpoint, an archive) is refused, naming it."""
    _write_corpus(tmp_path)
    docs = tmp_path / "docs"
    new_run, old_run, notes = docs / "runs" / "a", docs / "runs" / "b", docs / "notes"
    for d in (new_run / "checkpoints" / "step_00000002", old_run / "checkpoints" / "step_00000005", notes):
        d.mkdir(parents=True)
    other = docs / "hf"  # another tool's checkpoints/ beside a metrics.jsonl: data
    (other / "checkpoints" / "checkpoint-1000").mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"text": "another tool"}\n')
    (new_run / ".lock").write_text("")
    (new_run / "config.json").write_text("{}")
    (new_run / "metrics.jsonl").write_text('{"step": 2}\n')
    cfg_dir = docs / "app"  # a lock beside a config.json alone is another tool's, and data
    cfg_dir.mkdir()
    (cfg_dir / ".lock").write_text("")
    (cfg_dir / "config.json").write_text('{"setting": 1}')
    (new_run / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00{}")
    (old_run / "metrics.jsonl").write_text('{"step": 1}\n')
    (old_run / "notes.txt").write_text("an old run's file\n")
    (notes / "metrics.jsonl").write_text('{"text": "a user dataset that happens to be named so"}\n')
    files = resolve([str(docs)])
    names = [f.relative_to(docs).as_posix() for f in files]
    assert names == ["app/config.json", *[f"f{i}.txt" for i in range(5)], "hf/metrics.jsonl", "notes/metrics.jsonl"]
    assert resolve([str(old_run)]) == [old_run / "metrics.jsonl", old_run / "notes.txt"]  # given as the root: read
    # a glob skips them too: whether it matches a run dir, or files below one
    assert resolve([str(docs / "*")]) == files
    assert [f.relative_to(docs).as_posix() for f in resolve([str(docs / "**" / "*.txt")])] == [
        *[f"f{i}.txt" for i in range(5)]]
    assert resolve([str(docs / "runs" / "*" / "*.txt"), str(docs / "f0.txt")]) == [docs / "f0.txt"]
    with pytest.raises(InputError, match="other megacluster run directories"):
        resolve([str(docs / "runs" / "*")])
    (docs / "archive.txt").write_bytes(b"\x1f\x8b\x08\x00 compressed")
    with pytest.raises(InputError, match=r"archive\.txt: binary content \(a NUL byte\), not text"):
        prepare(DataConfig(paths=[str(docs)], val_fraction=0.1, cache_dir=str(tmp_path / "c" / "d")), 300)
    assert not (tmp_path / "c").exists()  # the cache entry (and the directories) made for the refused run: gone
    (docs / "archive.txt").write_text("text saved as UTF-16", encoding="utf-16")
    with pytest.raises(InputError, match=r"archive\.txt: UTF-16 or UTF-32 text \(NUL bytes\); convert it to UTF-8"):
        prepare(DataConfig(paths=[str(docs)], val_fraction=0.1, cache_dir=str(tmp_path / "c")), 300)


def test_a_bin_of_32_bit_ids_is_refused_naming_the_fix(tmp_path):
    """A .bin is raw uint16 (nanoGPT's format). 32-bit ids written raw read as each id followed by a 0: refused,
    where it used to train on that; the same ids as uint16, or as a uint32 .npy, are taken."""
    ids = (np.arange(1000) * 7 % 300).astype(np.uint32)
    ids.tofile(tmp_path / "c32.bin")
    with pytest.raises(InputError, match=r"c32\.bin: every second uint16 is 0.*save 32-bit ids as \.npy"):
        prepare(DataConfig(paths=[str(tmp_path / "c32.bin")], cache_dir=str(tmp_path / "c")), 512)
    ids.astype(np.uint16).tofile(tmp_path / "c16.bin")
    np.save(tmp_path / "c32.npy", ids)
    for name in ("c16.bin", "c32.npy"):
        c = prepare(DataConfig(paths=[str(tmp_path / name)], val_fraction=0.1, cache_dir=str(tmp_path / "c")), 512)
        assert np.array_equal(np.concatenate([c.train, c.val]), ids)
