"""Scenario schema: TOML / JSON / dict -> validated, typed dataclasses.

Every bad key or value raises `ScenarioError` naming the key (``section.key``) and what is allowed; the CLI
turns it into exit code 2. Keys are a contract (issue 4): new keys are additive, names never change.
A key that is left out and has no default is *chosen by the planner* (e.g. ``parallel.vpp``,
``train.micro_batch``): it stays ``None`` here and `search.py` fills it in.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import read_config
from ..hardware import GPUS

RAIL_SWITCH_NODES = 32  # nodes under one rail (leaf) switch: a DGX SuperPOD scalable unit (FleetSpec)


class ScenarioError(InputError):
    """A scenario key or value is invalid; the message names the key and what is allowed."""


# --------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str  # "int" | "float" | "bool" | "str" | "choice" | "dict"
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] = ()
    auto: bool = False  # the string "auto" is accepted and maps to None, as if the key were left out

    def allowed(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices + (("auto",) if self.auto else ()))
        if self.kind in ("int", "float"):
            rng = f"{'an integer' if self.kind == 'int' else 'a finite number'}"
            shown = (lambda v: f"{v:,}") if self.kind == "int" else (lambda v: f"{v:g}")
            if self.lo is not None:
                rng += f" >= {shown(self.lo)}"
            if self.hi is not None:
                rng += f" and <= {shown(self.hi)}"
        else:
            rng = {"bool": "true or false", "str": "a string",
                   "dict": "a table of name = finite number >= 0, their sum > 0"}[self.kind]
            if self.kind == "dict" and self.choices:
                rng += "; names: " + ", ".join(self.choices)
        return rng + (' or "auto"' if self.auto else "")


def _int(lo=None, hi=None, auto=False):
    return _Rule("int", lo, hi, auto=auto)


def _num(lo=None, hi=None, auto=False):
    return _Rule("float", lo, hi, auto=auto)


def _choice(*c, auto=False):
    return _Rule("choice", choices=c, auto=auto)


def _check(section: str, key: str, value: Any, rule: _Rule) -> Any:
    name = f"{section}.{key}"
    if rule.auto and value == "auto":  # the one place "auto" is read: from here on it is None
        return None
    bad = ScenarioError(f"{name} = {_shown(value)} is invalid: must be {rule.allowed()}")
    if rule.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if rule.kind == "choice":
        if value not in rule.choices:
            raise bad
        return value
    if rule.kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
        return value
    if rule.kind == "dict":
        if not isinstance(value, dict) or not value or any(
                not isinstance(v, (int, float)) or isinstance(v, bool) for v in value.values()):
            raise bad
        weights = {str(k): _finite(v, bad) for k, v in value.items()}
        if any(w < 0 for w in weights.values()) or not 0 < sum(weights.values()) < math.inf:
            raise bad
        unknown = sorted(set(weights) - set(rule.choices)) if rule.choices else []
        if unknown:  # a misspelt cause ("faulty_gpus") lost its GPU-board scaling and its spare-node wait unsaid
            raise ScenarioError(f"{name}: {unknown[0]!r} is not a known cause; names: " + ", ".join(rule.choices))
        return weights
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if rule.kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise bad
        value = int(value)
    else:
        value = _finite(value, bad)
    if (rule.lo is not None and value < rule.lo) or (rule.hi is not None and value > rule.hi):
        raise bad
    return value


def _finite(value: int | float, bad: ScenarioError) -> float:
    """A number as a finite float, or `bad`: TOML and JSON spell nan and inf (nan passes every comparison), and
    both allow integers too long for a float."""
    try:
        value = float(value)
    except OverflowError:
        raise bad from None
    if not math.isfinite(value):
        raise bad
    return value


def _shown(value: Any) -> str:
    """A value for a message, cut short: a scenario may hold a 400-digit integer."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4,300-digit limit on str()
        return "(a value holding an integer of over 4,300 digits)"
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _build(cls, section: str, raw: Any, rules: dict[str, _Rule]):
    """Instantiate dataclass `cls` from the dict `raw`, checking every key against `rules`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"[{section}] must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(rules))
    if unknown:
        raise ScenarioError(f"{section}.{unknown[0]} is not a known key; allowed: {', '.join(rules)}")
    kwargs = {k: _check(section, k, v, rules[k]) for k, v in raw.items()}
    missing = [f.name for f in fields(cls) if f.name in rules and f.name not in kwargs and _required(f)]
    if missing:
        raise ScenarioError(f"{section}.{missing[0]} is required: must be {rules[missing[0]].allowed()}")
    return cls(**kwargs)


def _required(f) -> bool:
    from dataclasses import MISSING
    return f.default is MISSING and f.default_factory is MISSING


# ------------------------------------------------------------------------------------------ sections
@dataclass(kw_only=True, slots=True)
class ModelSpec:
    layers: int
    hidden: int  # d_model
    ffn_hidden: int  # MLP inner width (per branch for swiglu)
    mlp: str = "swiglu"
    heads: int
    kv_heads: int | None = None  # None -> heads (multi-head attention)
    vocab: int
    seq_len: int  # tokens per sequence


# Model sizes: ~100x past the largest published dense shapes (128 layers, h 25,600, a 256K vocabulary, 10M
# tokens of context); 1e308 overflowed the FLOP and byte counts into a traceback.
MAX_LAYERS, MAX_HIDDEN, MAX_VOCAB, MAX_SEQ_LEN = 10_000, 1 << 22, 1 << 26, 1 << 30
MODEL_RULES = {"layers": _int(1, MAX_LAYERS), "hidden": _int(1, MAX_HIDDEN), "ffn_hidden": _int(1, 4 * MAX_HIDDEN),
               "mlp": _choice("swiglu", "gelu"), "heads": _int(1, MAX_HIDDEN), "kv_heads": _int(1, MAX_HIDDEN),
               "vocab": _int(1, MAX_VOCAB), "seq_len": _int(1, MAX_SEQ_LEN)}


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    global_batch: int  # sequences per optimizer step
    micro_batch: int | None = None  # sequences per micro-batch; None -> chosen by the planner
    dtype: str = "bf16"
    recompute: str | None = None  # None -> chosen by the planner
    sequence_parallel: bool = True
    zero: int = 1  # ZeRO stage 0-3 (sharding over the dp x cp ranks that hold the same weights)
    total_tokens: float | None = None  # tokens for the whole run (-> train_days)
    # "flash" (fused, IO-aware, 2022+) | "unfused" (bmm + softmax through HBM) | None = auto: "unfused" for fp16
    # runs (the fp16 mixed-precision era, e.g. Megatron-LM 2021, predates fused attention), "flash" for bf16/fp8
    attention: str | None = None
    # data-parallel gradient reduction overlapped with the last backward (bucketed, PyTorch DDP / Megatron
    # --overlap-grad-reduce); None = auto: off for fp16 runs (Megatron-LM 2021 reduced after the backward)
    overlap_grad_reduce: bool | None = None


# Upper bounds where a larger value is physically meaningless (and only turns into inf/overflow downstream).
# Generous on purpose: no real scenario comes within orders of magnitude of them.
# tokens: ~3e5 x the ~3e14 tokens of public human-written text (Epoch AI, 2024); Llama 3 trained on 15.6e12
MAX_TOTAL_TOKENS = 1e20
MAX_DURATION_DAYS = 100_000  # days (~274 years): training runs last months, and no hardware lasts decades
MAX_RESTART_S = 365 * 86400  # s (one year): a recovery longer than that is a new cluster, not a restart
# (and the bound of a checkpoint's write and a node's repair too: 1e308 overflowed or gave a NaN ETTR)
MAX_CHECKPOINT_INTERVAL_S = MAX_DURATION_DAYS * 86400  # s: an interval longer than the longest run = never

MAX_GLOBAL_BATCH = 1 << 30  # sequences per step (published: ~2K-16K)
TRAIN_RULES = {"global_batch": _int(1, MAX_GLOBAL_BATCH), "micro_batch": _int(1, MAX_GLOBAL_BATCH, auto=True),
               "dtype": _choice("fp16", "bf16", "fp8"),
               "recompute": _choice("none", "selective", "full", auto=True), "sequence_parallel": _Rule("bool"),
               "zero": _int(0, 3), "total_tokens": _num(1, MAX_TOTAL_TOKENS),
               "attention": _choice("flash", "unfused", auto=True),
               "overlap_grad_reduce": _Rule("bool", auto=True)}


@dataclass(kw_only=True, slots=True)
class ParallelSpec:
    tp: int | None = None  # tensor parallel (within the NVLink domain)
    pp: int | None = None  # pipeline stages
    cp: int | None = None  # context parallel (ring attention)
    dp: int | None = None  # data-parallel replicas
    vpp: int | None = None  # virtual stages per pipeline rank (interleaved 1F1B)
    search: bool = False  # True: every key left out is searched, ranked by goodput


PARALLEL_RULES = {"tp": _int(1), "pp": _int(1), "cp": _int(1), "dp": _int(1), "vpp": _int(1, auto=True),
                  "search": _Rule("bool")}


@dataclass(kw_only=True, slots=True)
class PoolSpec:
    gpu: str
    count: int  # GPUs
    gpus_per_node: int = 0  # 0: the GPU's own (hardware.GPU.node_gpus: 8 in an HGX server, 4 in a GB200 tray)
    lease_usd_per_gpu_hour: float | None = None  # revenue if leased to inference instead of training

    def __post_init__(self) -> None:
        if not self.gpus_per_node and self.gpu in GPUS:  # (an unknown GPU is refused by name in _pool)
            # a GB200 pool left without it was taken as 8-GPU nodes: half its node failure rate (a user audit)
            self.gpus_per_node = GPUS[self.gpu].node_gpus


# Fleet: 100x the 1M-GPU preset; a node (an NVLink domain) of at most 1,024 GPUs (the largest announced rack-scale
# domain is 576); 1e308 GPUs per node gave inf and NaN power, energy and cost.
MAX_GPUS, MAX_GPUS_PER_NODE, MAX_USD = 100_000_000, 1024, 1e6
POOL_RULES = {"gpu": _Rule("str"), "count": _int(1, MAX_GPUS), "gpus_per_node": _int(1, MAX_GPUS_PER_NODE),
              "lease_usd_per_gpu_hour": _num(0, MAX_USD)}


@dataclass(kw_only=True, slots=True)
class FleetSpec:
    pools: list[PoolSpec]  # one pool for a homogeneous fleet
    scale_out_gbps: float = 400.0  # Gb/s of scale-out (InfiniBand / RoCE) per GPU
    # "rail-optimized": same-local-rank traffic under one rail switch skips the oversubscribed spine | "fat-tree"
    topology: str = "rail-optimized"
    oversubscription: float = 1.0  # scale-out bandwidth divisor above the leaf switch
    # rail-optimized: nodes one rail (leaf) switch reaches. NVIDIA's DGX SuperPOD scalable unit: 32 nodes, one
    # 64-port leaf per rail (32 ports down, 32 up). A group spanning more nodes crosses the spine.
    rail_switch_nodes: int = RAIL_SWITCH_NODES
    balance: str = "equal"  # mixed fleets: "equal" shares or "throughput"-proportional shares

    @property
    def count(self) -> int:
        return sum(p.count for p in self.pools)


FLEET_RULES = {"gpu": _Rule("str"), "count": _int(1, MAX_GPUS), "gpus_per_node": _int(1, MAX_GPUS_PER_NODE),
               "scale_out_gbps": _num(1e-3, 1e6), "topology": _choice("rail-optimized", "fat-tree"),
               "oversubscription": _num(1, 1000), "rail_switch_nodes": _int(1, MAX_GPUS),
               "balance": _choice("equal", "throughput"), "pools": _Rule("str")}

# Llama 3 405B pre-training, 54 days on 16,384 H100 (2,048 nodes): 419 unexpected interruptions by root cause
# (Llama 3 Herd of Models, arXiv 2407.21783, Table 5). Used as the default cause mix (weights, not rates).
LLAMA3_CAUSES = {"faulty_gpu": 148, "gpu_hbm3": 72, "software_bug": 54, "network_switch_cable": 35,
                 "host_maintenance": 32, "gpu_sram": 19, "gpu_system_processor": 17, "nic": 7,
                 "nccl_watchdog_timeout": 7, "silent_data_corruption": 6, "gpu_thermal": 6, "ssd": 3, "psu": 3,
                 "chassis": 2, "io_expansion_board": 2, "dependency": 2, "cpu": 2, "system_memory": 2}
# 419 failures / (2,048 nodes x 54 days) = 3.789 per 1000 node-days; 47 planned interruptions / 54 days.
LLAMA3_NODE_RATE = 419 / (2048 * 54) * 1000
LLAMA3_PLANNED_PER_DAY = 47 / 54
MAX_TRIALS = 100_000  # Monte Carlo trials: memory grows ~15 KB per trial (see ReliabilitySpec.trials)


@dataclass(kw_only=True, slots=True)
class ReliabilitySpec:
    node_failures_per_1000_node_days: float = LLAMA3_NODE_RATE
    causes: dict[str, float] = field(default_factory=lambda: dict(LLAMA3_CAUSES))  # relative weights
    planned_per_day: float = LLAMA3_PLANNED_PER_DAY  # job-level planned interruptions (maintenance, updates)
    checkpoint_write_s: float = 30.0  # s the job is blocked per checkpoint (snapshot; the upload is async)
    # s from interruption to training again (detect, swap node, reload, warm up). Llama 3 reports > 90% effective
    # training time with 466 interruptions in 54 days, i.e. < ~10 min lost per interruption all-in.
    restart_s: float = 240.0
    checkpoint_interval_s: float | None = None  # None -> Daly optimum
    spare_nodes: int | None = None  # None -> enough hot spares; else a finite pool repaired in repair_h
    repair_h: float = 24.0  # h to repair or replace a failed node (only matters with finite spare_nodes)
    duration_days: float | None = None  # None -> the run's train_days (or 30 if total_tokens is not set)
    # Monte Carlo trials. At most MAX_TRIALS: the exact path holds (trials x up to 257) float arrays, ~1.3-1.5 GB
    # and ~4-5 s at 100,000 trials with ~250 failures per trial
    trials: int = 1000
    seed: int = 0


# failure rates: 1e6 per 1000 node-days is a failure every 1.4 minutes on every node (Llama 3: 3.8)
MAX_FAILURE_RATE = 1e6
RELIABILITY_RULES = {"node_failures_per_1000_node_days": _num(0, MAX_FAILURE_RATE),
                     "causes": _Rule("dict", choices=tuple(LLAMA3_CAUSES)),
                     "planned_per_day": _num(0, MAX_FAILURE_RATE), "checkpoint_write_s": _num(0, MAX_RESTART_S),
                     "restart_s": _num(0, MAX_RESTART_S),
                     "checkpoint_interval_s": _num(1, MAX_CHECKPOINT_INTERVAL_S, auto=True),
                     "spare_nodes": _int(0, MAX_GPUS), "repair_h": _num(0, MAX_RESTART_S / 3600),
                     "duration_days": _num(1e-6, MAX_DURATION_DAYS), "trials": _int(1, MAX_TRIALS), "seed": _int(0)}


@dataclass(kw_only=True, slots=True)
class PowerSpec:
    pue: float = 1.2  # facility power / IT power on Earth (off Earth: OFF_EARTH_PUE unless given)
    node_overhead_w: float | None = None  # W per node besides GPUs (CPUs, DRAM, NICs, NVSwitch, fans); None -> 3,500 per 8 GPUs
    network_w_per_gpu: float = 40.0  # W of scale-out switches and optics per GPU
    gpu_compute_power_frac: float = 0.95  # GPU board power while computing, fraction of TDP
    gpu_comm_power_frac: float = 0.35  # GPU board power while waiting in a collective / checkpoint, fraction of TDP
    grid_mw: float | None = None  # MW the grid connection may draw; None -> unconstrained
    battery_mwh: float = 0.0  # installed battery energy, MWh
    battery_mw: float = 0.0  # installed battery power, MW
    usd_per_mwh: float = 80.0  # electricity price, USD/MWh
    usd_per_gpu_hour: float = 2.0  # amortised capital (or rental) cost of one GPU-hour, USD


OFF_EARTH_PUE = 1.05  # orbit / Mars: radiators reject heat to space, only pumps add to the IT load
# W: a DGX H100 node draws ~10.2 kW all in (NVIDIA's spec), a GB200 GPU ~1.2 kW; 100x that means nothing (and
# 1e308 W gave inf - inf = NaN energy, cost and battery figures)
MAX_NODE_OVERHEAD_W = 1e6
MAX_NETWORK_W_PER_GPU = 1e5
POWER_RULES = {"pue": _num(1.0, 5.0), "node_overhead_w": _num(0, MAX_NODE_OVERHEAD_W),
               "network_w_per_gpu": _num(0, MAX_NETWORK_W_PER_GPU),
               "gpu_compute_power_frac": _num(0, 1.5), "gpu_comm_power_frac": _num(0, 1.5), "grid_mw": _num(0, 1e6),
               "battery_mwh": _num(0, 1e9), "battery_mw": _num(0, 1e6), "usd_per_mwh": _num(0, MAX_USD),
               "usd_per_gpu_hour": _num(0, MAX_USD)}


@dataclass(kw_only=True, slots=True)
class SiteSpec:
    kind: str = "earth"  # "earth" | "orbit" | "mars"
    solar_w_m2: float | None = None  # irradiance at the array; None -> 1361 (orbit), 590 (Mars), 0 (Earth: grid)
    panel_efficiency: float = 0.30  # solar cell efficiency (space-grade triple junction ~0.30)
    sunlit_fraction: float | None = None  # None -> 0.99 (dawn-dusk sun-synchronous orbit), 0.5 (Mars sol)
    radiator_temp_k: float = 300.0  # K, radiator surface temperature
    emissivity: float = 0.90
    sink_temp_k: float | None = None  # K, effective sink; None -> 4 (deep space, orbit), 210 (Mars)
    light_time_s: float | None = None  # s, one-way light time to Earth; None -> 0.002 (LEO), 750 (Mars mean).
    # Reported as given: no figure of the plan depends on it (it is for the link to Earth, `sync`, later)


MAX_TEMP_K = 6000  # K: above the Sun's surface (5,772 K) no radiator or sink exists (1e308 ** 4 overflowed)
SITE_RULES = {"kind": _choice("earth", "orbit", "mars"), "solar_w_m2": _num(0, 1e5), "panel_efficiency": _num(0.01, 1),
              "sunlit_fraction": _num(0.01, 1), "radiator_temp_k": _num(1, MAX_TEMP_K), "emissivity": _num(0.01, 1),
              "sink_temp_k": _num(0, MAX_TEMP_K), "light_time_s": _num(0)}


@dataclass(kw_only=True, slots=True)
class Scenario:
    name: str = "scenario"
    description: str = ""  # free text shown with the prediction (summary, --json, report)
    model: ModelSpec
    train: TrainSpec
    parallel: ParallelSpec
    fleet: FleetSpec
    reliability: ReliabilitySpec
    power: PowerSpec
    site: SiteSpec
    raw: dict = field(default_factory=dict)  # the input as given (for sweeps and reports)


SECTIONS = ("name", "description", "model", "train", "parallel", "fleet", "reliability", "power", "site")


# ------------------------------------------------------------------------------------------- loading
def load_scenario(src: str | Path | dict) -> Scenario:
    """A `Scenario` from a TOML/JSON path, a preset name, or a dict shaped like the TOML."""
    if isinstance(src, Scenario):
        return src
    if isinstance(src, dict):
        return from_dict(src)
    if not str(src).strip():  # Path("") is the working directory
        raise ScenarioError("scenario: an empty path; give a TOML or JSON file, or a preset name")
    path = Path(src)
    if not path.exists():
        if str(src) in preset_names():
            return load_preset(str(src))
        raise ScenarioError(f"scenario {str(src)!r}: no such file and not a preset; presets: {', '.join(preset_names())}")
    try:
        text = read_config(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"scenario {path}: is not UTF-8 text (byte {e.start}); give a TOML or JSON file") from None
    except ValueError as e:  # a directory, a FIFO, a device, a huge file (files.read_config)
        raise ScenarioError(f"scenario {path}: {e}; give a TOML or JSON file") from None
    except OSError as e:
        raise ScenarioError(f"scenario {path}: cannot be read: {e.strerror}") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"  # by the suffix, in any case (BASE.JSON is JSON)
    try:
        raw = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except ValueError as e:  # TOML's and JSON's decode errors, and an integer past Python's 4,300-digit limit
        raise ScenarioError(f"scenario {path}: cannot parse as {kind} (by its suffix): {e}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"scenario {path}: the top level must be a table (a JSON object) of sections "
                            f"{', '.join(SECTIONS)}; got a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    return from_dict(raw)


def preset_names() -> list[str]:
    files = resources.files("megacluster.plan").joinpath("presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def load_preset(name: str) -> Scenario:
    if name not in preset_names():
        raise ScenarioError(f"--preset {name!r} is unknown; presets: {', '.join(preset_names())}")
    text = resources.files("megacluster.plan").joinpath("presets", f"{name}.toml").read_text()
    raw = tomllib.loads(text)
    raw.setdefault("name", name)
    return from_dict(raw)


def from_dict(raw: dict) -> Scenario:
    """Validate a dict shaped like the TOML; raise `ScenarioError` naming the first bad key."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"a scenario must be a table/dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ScenarioError(f"[{unknown[0]}] is not a known section; allowed: {', '.join(SECTIONS)}")
    for sec in ("model", "train", "fleet"):
        if sec not in raw:
            raise ScenarioError(f"[{sec}] is required")
    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise ScenarioError(f"{key} = {raw[key]!r} is invalid: must be a string")
    sc = Scenario(
        name=raw.get("name", "scenario"), description=raw.get("description", ""),
        model=_build(ModelSpec, "model", raw["model"], MODEL_RULES),
        train=_build(TrainSpec, "train", raw["train"], TRAIN_RULES),
        parallel=_build(ParallelSpec, "parallel", raw.get("parallel"), PARALLEL_RULES),
        fleet=_fleet(raw["fleet"]),
        reliability=_build(ReliabilitySpec, "reliability", raw.get("reliability"), RELIABILITY_RULES),
        power=_build(PowerSpec, "power", raw.get("power"), POWER_RULES),
        site=_build(SiteSpec, "site", raw.get("site"), SITE_RULES),
        raw=raw,
    )
    if sc.site.kind != "earth" and "pue" not in (raw.get("power") or {}):
        sc.power.pue = OFF_EARTH_PUE
    _software_defaults(sc.train)
    _cross_check(sc)
    return sc


def _software_defaults(t: TrainSpec) -> None:
    """Resolve software-stack keys left out. The dtype is the only hint a published run gives of its software
    generation: fp16 mixed precision (loss scaling) is the 2018-2021 stack (Megatron-LM SC'21: unfused softmax
    attention, gradient all-reduce after the backward); bf16/fp8 runs use fused attention and overlap the
    gradient reduction with the backward. Set the keys explicitly to override."""
    legacy = t.dtype == "fp16"
    if t.attention is None:
        t.attention = "unfused" if legacy else "flash"
    if t.overlap_grad_reduce is None:
        t.overlap_grad_reduce = not legacy


def _fleet(raw: Any) -> FleetSpec:
    if not isinstance(raw, dict):
        raise ScenarioError("[fleet] must be a table")
    raw = dict(raw)
    pools_raw = raw.pop("pools", None)
    single = {k: raw.pop(k) for k in ("gpu", "count", "gpus_per_node") if k in raw}
    rules = {k: v for k, v in FLEET_RULES.items() if k not in ("gpu", "count", "gpus_per_node", "pools")}
    unknown = sorted(set(raw) - set(rules))
    if unknown:
        raise ScenarioError(f"fleet.{unknown[0]} is not a known key; allowed: {', '.join(FLEET_RULES)}")
    if pools_raw is not None:
        if {"gpu", "count"} & set(single):
            raise ScenarioError("fleet: give either fleet.gpu/fleet.count or [[fleet.pools]], not both")
        if not isinstance(pools_raw, list) or not pools_raw:
            raise ScenarioError("fleet.pools must be a non-empty array of tables {gpu, count, gpus_per_node}")
        gpn = single.get("gpus_per_node")
        pools = [_pool(p, i, gpn) for i, p in enumerate(pools_raw)]
    else:
        if "gpu" not in single:
            raise ScenarioError("fleet.gpu is required (or [[fleet.pools]]): one of " + ", ".join(GPUS))
        if "count" not in single:
            raise ScenarioError("fleet.count is required: must be an integer >= 1")
        pools = [_pool(single, None, None)]
    kwargs = {k: _check("fleet", k, v, rules[k]) for k, v in raw.items()}
    return FleetSpec(pools=pools, **kwargs)


def _pool(raw: Any, i: int | None, gpn_default: int | None) -> PoolSpec:
    sec = "fleet" if i is None else f"fleet.pools[{i}]"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{sec} must be a table {{gpu, count, gpus_per_node}}")
    if gpn_default is not None:
        raw = {"gpus_per_node": gpn_default, **raw}
    pool = _build(PoolSpec, sec, raw, POOL_RULES)
    if pool.gpu not in GPUS:
        raise ScenarioError(f"{sec}.gpu = {pool.gpu!r} is unknown; allowed: {', '.join(GPUS)}")
    if pool.count % pool.gpus_per_node and pool.count > pool.gpus_per_node:
        given = "" if "gpus_per_node" in raw else f" ({pool.gpu}'s node, the default; give {sec}.gpus_per_node)"
        raise ScenarioError(f"{sec}.count = {pool.count} is not a multiple of gpus_per_node = {pool.gpus_per_node}"
                            + given)
    return pool


def nvlink_domain(pool: PoolSpec) -> int:
    """GPUs sharing one NVLink domain: the node (HGX boards) or the rack (NVL72, domain > 8)."""
    gpu = GPUS[pool.gpu]
    return gpu.nvlink_domain if gpu.nvlink_domain > 8 else min(gpu.nvlink_domain, pool.gpus_per_node)


def _cross_check(sc: Scenario) -> None:
    """Checks that involve more than one key."""
    m, t, p = sc.model, sc.train, sc.parallel
    if m.hidden % m.heads:
        raise ScenarioError(f"model.hidden = {m.hidden} is not divisible by model.heads = {m.heads}")
    if m.kv_heads is None:
        m.kv_heads = m.heads
    if m.heads % m.kv_heads:
        raise ScenarioError(f"model.heads = {m.heads} is not divisible by model.kv_heads = {m.kv_heads}")
    if t.micro_batch is not None and t.micro_batch > t.global_batch:
        raise ScenarioError(f"train.micro_batch = {t.micro_batch} exceeds train.global_batch = {t.global_batch}")
    if sc.site.kind != "earth":  # off Earth the array feeds the site and the radiator rejects all of it
        from .power import site_defaults  # (power imports this module)
        d = site_defaults(sc.site)
        if d["solar_w_m2"] <= 0:
            raise ScenarioError(f"site.solar_w_m2 = 0 with site.kind = {sc.site.kind!r}: the site runs on its solar "
                                "array; must be > 0")
        if sc.site.radiator_temp_k <= d["sink_temp_k"]:
            raise ScenarioError(f"site.radiator_temp_k = {sc.site.radiator_temp_k:g} must be above the sink "
                                f"(site.sink_temp_k = {d['sink_temp_k']:g}): a radiator no warmer than its "
                                "surroundings rejects no heat")
    pw = sc.power
    if pw.gpu_comm_power_frac > pw.gpu_compute_power_frac:
        raise ScenarioError(f"power.gpu_comm_power_frac = {pw.gpu_comm_power_frac:g} exceeds "
                            f"power.gpu_compute_power_frac = {pw.gpu_compute_power_frac:g}: a GPU waiting in a "
                            "collective draws less than one computing")
    for pool in sc.fleet.pools:
        gpu = GPUS[pool.gpu]
        if gpu.tdp_w * pw.gpu_compute_power_frac < gpu.idle_w:
            raise ScenarioError(f"power.gpu_compute_power_frac = {pw.gpu_compute_power_frac:g} puts a computing "
                                f"{pool.gpu} at {gpu.tdp_w * pw.gpu_compute_power_frac:.0f} W, below its idle "
                                f"{gpu.idle_w:.0f} W: must be >= {gpu.idle_w / gpu.tdp_w:.2f}")
        if t.dtype not in gpu.peak_tflops:
            raise ScenarioError(f"train.dtype = {t.dtype!r} is not supported on {pool.gpu}; "
                                f"allowed there: {', '.join(k for k in ('fp16', 'bf16', 'fp8') if k in gpu.peak_tflops)}")
    check_parallel(sc, p.tp, p.pp, p.cp, p.dp, p.vpp, complete=not p.search)


def even_replicas(sc: Scenario, dp: int) -> bool:
    """Whether every replica takes the same global_batch / dp sequences: one pool, or equal shares that divide.
    A given micro-batch must then divide that share (a mixed fleet's 8 sequences in micro-batches of 3 were timed
    as 9, where one pool was refused)."""
    f = sc.fleet
    return sc.train.global_batch % dp == 0 and (len(f.pools) == 1 or f.balance == "equal")


def check_parallel(sc: Scenario, tp, pp, cp, dp, vpp, *, complete: bool) -> None:
    """Raise `ScenarioError` if the (possibly partial) parallel plan cannot run on this model and fleet.

    With ``complete`` the plan must be fully determined (dp may be derived from the GPU count)."""
    m, n = sc.model, sc.fleet.count
    pp_given = pp is not None
    if complete:  # a fixed plan: what is not given is 1
        tp, pp, cp = tp or 1, pp or 1, cp or 1
    if tp is not None:
        if m.heads % tp:
            raise ScenarioError(f"model.heads = {m.heads} is not divisible by parallel.tp = {tp}")
        if m.kv_heads % tp and tp % m.kv_heads:
            raise ScenarioError(f"model.kv_heads = {m.kv_heads} and parallel.tp = {tp}: one must divide the other")
        if m.ffn_hidden % tp:
            raise ScenarioError(f"model.ffn_hidden = {m.ffn_hidden} is not divisible by parallel.tp = {tp}")
        worst_domain = min(nvlink_domain(p) for p in sc.fleet.pools)
        if tp > worst_domain:
            raise ScenarioError(f"parallel.tp = {tp} exceeds the NVLink domain ({worst_domain} GPUs)")
    if pp is not None and pp > m.layers:
        raise ScenarioError(f"parallel.pp = {pp} exceeds model.layers = {m.layers}")
    if vpp is not None and vpp > 1 and pp == 1:
        raise ScenarioError(f"parallel.vpp = {vpp} is invalid with parallel.pp = 1"
                            f"{'' if pp_given else ' (pp not given and parallel.search = false)'}: must be 1 "
                            "(interleaving splits pipeline stages; give parallel.pp > 1 to interleave)")
    if vpp is not None and pp is not None and pp * vpp > m.layers:
        raise ScenarioError(f"parallel.pp x parallel.vpp = {pp * vpp} exceeds model.layers = {m.layers}")
    if vpp is not None and pp is not None and pp > 1:
        # model chunks of c = ceil(L / (pp vpp)) layers; the empty slots come off the first stage's first chunk
        # and the last stage's last chunk, at most c - 1 each (Llama 3: 126 layers = 7 + 14 x 8 + 7)
        from .perf import empty_slots  # (perf imports this module)
        per_chunk, spare = empty_slots(m.layers, pp, vpp)
        if spare > 2 * (per_chunk - 1):
            raise ScenarioError(
                f"parallel.pp = {pp}, parallel.vpp = {vpp}: model.layers = {m.layers} in {pp * vpp} chunks of "
                f"{per_chunk} layers leave {spare} empty; at most {2 * (per_chunk - 1)} can come off the first and "
                "the last stage (one short chunk each); choose pp x vpp that (nearly) divides model.layers")
    if cp is not None and m.seq_len % (2 * cp) and cp > 1:
        raise ScenarioError(f"model.seq_len = {m.seq_len} is not divisible by 2 x parallel.cp = {2 * cp}")
    if not complete:
        return
    replica = tp * pp * cp
    if dp is None:
        if n % replica:
            raise ScenarioError(f"parallel.tp x pp x cp = {replica} does not divide fleet.count = {n}")
        dp = n // replica
    if replica * dp != n:
        raise ScenarioError(f"parallel.tp x pp x cp x dp = {tp}x{pp}x{cp}x{dp} = {replica * dp} "
                            f"!= fleet GPU count {n}")
    for i, pool in enumerate(sc.fleet.pools):
        if pool.count % replica:
            raise ScenarioError(f"fleet.pools[{i}].count = {pool.count} is not a multiple of one model replica "
                                f"(tp x pp x cp = {replica} GPUs)")
    if sc.train.global_batch < dp:
        raise ScenarioError(f"train.global_batch = {sc.train.global_batch} is smaller than parallel.dp = {dp}")
    equal = len(sc.fleet.pools) == 1  # mixed fleets may split unevenly (replicas differ by a micro-batch)
    if equal and sc.train.global_batch % dp:
        raise ScenarioError(f"train.global_batch = {sc.train.global_batch} is not divisible by parallel.dp = {dp}")
    mb = sc.train.micro_batch
    if even_replicas(sc, dp) and mb is not None and (sc.train.global_batch // dp) % mb:
        raise ScenarioError(f"train.micro_batch = {mb} does not divide the per-replica batch "
                            f"{sc.train.global_batch // dp} (global_batch / dp)")
