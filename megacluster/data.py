"""Corpus -> token shards (np.memmap), and the global sample order.

Inputs (`--data`, any mix): text files, directories (all files below, sorted), globs, `.jsonl` files with a
`text` field per line, and pre-tokenized shards (`.npy` arrays of token ids, or `.bin` raw uint16 as nanoGPT
writes them). With no input the corpus is the Python standard library source of the running interpreter.

Text is tokenized once with a BPE trained on it and cached under a key of (content, vocab size, options);
the token stream's last `val_fraction` is the held-out validation split.

**Sample order is a pure function of (seed, step)**: the training stream is cut into non-overlapping windows
of seq_len+1 tokens; epoch e visits them in the order of a permutation seeded by (seed, e); step k trains on
global positions [k*B, (k+1)*B) of that sequence. Any worker count, any split of the batch over workers
(`rows(step, start, count)`), and any resume point sees exactly the same sequences in the same steps.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tokenizer as tk
from .config import DataConfig
from .errors import InputError
from .files import atomic_write

FORMAT_VERSION = 1
PRETOKENIZED = (".npy", ".bin")
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def default_corpus() -> list[Path]:
    """The running interpreter's standard library .py files (test suites and vendored packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def resolve(paths: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated file list; InputError if empty."""
    if not paths:
        return default_corpus()
    out: list[Path] = []
    for item in paths:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for p in matches:
            if p.is_dir():
                out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
            elif p.is_file():
                out.append(p)
            else:
                raise InputError(f"--data: no such file, directory or glob match: {item}")
    seen: set[Path] = set()
    files = [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]
    if not files:
        raise InputError(f"--data: no files found under {paths}")
    kinds = {p.suffix in PRETOKENIZED for p in files}
    if len(kinds) > 1:
        raise InputError("--data: mix of pre-tokenized shards (.npy/.bin) and text; give one kind per run")
    return files


def _documents(files: list[Path], max_bytes: int):
    """Yield document texts in file order, stopping once max_bytes (0 = no cap) of text were read."""
    total = 0
    for path in files:
        if path.suffix == ".jsonl":
            texts = _jsonl_texts(path)
        else:
            texts = [path.read_text(encoding="utf-8", errors="replace")]
        for text in texts:
            if max_bytes and total >= max_bytes:
                return
            yield text
            total += len(text.encode("utf-8"))


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--data {path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"--data {path}:{n}: each .jsonl line needs a string field 'text'")
        texts.append(obj["text"])
    return texts


def _fingerprint(files: list[Path], extra: dict) -> str:
    """Cache key from each file's resolved path, size and modification time (as make and ccache do), not its
    bytes: every worker and every restarted worker computes it, and hashing a large corpus would delay them."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MEGACLUSTER_CACHE") or Path.home() / ".cache" / "megacluster"
    return Path(root).expanduser()


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass(kw_only=True, slots=True)
class Corpus:
    """Prepared token streams: `train` and `val` are read-only memmaps of token ids."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int  # tokens actually in the tokenizer (<= the model's vocab)
    directory: Path
    tokenizer_path: Path | None


def prepare(cfg: DataConfig, vocab_size: int) -> Corpus:
    """Tokenize the inputs once (cached, process-safe under a file lock) and memmap the shards."""
    files = resolve(cfg.paths)
    if files[0].suffix in PRETOKENIZED:
        return _pretokenized(files, cfg, vocab_size)
    key = _fingerprint(files, {"v": FORMAT_VERSION, "vocab": vocab_size, "max_bytes": cfg.max_bytes,
                               "val": cfg.val_fraction})
    directory = cache_root(cfg) / f"corpus-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process tokenizes; the others wait, then reuse
        if not (directory / "meta.json").exists():
            _build(files, cfg, vocab_size, directory)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return Corpus(train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
                  val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"),
                  vocab_size=meta["vocab_size"], directory=directory,
                  tokenizer_path=directory / "tokenizer.json")


def _build(files: list[Path], cfg: DataConfig, vocab_size: int, directory: Path) -> None:
    docs = list(_documents(files, cfg.max_bytes))
    tok = tk.train(docs, vocab_size)
    eot = tk.eot_id(tok)
    dtype = _token_dtype(vocab_size)
    ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in tok.encode_batch(docs)]
    stream = np.concatenate(ids)
    n_val = max(int(len(stream) * cfg.val_fraction), 2)
    atomic_write(directory / "train.bin", stream[:-n_val].tobytes())
    atomic_write(directory / "val.bin", stream[-n_val:].tobytes())
    tk.save(tok, directory / "tokenizer.json")
    meta = {"format": FORMAT_VERSION, "files": len(files), "documents": len(docs), "tokens": int(len(stream)),
            "train_tokens": int(len(stream) - n_val), "val_tokens": n_val,
            "vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name}
    atomic_write(directory / "meta.json", json.dumps(meta, indent=1).encode())  # written last: marks complete


def _pretokenized(files: list[Path], cfg: DataConfig, vocab_size: int) -> Corpus:
    arrays = [np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=np.uint16, mode="r")
              for p in files]
    for p, a in zip(files, arrays):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"--data {p}: a pre-tokenized shard must be a 1-D integer array, got {a.dtype}{a.shape}")
        if len(a) and int(a.max()) >= vocab_size:
            raise InputError(f"--data {p}: token id {int(a.max())} >= model.vocab_size {vocab_size}")
    stream = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    n_val = max(int(len(stream) * cfg.val_fraction), 2)
    return Corpus(train=stream[:-n_val], val=stream[-n_val:], vocab_size=vocab_size,
                  directory=files[0].parent, tokenizer_path=None)


class SampleOrder:
    """Global sample order: position p of step k is window perm_e((k*B + p) mod n), e = (k*B + p) // n."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True):
        self.tokens, self.seq_len, self.batch_size, self.seed, self.shuffle = tokens, seq_len, batch_size, seed, shuffle
        self.n = (len(tokens) - 1) // seq_len  # windows of seq_len inputs + 1 shifted target
        if self.n < 1:
            raise InputError(f"data: {len(tokens)} tokens are too few for one sequence of model.seq_len={seq_len}")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def windows(self, step: int, start: int, count: int) -> np.ndarray:
        """Window ids for positions [start, start+count) of step `step`'s global batch."""
        g = step * self.batch_size + np.arange(start, start + count)
        return np.array([self._perm(int(e))[i] for e, i in zip(g // self.n, g % self.n)], dtype=np.int64)

    def rows(self, step: int, start: int, count: int) -> np.ndarray:
        """Token rows (count, seq_len+1) as int64: inputs are [:, :-1], targets [:, 1:]."""
        offs = self.windows(step, start, count) * self.seq_len
        return np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in offs]) \
            if count else np.zeros((0, self.seq_len + 1), dtype=np.int64)
