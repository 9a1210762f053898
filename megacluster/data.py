"""Corpus -> token shards (np.memmap), and the global sample order.

Inputs (`--data`): text files, directories (all files below, sorted; hidden files and directories, such as
`.git`, and `__pycache__` skipped, as are the run's own outputs, other megacluster run directories and the token
cache below a --data directory; symlinked directories followed), globs (a path that exists is taken as it is,
even with `[` in its name; other runs' directories below the pattern's literal part are skipped there too),
`.jsonl` files with a `text` field per line, and pre-tokenized shards (`.npy` arrays of token ids, or `.bin` raw
uint16 as nanoGPT writes them: a .bin is always read as uint16). Text inputs (text and .jsonl, mixed as you like)
or shards, not both in one run. A text file with a NUL byte is refused as binary. Text is read up to
`data.max_bytes` (12 MB by default; 0 = all), and a cut is reported. With no input the corpus is the Python
standard library source of the running interpreter. A literal `<|endoftext|>` inside a document is text, not the
document separator.

Text is tokenized once with a BPE trained on it and cached under a key of (each file's path, size and mtime,
vocab size, options); the token stream's last `val_fraction` is the held-out validation split. Shards are
checked once (token ids < vocab size) and the result kept in a manifest under the same kind of key, so the
workers' own `prepare()` calls after the supervisor's cost a directory listing and a stat per file.

**Sample order is a pure function of (seed, step)**: the training stream is cut into non-overlapping windows
of seq_len+1 tokens; epoch e visits them in the order of a permutation seeded by (seed, e); step k trains on
global positions [k*B, (k+1)*B) of that sequence. Any worker count, any split of the batch over workers
(`rows(step, start, count)`), and any resume point sees exactly the same sequences in the same steps. So that
every worker of a run reads the same corpus even if an input is edited meanwhile, the supervisor's workers do
not prepare again: they open the corpus it prepared (`reference` / `reopen`).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tokenizer as tk
from .config import DataConfig
from .errors import InputError
from .files import atomic_write, is_run_dir, missing_dirs, remove_made, under_launcher

FORMAT_VERSION = 4  # 2: the document that crosses data.max_bytes is cut at the cap (1 kept it whole);
# 3: a literal <|endoftext|> in a document is encoded as text (2 made it the separator); 4: text with a NUL byte
# is refused and meta.json says what data.max_bytes cut (the same tokens; a cache built by 3 skipped the check)
PRETOKENIZED = (".npy", ".bin")
BIN32_MIN = 64  # uint16 values a .bin needs before its zeros say "32-bit ids" (real text: id 0 in every other slot
# of 64 does not happen)
# What the token cache writes in its root, each named by a cache key (`_fingerprint`: KEY_CHARS hex digits)
CORPUS_DIR = "corpus-{}"  # token shards and the tokenizer of one set of text inputs
MANIFEST = "shards-{}.json"  # the largest token id of each pre-tokenized shard
KEY_CHARS = 16
MIN_TEXT_VOCAB = 257  # the byte-level BPE's 256 byte tokens and <|endoftext|> (tokenizer.py)
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def default_corpus() -> list[Path]:
    """The running interpreter's standard library .py files (test suites and vendored packages left out).
    The skipped directories are pruned from the walk, not filtered after it: site-packages alone can hold
    more than the whole stdlib, and every worker lists the corpus again."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(top, n) for n in names if n.endswith(".py"))
    return sorted(files)


def resolve(paths: list[str], exclude: list[tuple[Path, str]] | tuple = ()) -> list[Path]:
    """Expand files, directories and globs into a de-duplicated file list, in the order given (each directory's
    or glob's files sorted); InputError if empty. `exclude`: (directory, regex) pairs; nothing named by the regex
    directly in the directory, or below it, is taken (the run dir's outputs and the token cache's entries: a run
    dir inside a --data directory would otherwise train on its own checkpoints, and a second run would see other
    data than the first). By name, not by what exists: another rank may be writing them meanwhile."""
    if not paths:
        return default_corpus()
    skip = _Skip(exclude)
    out: list[Path] = []
    runs_skipped = False
    for item in paths:
        if not item.strip():  # Path("") is the working directory: never what an empty entry meant
            raise InputError("--data (data.paths): an empty path; give files, directories or globs")
        literal = os.path.exists(item)
        matches = [Path(item)] if literal else [Path(m) for m in sorted(glob.glob(item, recursive=True))]
        if "__pycache__" not in Path(item).parts:  # skipped below a glob as below a directory (glob skips hidden)
            matches = [m for m in matches if "__pycache__" not in m.parts]
        if not literal:
            kept = _outside_run_dirs(item, matches)
            runs_skipped |= len(kept) < len(matches)
            if matches and not kept:
                continue  # all in other runs' directories: said below if nothing else is found
            matches = kept
        for p in matches or [Path(item)]:
            if p.is_dir():
                out.extend(_files_below(p, skip))
            elif p.is_file():
                out.append(p)
            elif os.path.exists(p):  # /dev/null, a FIFO, a socket: nothing to tokenize (a FIFO would block)
                raise InputError(f"--data {p}: is not a regular file or a directory")
            else:
                raise InputError(f"--data: no such file, directory or glob match: {item}")
    seen: set[Path] = set()
    files = []
    for p in out:
        real = p.resolve()
        if real not in seen and not skip(real):
            files.append(p)
        seen.add(real)
    if not files:
        raise InputError(f"--data: no files found under {paths}" + (
            " (a run's own outputs, other megacluster run directories and the token cache are never read as "
            "data)" if out or runs_skipped else ""))
    kinds = {_kind(p) in PRETOKENIZED for p in files}
    if len(kinds) > 1:
        raise InputError("--data: mix of pre-tokenized shards (.npy/.bin) and text; give one kind per run")
    return files


def _outside_run_dirs(pattern: str, matches: list[Path]) -> list[Path]:
    """A glob's matches less those that are, or lie below, another megacluster run's directory under the
    pattern's literal part (`files.is_run_dir`): `--data 'dir/*'` skips them as `--data dir` does. A directory
    named as it is is read as given."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    top = Path(*parts[:fixed]) if fixed else Path(".")
    seen: dict[Path, bool] = {}

    def run_dir(d: Path) -> bool:
        if d not in seen:
            try:
                seen[d] = d.is_dir() and is_run_dir(d, set(os.listdir(d)))
            except OSError:
                seen[d] = False
        return seen[d]

    def below_top(m: Path) -> list[Path]:  # m and its parents under the literal part
        chain = [m, *m.parents]
        return chain[:chain.index(top)] if top in chain else [m]

    return [m for m in matches if not any(run_dir(d) for d in below_top(m))]


def _kind(p: Path) -> str:
    """The input kind a file's suffix names, whatever its case (SHARD.NPY is a shard, not text)."""
    return p.suffix.lower()


class _Skip:
    """`resolve`'s exclusions: called with a resolved path, whether it or a directory above it is an entry of one
    of the directories whose name matches that directory's regex."""

    def __init__(self, rules: list[tuple[Path, str]] | tuple):
        self.rules = [(Path(os.path.realpath(d)), re.compile(pattern)) for d, pattern in rules]

    def __call__(self, path: Path) -> bool:
        return any(p.parent == d and rx.fullmatch(p.name) for p in (path, *path.parents) for d, rx in self.rules)


def _files_below(root: Path, skip: _Skip | None = None) -> list[Path]:
    """The files under a directory, sorted, without hidden ones or any under a hidden directory (`.git` holds
    compressed objects that would be read as text and, sorting first, fill data.max_bytes) or `__pycache__`, or
    under another megacluster run's directory (`files.is_run_dir`; the root itself is read as given).
    A symlinked directory is followed (once: a link back up the tree is not walked again); one that cannot be
    listed is refused, not silently left out."""
    def refuse(e: OSError):
        raise InputError(f"--data {root}: cannot list {e.filename} ({e.strerror})")

    files, seen = [], set()
    for top, dirs, names in os.walk(root, onerror=refuse, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if top != str(root) and is_run_dir(top, {*dirs, *names}):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (skip and skip(Path(os.path.realpath(Path(top, d)))))]
        files.extend(Path(top, n) for n in names if not n.startswith(".") and Path(top, n).is_file())
    return sorted(files)


def _documents(files: list[Path], max_bytes: int, read: dict | None = None):
    """Yield document texts in file order: a text file is one document, a .jsonl line another.

    With a cap (max_bytes > 0) the documents are the first max_bytes bytes (UTF-8) of that sequence: they are
    taken whole while they fit, the one that crosses the cap is cut there (back to a whole character; dropped
    if nothing is left) and nothing after it is read. A text file is read only up to as many characters as
    bytes are left (`_read_text`), a .jsonl file only up to the line that crosses the cap. Under the cap every
    document is whole, as before; format 1 kept the crossing document whole too, which needed reading it whole.
    `read` (if given) gets "files": how many were opened, and "cut": None, or (the file where the cap stopped the
    reading, whether a document of it was cut in part)."""
    read = {} if read is None else read
    read.update(files=0, cut=None)
    left = max_bytes or None  # bytes the cap still allows; None = no cap
    for i, path in enumerate(files):
        read["files"] += 1
        texts = _jsonl_texts(path) if _kind(path) == ".jsonl" else [_text_file(path, left)]
        for text in texts:
            if left is not None:
                data = text.encode("utf-8")
                if len(data) >= left:
                    # a text file is read only up to the cap: its size tells whether there was more
                    partly = len(data) > left or (_kind(path) != ".jsonl" and path.stat().st_size > len(data))
                    if partly or i < len(files) - 1:  # exactly at the cap with nothing after: no cut
                        read["cut"] = (path, partly)
                    if cut := data[:left].decode("utf-8", errors="ignore"):  # "ignore": a char cut in two
                        yield cut
                    return
                left -= len(data)
            yield text


READ_CHUNK_CHARS = 1 << 24  # a capped read goes in chunks: f.read(n) sizes its buffer by n up front, so a
# cap of 1e18 (data.max_bytes meaning "no cap") was a MemoryError on a 6-byte file


def _read_text(path: Path, limit: int | None) -> str:
    """The file as text (undecodable bytes replaced, universal newlines), or its first `limit` characters:
    at least `limit` bytes of UTF-8 unless the file is shorter, so the caller can cut it at the cap."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if limit is None:
                return f.read()
            parts = []
            while limit > 0 and (chunk := f.read(min(limit, READ_CHUNK_CHARS))):
                parts.append(chunk)
                limit -= len(chunk)
            return "".join(parts)
    except OSError as e:
        raise _unreadable(path, e) from None


def _text_file(path: Path, limit: int | None) -> str:
    """A plain text input, refused if it holds a NUL byte (as git tells binary files): a checkpoint, an image or
    a .gz would otherwise be tokenized as text without a word."""
    text = _read_text(path, limit)
    if "\0" in text:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # a UTF-16 or UTF-32 byte-order mark
            raise InputError(f"--data {path}: UTF-16 or UTF-32 text (NUL bytes); convert it to UTF-8")
        raise InputError(f"--data {path}: binary content (a NUL byte), not text; give text files, .jsonl (field "
                         "'text') or token shards (.npy, or .bin of raw uint16 ids)")
    return text


def _unreadable(path: Path, e: OSError) -> InputError:
    return InputError(f"--data {path}: cannot read it ({e.strerror or e})")


def _jsonl_texts(path: Path):
    """Yield the `text` field of each non-empty line, reading the file one line at a time. Undecodable bytes
    are replaced, as in text files, and so is a lone surrogate escape (`"\\ud800"`: valid JSON, not encodable
    as UTF-8, so neither the tokenizer nor the byte cap could take it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(path, n, line)
    except OSError as e:  # opening it, or an I/O error midway
        raise _unreadable(path, e) from None


def _jsonl_text(path: Path, n: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"--data {path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise InputError(f"--data {path}:{n}: each .jsonl line needs a string field 'text'")
    text = obj["text"]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _fingerprint(files: list[Path], extra: dict, *, inode: bool = True) -> str:
    """Cache key from each file's resolved path, inode, size, modification and change time (as make and ccache
    do), not its bytes: every worker and every restarted worker computes it, and hashing a large corpus would
    delay them. The change time catches a rewrite whose mtime was put back (`cp -p`, `rsync -a`, `touch -d`).
    inode=False: path, size and mtime only, what changes when the contents do (a chmod or a backup agent changes
    the inode's ctime, not the tokens: a running job must not refuse its shards for that)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        meta = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if inode else (st.st_size, st.st_mtime_ns)
        h.update("\0".join(map(str, (p.resolve(), *meta))).encode() + b"\n")
    return h.hexdigest()[:KEY_CHARS]


def cache_entries(cfg: DataConfig) -> tuple[Path, str]:
    """What the token cache writes in its root, as (root, regex of the names): token shards and tokenizers,
    shard manifests. Never data; the root itself may hold the inputs (MEGACLUSTER_CACHE=$SCRATCH, data in
    $SCRATCH/corpus)."""
    key = f"[0-9a-f]{{{KEY_CHARS}}}"
    return cache_root(cfg), "|".join(re.escape(name).replace(r"\{\}", key) for name in (CORPUS_DIR, MANIFEST))


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MEGACLUSTER_CACHE") or Path.home() / ".cache" / "megacluster"
    return Path(root).expanduser()


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


class Shards:
    """Several 1-D token arrays (memmapped shards) read as one stream without copying them into one: len(),
    contiguous slices [a:b] (returned as an ndarray) and np.asarray(). The dtype is numpy's promotion of the
    shards' dtypes, as np.concatenate would give."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(a) for a in parts])  # starts[i]: offset of parts[i]; [-1]: length
        self.dtype = np.result_type(*parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"Shards: only contiguous slices, got {type(key).__name__}")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("Shards: only contiguous slices")
        pieces = []
        i = max(int(np.searchsorted(self.starts, start, side="right")) - 1, 0)  # the part holding `start`
        while i < len(self.parts) and self.starts[i] < stop:  # one sample spans one or two parts, not all
            lo = int(self.starts[i])
            pieces.append(self.parts[i][max(start - lo, 0):stop - lo])
            i += 1
        return np.concatenate(pieces, dtype=self.dtype) if pieces else np.zeros(0, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def split(self, cut: int) -> tuple[Shards, Shards]:
        """Tokens [0, cut) and [cut, len) as two Shards of views of each part: nothing is copied."""
        pairs = list(zip(self.parts, self.starts))  # (part, its offset)
        return (Shards([a[:max(cut - lo, 0)] for a, lo in pairs]),
                Shards([a[max(cut - lo, 0):] for a, lo in pairs]))


@dataclass(kw_only=True, slots=True)
class Corpus:
    """Prepared token streams: `train` and `val` are read-only memmaps of token ids (or, for several shards,
    `Shards` over their memmaps)."""

    train: np.ndarray | Shards
    val: np.ndarray | Shards
    vocab_size: int  # tokens actually in the tokenizer (<= the model's vocab)
    directory: Path
    tokenizer_path: Path | None
    shards: list[Path] | None = None  # the input files, for a pre-tokenized corpus
    key: str | None = None  # the shards' path, size and mtime when they were opened (`_fingerprint`)
    stamps: list[tuple[int, int]] | None = None  # each shard's (size, mtime ns) then: what check_unchanged compares
    checked_at: float = 0.0  # time.monotonic() of the last check_unchanged that stat'ed them
    check_cost: float = 0.0  # seconds that stat took

    def check(self, seq_len: int, val_fraction: float) -> None:
        """InputError unless both splits hold one sequence of seq_len + 1 tokens, naming the short one (checked
        once before any worker starts: a worker that failed on it would be restarted again and again)."""
        for name, tokens in (("training", self.train), ("validation", self.val)):
            if len(tokens) <= seq_len:
                raise InputError(f"data: the {name} split has {len(tokens):,} tokens, too few for one sequence of "
                                 f"model.seq_len={seq_len} (+1 target) ({len(self.train) + len(self.val):,} tokens "
                                 f"in all, data.val_fraction={val_fraction}); give more data, a shorter "
                                 "model.seq_len" + (" or a larger data.val_fraction" if name == "validation" else ""))

    def identity(self) -> dict:
        """What a checkpoint records of the data: the tokenizer's hash (text) or the shards' key (path, size and
        mtime of each), and the split sizes."""
        tok = None
        if self.tokenizer_path is not None and self.tokenizer_path.is_file():  # (a cache missing it: unknown)
            tok = hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest()
        return {"tokenizer_sha256": tok, "shards_key": self.key, "train_tokens": len(self.train),
                "val_tokens": len(self.val)}

    def reference(self) -> dict:
        """JSON-able: how another process opens this same corpus without preparing it again (`reopen`)."""
        if self.shards is None:
            return {"text": str(self.directory)}
        return {"shards": [str(p) for p in self.shards], "key": self.key}

    def check_unchanged(self, every_s: float = 1.0) -> None:
        """Shards are the inputs themselves, memmapped: one rewritten during the run would be read as other
        tokens (or, cut shorter, end the process on SIGBUS as it reads past the end). InputError if one changed
        since it was opened; the trainer calls this before each step, and it stats the shards at most once
        per `every_s` seconds, and at most 1% of the time: a stat each is 6 ms for 1,000 shards here, 75 ms for
        15,000, and the step waits for it. A text corpus is the cache's, never rewritten once complete: nothing
        to check."""
        now = time.monotonic()
        if self.shards is None or now - self.checked_at < max(every_s, 100 * self.check_cost):
            return
        try:
            same = _stamps(self.shards) == self.stamps
        except OSError:
            same = False
        if not same:
            raise _shard_changed()
        self.checked_at = time.monotonic()
        self.check_cost = self.checked_at - now


def reopen(ref: dict, cfg: DataConfig, vocab_size: int) -> Corpus:
    """The corpus `reference` describes. A text corpus's cache directory is never changed once complete, so the
    workers read what the supervisor prepared even if an input was edited since; shards are the inputs
    themselves, and one changed since is refused rather than read as another corpus."""
    if "text" in ref:
        return _open_text(Path(ref["text"]))
    return _pretokenized([Path(p) for p in ref["shards"]], cfg, vocab_size, expect_key=ref["key"])


def _shard_changed() -> InputError:
    return InputError("--data: a token shard changed (or went) after the run started; every worker must read the "
                      "same shards, unchanged, to the end of the run")


def _stamps(files: list[Path]) -> list[tuple[int, int]]:
    return [(st.st_size, st.st_mtime_ns) for st in map(os.stat, files)]


def check_inputs(cfg: DataConfig, vocab_size: int, exclude: list[tuple[Path, str]] | tuple = ()) -> list[Path]:
    """The input files (`resolve`, leaving out `exclude` and the token cache's entries), refused when missing
    or, for text, when the vocabulary cannot hold its byte tokens or the cache directory cannot be made. Reads
    no file's content: the CLI runs this before it imports torch."""
    files = resolve(cfg.paths, [*exclude, cache_entries(cfg)])
    if _kind(files[0]) in PRETOKENIZED:
        return files  # (their cache only saves a scan: one that cannot be written costs the scan again)
    if vocab_size < MIN_TEXT_VOCAB:  # else token ids past the embedding table: an IndexError deep in the forward
        raise InputError(f"model.vocab_size: text data needs at least {MIN_TEXT_VOCAB} (the 256 byte tokens and "
                         f"end-of-text), got {vocab_size}")
    _check_can_make(cache_root(cfg))  # text is tokenized into it (made by prepare, not by a check)
    return files


def _check_can_make(directory: Path) -> None:
    """InputError unless `directory` exists or could be made: its nearest existing ancestor is a directory we
    may write in. Creates nothing: a refused run leaves no trace."""
    above = directory
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    why = ("Not a directory" if not os.path.isdir(above) else
           None if directory.is_dir() or os.access(above, os.W_OK | os.X_OK) else "Permission denied")
    if why:
        raise _no_cache_dir(directory, why)


def _make_cache_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _no_cache_dir(directory, e.strerror) from None


def _no_cache_dir(directory: Path, why: str | None) -> InputError:
    return InputError(f"data.cache_dir: cannot create {directory} ({why}); set data.cache_dir or "
                      "$MEGACLUSTER_CACHE to a writable directory")


def prepare(cfg: DataConfig, vocab_size: int, exclude: list[tuple[Path, str]] | tuple = ()) -> Corpus:
    """Tokenize the inputs once (cached, process-safe under a file lock) and memmap the shards.

    The supervisor calls this before starting workers, which open what it prepared (`reopen`); under torchrun
    every rank calls it: a call that finds the cache of unchanged inputs lists the inputs, stats each file and
    memmaps, reading no input's content. `exclude`: the run dir's outputs (`files.run_outputs`). The
    cache key covers each file's path, size and mtime (`_fingerprint`) and the options, so an edited, added or
    removed file makes a new key and a rebuild."""
    files = check_inputs(cfg, vocab_size, exclude)
    if _kind(files[0]) in PRETOKENIZED:
        return _pretokenized(files, cfg, vocab_size)
    key = _fingerprint(files, {"v": FORMAT_VERSION, "vocab": vocab_size, "max_bytes": cfg.max_bytes,
                               "val": cfg.val_fraction})
    directory = cache_root(cfg) / CORPUS_DIR.format(key)
    made = missing_dirs(directory)
    while True:
        _make_cache_dir(directory)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process tokenizes; the others wait, then reuse
            if not _holds(lock, directory / ".lock"):
                continue  # the builder removed the entry, its lock too (`_unmake`), while this one waited
            try:
                if not _complete(directory):
                    _build(files, cfg, vocab_size, directory)
            except (InputError, KeyboardInterrupt):  # refused, or stopped by a signal midway (train/signals.py)
                _unmake(made)  # with the lock held: a waiter then finds its lock file gone, and starts again
                raise
            break
    return _open_text(directory)


def _holds(lock, path: Path) -> bool:
    """Whether the locked file is still the one at `path`: a process that waited on an entry's lock while the
    builder removed the entry would otherwise build into a directory that is gone (a review: a run stopped while
    it tokenized made the run waiting on it fail), or beside a third process that locked a new file."""
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


def _unmake(made: list[Path]) -> None:
    """Input refused while tokenizing (NUL bytes, no text), or a stop midway: the cache entry and the directories
    above it that this call made are removed again, as a refused run leaves no directory made for it. Not under a
    launcher: another rank waits on the entry's lock there, and builds the entry again only to be refused too."""
    if under_launcher() or not made:
        return
    shutil.rmtree(made[0], ignore_errors=True)  # the entry: its lock, and what a build wrote before it was refused
    remove_made(made[1:])


def _complete(directory: Path) -> bool:
    """Whether a cache entry holds all it should: meta.json (written last) and the files of the sizes it lists.
    A file deleted since (a tmp cleaner, a user) makes the entry rebuilt, not a crash on every later run."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        size = np.dtype(meta["dtype"]).itemsize
        return ((directory / "train.bin").stat().st_size == meta["train_tokens"] * size
                and (directory / "val.bin").stat().st_size == meta["val_tokens"] * size
                and (directory / "tokenizer.json").is_file())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _open_text(directory: Path) -> Corpus:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        return Corpus(train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
                      val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"),
                      vocab_size=meta["vocab_size"], directory=directory,
                      tokenizer_path=directory / "tokenizer.json")
    except (OSError, ValueError, KeyError, TypeError) as e:  # a worker opening its supervisor's cache: deleted?
        raise InputError(f"data.cache_dir: the tokenized corpus in {directory} cannot be opened ({e}); was the "
                         "cache deleted while the run was starting?") from None


def _build(files: list[Path], cfg: DataConfig, vocab_size: int, directory: Path) -> None:
    read: dict = {}
    docs = list(_documents(files, cfg.max_bytes, read))
    cap = f" within data.max_bytes={cfg.max_bytes}" if cfg.max_bytes else ""
    cut = read["cut"] is not None
    if cut:  # said once, when the cache is built; meta.json keeps it
        where, partly = read["cut"]
        print(f"data: text cut at data.max_bytes={cfg.max_bytes:,} bytes: {read['files']} of {len(files)} file(s) "
              f"read, the last ({where}) {'in part' if partly else 'whole'}; --set data.max_bytes=0 reads "
              "everything", file=sys.stderr)
    if not any(docs):
        raise InputError(f"--data: no text in {len(files)} file(s){cap} (every file or .jsonl line is empty)")
    tok = tk.train(docs, vocab_size)  # "<|endoftext|>" written in a document is text; the separator is added here
    eot = tk.eot_id(tok)
    dtype = _token_dtype(vocab_size)
    ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in tok.encode_batch(docs)]
    stream = np.concatenate(ids)
    n_val = _n_val(len(stream), cfg.val_fraction)
    if len(stream) <= n_val:  # nothing left to train on (a corpus of a few bytes); nothing written
        raise InputError(f"--data: {len(stream)} tokens in all{cap if cut else ''}, too few for a training and a "
                         "validation split")
    atomic_write(directory / "train.bin", stream[:-n_val].tobytes())
    atomic_write(directory / "val.bin", stream[-n_val:].tobytes())
    tk.save(tok, directory / "tokenizer.json")
    meta = {"format": FORMAT_VERSION, "files": len(files), "documents": len(docs), "tokens": int(len(stream)),
            "train_tokens": int(len(stream) - n_val), "val_tokens": n_val,
            "vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name,
            "files_read": read["files"], "cut_at_max_bytes": cfg.max_bytes if cut else None}
    atomic_write(directory / "meta.json", json.dumps(meta, indent=1).encode())  # written last: marks complete


def _n_val(tokens: int, val_fraction: float) -> int:
    return max(int(tokens * val_fraction), 2)


def _open_shard(p: Path) -> np.ndarray:
    """A shard memmapped; InputError naming it if it cannot be (empty, a .bin of odd size, not a .npy array)."""
    try:
        if _kind(p) == ".bin":
            size = p.stat().st_size
            if size % 2:
                raise ValueError(f"its size, {size} bytes, is not a multiple of 2 (raw uint16 token ids)")
            if size == 0:
                raise ValueError("empty file")
            return np.memmap(p, dtype=np.uint16, mode="r")
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"--data {p}: not a usable token shard ({e})") from None


def _pretokenized(files: list[Path], cfg: DataConfig, vocab_size: int, expect_key: str | None = None) -> Corpus:
    """The shards as a Corpus; with `expect_key` (a worker reopening its run's corpus), refused unless they are
    still the ones of that key."""
    try:  # taken before reading them: a change from here on is caught
        key, stamps = _fingerprint(files, {}, inode=False), _stamps(files)
    except OSError:  # one went
        key = stamps = None
    if expect_key is not None and key != expect_key:
        raise _shard_changed()
    arrays = [_open_shard(p) for p in files]
    for p, a in zip(files, arrays):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"--data {p}: a pre-tokenized shard must be a 1-D integer array, got {a.dtype}{a.shape}")
    for p, top in zip(files, _max_ids(files, arrays, cfg)):
        if top >= vocab_size:
            raise InputError(f"--data {p}: token id {top} >= model.vocab_size {vocab_size}")
    total = sum(len(a) for a in arrays)
    cut = total - _n_val(total, cfg.val_fraction)  # as stream[:-n_val], stream[-n_val:]
    if len(arrays) == 1:
        train, val = arrays[0][:cut], arrays[0][cut:]
    else:  # split shard by shard at the cut: views of the memmaps, nothing copied
        train, val = Shards(arrays).split(cut)
    return Corpus(train=train, val=val, vocab_size=vocab_size, directory=files[0].parent, tokenizer_path=None,
                  shards=list(files), key=key, stamps=stamps, checked_at=time.monotonic())


def _max_ids(files: list[Path], arrays: list[np.ndarray], cfg: DataConfig) -> list[int]:
    """The largest token id of each shard (-1 if empty). Finding it reads every shard whole, so it is done
    once and kept in a manifest keyed like the text cache (path, size and mtime of each shard); a changed
    shard gives another key and a new scan. Workers that scan at the same time write the same manifest
    atomically; a cache directory that cannot be written only costs the scan again."""
    manifest = cache_root(cfg) / MANIFEST.format(_fingerprint(files, {"v": FORMAT_VERSION}))
    try:
        top = json.loads(manifest.read_text())["max_ids"]
        if isinstance(top, list) and len(top) == len(files):
            return top
    except (OSError, ValueError, KeyError, TypeError):
        pass
    top = _scan_max_ids(files, arrays)
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(manifest, json.dumps({"files": [str(p.resolve()) for p in files], "max_ids": top}).encode())
    except OSError:
        pass
    return top


def _scan_max_ids(files: list[Path], arrays: list[np.ndarray]) -> list[int]:
    """Each shard's largest id; a negative id (signed shards only) is refused here, not later in the embedding.
    So is a .bin whose every second uint16 is 0 (at least BIN32_MIN of them): 32-bit ids written raw, which read as
    uint16 would be every id followed by a 0 (little-endian)."""
    for p, a in zip(files, arrays):
        if len(a) and np.issubdtype(a.dtype, np.signedinteger) and int(a.min()) < 0:
            raise InputError(f"--data {p}: token id {int(a.min())} < 0")
        if _kind(p) == ".bin" and len(a) >= BIN32_MIN and not a[1::2].any():
            raise InputError(f"--data {p}: every second uint16 is 0, as in 32-bit token ids written raw; a .bin is "
                             "read as raw uint16 (nanoGPT's format): save 32-bit ids as .npy instead")
    return [int(a.max()) if len(a) else -1 for a in arrays]


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
