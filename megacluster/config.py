"""Typed training configuration: dataclasses, named presets, TOML files and `--set section.key=value` overrides.

A config is built in this order, each layer overriding the previous one:
    preset (default "tiny")  ->  TOML file (--config)  ->  --set overrides  ->  dedicated CLI flags
Every key is checked: an unknown section/key or a value of the wrong type or outside its allowed set raises
`InputError` naming the key and what is allowed (the CLI turns it into exit code 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .files import read_config


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 2048  # tokenizer vocab is trained to this size; rows beyond it are never used
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 = same as n_head (plain multi-head attention); fewer = grouped-query attention
    d_model: int = 128
    ffn_hidden: int = 0  # 0 = SwiGLU default: 8/3 * d_model rounded up to a multiple of 128
    seq_len: int = 128  # tokens per training sequence
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass(kw_only=True, slots=True)
class DataConfig:
    paths: list[str] = field(default_factory=list)  # files, dirs, globs, .jsonl, .bin/.npy shards; [] = stdlib
    max_bytes: int = 12_000_000  # cap on UTF-8 text read, files in the order given (a directory's or glob's sorted),
    # the document that crosses it cut; 0 = no cap
    val_fraction: float = 0.02  # last fraction of the token stream held out for validation
    cache_dir: str = ""  # "" = $MEGACLUSTER_CACHE or ~/.cache/megacluster


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd only: last fraction of steps spent decaying (rounded; not before warm-up ends)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    master_weights: str = "auto"  # on: weights kept in run.dtype, an fp32 master copy in the optimizer (optim.py);
    # auto: on for compiled CUDA runs (measured faster there, benchmarks/RESULTS.md), off otherwise
    update_kernel: str = "auto"  # with master weights on CUDA with Triton and one worker, where the step's gradients
    # are all in p.grad (one micro-batch; with fp32 weights any number) and every parameter's size is a multiple of 8:
    # auto reads each where autograd left it, for the clip's norm and the update (two Triton kernels); off gathers
    # them into one flat buffer first


@dataclass(kw_only=True, slots=True)
class RunConfig:
    seed: int = 1337
    batch_size: int = 16  # global batch, sequences per optimizer step (fixed whatever the number of workers)
    micro_batch: int = 16  # max sequences per forward/backward on one worker (gradient accumulation beyond)
    max_steps: int = 300
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    compile: str = "auto"  # auto (on for cuda) | on | off
    fused_loss: str = "auto"  # on: the training loss writes its logits gradient in the forward (model.HeadLoss);
    # auto: on for compiled CUDA runs (measured faster there), off otherwise
    swiglu_kernel: str = "auto"  # auto: the SwiGLU backward as one Triton kernel wherever it can run (CUDA with
    # Triton; megacluster/kernels.py); off: autograd's own (Inductor's kernel when compiled)
    rope_kernel: str = "auto"  # auto: RoPE's backward and the q/k/v gradient assembly as one Triton kernel where
    # it can run (CUDA with Triton; model.SplitRope); off: autograd's own (Inductor's two kernels when compiled)
    loss_kernel: str = "off"  # auto: the fused loss's softmax and logits gradient as one Triton kernel where it
    # can run (CUDA with Triton, run.fused_loss on; kernels.softmax_xent); off: Inductor's reduction. Off until
    # timed on a GPU (written without one: benchmarks/RESULTS.md)
    workers: int = 1  # local worker processes (ignored under torchrun, which sets the world)
    run_dir: str = "runs/latest"
    resume: bool = False
    log_every: int = 10  # steps between metrics.jsonl lines / progress updates (every step's loss is kept)
    eval_every: int = 100  # steps between validation-loss evaluations; 0 = only at the end
    eval_batches: int = 8  # global validation batches per evaluation (at most the whole batches the split holds)
    ckpt_every: int = 100  # steps between checkpoints; 0 = only at the end
    ckpt_keep: int = 3
    balance: str = "equal"  # equal | auto (shares proportional to measured compute throughput)
    chaos: str = ""  # fault-injection spec, see megacluster/train/chaos.py
    worker_start: str = "auto"  # supervised runs: fork (from a process that has imported torch once: a worker or
    # its replacement starts in milliseconds, not seconds; train/zygote.py) | exec (a fresh Python each) | auto (fork
    # on CPU; exec on GPU, where fork after importing CUDA's libraries is not measured yet)
    hang_timeout: float = 30.0  # supervised runs (workers > 1 or run.chaos): seconds without a finished step before a
    # worker counts as hung and is replaced (its first step 5x, for compiling); under torchrun the process group's
    # timeout (at least 60 s); one worker without run.chaos is not watched (docs/train.md)
    progress: bool = True  # rich progress bar on stderr


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.master_weights": ("auto", "on", "off"),
    "optim.update_kernel": ("auto", "off"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.dtype": ("auto", "bf16", "fp32"),
    "run.compile": ("auto", "on", "off"),
    "run.fused_loss": ("auto", "on", "off"),
    "run.swiglu_kernel": ("auto", "off"),
    "run.rope_kernel": ("auto", "off"),
    "run.loss_kernel": ("auto", "off"),
    "run.balance": ("equal", "auto"),
    "run.worker_start": ("auto", "fork", "exec"),
}
POSITIVE = {"model.vocab_size", "model.n_layer", "model.n_head", "model.d_model", "model.seq_len",
            "run.batch_size", "run.micro_batch", "run.workers", "run.log_every", "run.ckpt_keep",
            "run.eval_batches", "optim.lr", "model.rope_theta", "model.norm_eps", "run.hang_timeout", "optim.eps",
            "run.max_steps"}
NON_NEGATIVE = {"model.n_kv_head", "model.ffn_hidden", "run.eval_every", "run.ckpt_every",
                "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "data.max_bytes",
                "model.init_std", "run.seed"}
UNIT_INTERVAL = {"optim.decay_fraction", "optim.beta1", "optim.beta2", "optim.min_lr_ratio"}  # [0, 1)
OPEN_UNIT_INTERVAL = {"data.val_fraction"}  # (0, 1)
# each key is in at most one of POSITIVE, NON_NEGATIVE, UNIT_INTERVAL, OPEN_UNIT_INTERVAL (tests/test_config.py)
MAXIMUM = {  # beyond these a value is a typo that would fail deep inside, not a run
    "model.vocab_size": 2 ** 24,  # real vocabularies are <= ~256k; the BPE trainer aborts the process near 1e11
    "run.batch_size": 2 ** 24,  # sequences per step
    "run.hang_timeout": 1e6,  # seconds (~11.6 days); 5x it is a process-group timeout (a C int of seconds)
    # weights drawn at std 1e30 diverged at step 2 (the message blamed lr and warm-up); at 1 a 768-wide layer's
    # outputs are already ~28x its inputs, so no working initialisation is above it
    "model.init_std": 1.0,
    # an epsilon of 1e30 swamps every mean square: each norm outputs ~0 and the model trained at exactly ln V for
    # ever; real models use 1e-6 to 1e-5
    "model.norm_eps": 1.0,
}
FLOAT32_MAX = 3.4028234663852886e38


def _gpt2(d: int, layers: int, heads: int, batch: int) -> dict:
    # nanoGPT's GPT-2 shapes (vocab padded 50257 -> 50304 for tensor-core friendly matmuls), seq 1024
    return {"model": {"d_model": d, "n_layer": layers, "n_head": heads, "vocab_size": 50304, "seq_len": 1024},
            "optim": {"lr": 6e-4, "warmup_steps": 200},
            "run": {"batch_size": batch, "micro_batch": batch, "max_steps": 5000, "log_every": 10,
                    "eval_every": 500, "ckpt_every": 1000}}


PRESETS: dict[str, dict] = {
    # trains on 2 CPU cores and visibly learns within ~1 minute (~1.1M parameters)
    "tiny": {},
    "gpt2-124m": _gpt2(768, 12, 12, 32),
    "gpt2-350m": _gpt2(1024, 24, 16, 16),
    "gpt2-774m": _gpt2(1280, 36, 20, 12),
    "gpt2-1.5b": _gpt2(1600, 48, 25, 8),
    # Llama-3.2-1B shapes: d 2048, 16 layers, 32 heads, 8 KV heads, SwiGLU 8192, untied head (our vocab is BPE-trained)
    "llama-1b": {"model": {"d_model": 2048, "n_layer": 16, "n_head": 32, "n_kv_head": 8, "ffn_hidden": 8192,
                           "vocab_size": 32000, "seq_len": 2048, "tie_embeddings": False, "rope_theta": 500000.0},
                 "optim": {"lr": 3e-4, "warmup_steps": 200},
                 "run": {"batch_size": 16, "micro_batch": 4, "max_steps": 5000, "eval_every": 500,
                         "ckpt_every": 1000}},
}


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _toml_list(text: str) -> list | None:
    """`text` as a TOML array (['a', 'b']), or None if it is not one."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None
    return value if isinstance(value, list) else None


def _coerce(key: str, tp, value):
    """Check/convert `value` to the field type `tp`; raise InputError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):  # TOML's list, as a --config file writes it, or comma-separated (a path
            parsed = _toml_list(value)  # may start with "[": [draft].txt); [] is the empty list, not a path "[]"
            if parsed is None and not value.strip():  # an empty shell variable, most likely: not the default
                raise InputError(f"{key}: empty; give values separated by commas, or [] for none")
            value = parsed if parsed is not None else [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{key}: expected a list of strings, got {value!r}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise InputError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError(f"{key}: expected an integer, got {value!r}")
        try:
            n = int(str(value).replace("_", ""))
        except ValueError:
            raise InputError(f"{key}: expected an integer, got {value!r}") from None
        if not -2 ** 63 <= n < 2 ** 63:  # 64 bits (torch.manual_seed, numpy); past float range lr_at overflowed
            raise InputError(f"{key}: {value!r} is out of range (a 64-bit integer)")
        return n
    if tp is float:
        if isinstance(value, bool):
            raise InputError(f"{key}: expected a number, got {value!r}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(x):
            raise InputError(f"{key}: expected a finite number, got {value!r}")
        if abs(x) > FLOAT32_MAX:  # the values go into fp32 tensors (learning rates, eps, ...)
            raise InputError(f"{key}: {value!r} is out of range (at most {FLOAT32_MAX:.4g} in magnitude)")
        return x
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {tp} for {key}")  # a config field of a new type: extend _coerce


def _field_types(section) -> dict[str, object]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def set_value(cfg: Config, key: str, value) -> None:
    """Set `section.key` on cfg from a TOML value or a string, validating name and type."""
    sections = _sections(cfg)
    sec_name, _, name = key.partition(".")
    if sec_name not in sections or not name:
        raise InputError(f"unknown config key {key!r}; keys are section.name with section one of {sorted(sections)}")
    section = sections[sec_name]
    types_ = _field_types(section)
    if name not in types_:
        raise InputError(f"unknown config key {key!r}; {sec_name} keys: {', '.join(sorted(types_))}")
    setattr(section, name, _coerce(key, types_[name], value))


def apply_dict(cfg: Config, data: dict, origin: str) -> None:
    for sec_name, values in data.items():
        if not isinstance(values, dict):
            raise InputError(f"{origin}: top-level key {sec_name!r} must be a [section] table; "
                             f"sections: {sorted(_sections(cfg))}")
        for name, value in values.items():
            set_value(cfg, f"{sec_name}.{name}", value)


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"--set {item!r}: expected section.key=value")
        set_value(cfg, key.strip(), value.strip())


def load_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(read_config(path).decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"--config {path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # a directory, a FIFO, a device, a huge file (files.read_config)
        raise InputError(f"--config {path}: {e}; give a TOML file") from None
    except OSError as e:  # no permission
        raise InputError(f"--config {path}: cannot read it ({e.strerror})") from None


def build(preset: str = "tiny", config_file: str | None = None, overrides: list[str] | None = None, *,
          check: bool = True) -> Config:
    """Preset -> TOML file -> --set overrides, validated (check=False: the caller validates once it has applied
    its own flags, e.g. --max-steps, which checks such as a chaos fault's step depend on). The usual way to get
    a Config."""
    if preset not in PRESETS:
        raise InputError(f"--preset: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = Config()
    apply_dict(cfg, PRESETS[preset], f"preset {preset}")
    if config_file:
        apply_dict(cfg, load_toml(config_file), f"--config {config_file}")
    apply_overrides(cfg, overrides or [])
    if check:
        validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the config.json a run writes)."""
    cfg = Config()
    apply_dict(cfg, data, "config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and consistency checks; each error names the key and what is allowed."""
    for sec_name, section in _sections(cfg).items():
        for name in _field_types(section):
            key, value = f"{sec_name}.{name}", getattr(section, name)
            if key in CHOICES and value not in CHOICES[key]:
                raise InputError(f"{key}: {value!r} is not allowed; choose one of {', '.join(CHOICES[key])}")
            if key in POSITIVE and not value > 0:
                raise InputError(f"{key}: must be > 0, got {value!r}")
            if key in NON_NEGATIVE and not value >= 0:
                raise InputError(f"{key}: must be >= 0, got {value!r}")
            if key in UNIT_INTERVAL and not 0 <= value < 1:
                raise InputError(f"{key}: must be in [0, 1), got {value!r}")
            if key in OPEN_UNIT_INTERVAL and not 0 < value < 1:
                raise InputError(f"{key}: must be in (0, 1), got {value!r}")
            if key in MAXIMUM and not value <= MAXIMUM[key]:
                raise InputError(f"{key}: must be <= {MAXIMUM[key]:,}, got {value!r}")
    m = cfg.model
    if m.d_model % m.n_head:
        raise InputError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if (m.d_model // m.n_head) % 2:
        raise InputError(f"model.d_model / model.n_head must be even for RoPE, got {m.d_model // m.n_head}")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise InputError(f"model.n_kv_head ({kv}) must divide model.n_head ({m.n_head})")
    if cfg.run.chaos:
        from .train.chaos import ONE_SHOT, parse  # the spec's grammar (no torch); ranks are checked at launch

        faults = parse(cfg.run.chaos)
        if not faults:  # blank or only ";": no fault, so no chaos (not a supervised run for nothing)
            cfg.run.chaos = ""
        for f in faults:  # a fault that could never fire is refused, as one for a missing rank
            if f.step is not None and (f.step > cfg.run.max_steps or (f.step == 0 and f.kind in ONE_SHOT)):
                raise InputError(f"--chaos (run.chaos): fault {f.id!r} is at step {f.step}, which the run never "
                                 f"completes: steps are 1 to run.max_steps={cfg.run.max_steps}")
    if not cfg.run.hang_timeout >= 1:
        raise InputError("run.hang_timeout: must be >= 1 (seconds without a finished step), "
                         f"got {cfg.run.hang_timeout}")
    if not cfg.run.run_dir.strip():
        raise InputError("run.run_dir (--run-dir): must name a directory, got an empty string")
    if cfg.run.micro_batch > cfg.run.batch_size:
        cfg.run.micro_batch = cfg.run.batch_size  # a micro-batch never exceeds the global batch
    # "~" as the shell would expand it (it does not in --set values or TOML strings); data.cache_dir is expanded
    # where it is used, as MEGACLUSTER_CACHE is
    cfg.run.run_dir = os.path.expanduser(cfg.run.run_dir)
    cfg.data.paths = [os.path.expanduser(p) for p in cfg.data.paths]


def layer_matmul_params(m: ModelConfig) -> int:
    """Matmul weights of one layer of model.GPT: the fused q/k/v projection d*(nh + 2*nkv)*hs, the output
    projection (nh*hs)*d and SwiGLU's gate/up/down 3*d*f (used by the FLOP count and the parameter count)."""
    hs = m.d_model // m.n_head
    kv = m.n_kv_head or m.n_head
    return m.d_model * (m.n_head + 2 * kv) * hs + m.n_head * hs * m.d_model + 3 * m.d_model * ffn_hidden(m)


def n_params(m: ModelConfig) -> int:
    """Parameters of model.GPT for `m` (computed, nothing built): embedding (and an untied head), per layer the
    matmul weights and two RMSNorm gains, and the final norm."""
    layer = layer_matmul_params(m) + 2 * m.d_model
    return m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.n_layer * layer + m.d_model


def ffn_hidden(m: ModelConfig) -> int:
    """The SwiGLU hidden width: explicit, or 8/3 * d rounded up to a multiple of 128 (same FLOPs as a 4d GELU MLP)."""
    if m.ffn_hidden:
        return m.ffn_hidden
    return -(-(8 * m.d_model // 3) // 128) * 128

