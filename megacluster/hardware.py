"""GPU, node and link catalogue, shared by the trainer (MFU) and the planner.

Pure Python: importing this module never imports torch (the planner must stay torch-free). Only
`detect_local_gpu()` touches torch, lazily, to read the local device name.

Figures are vendor datasheet values for *dense* math (no 2:4 sparsity), per GPU:
- ``peak_tflops[dtype]``: TFLOP/s (1e12 FLOP/s). MFU is always computed against the dtype the run uses.
- ``hbm_gb``: device memory as marketed ("80GB"), which is GiB (2**30 bytes): the planner's usable capacity is
  ``hbm_gb * 2**30`` bytes less what the driver keeps; ``hbm_gb_s``: GB/s (1e9 bytes/s) of HBM bandwidth.
- ``tdp_w``: board power (W) at full load.
- ``nvlink_gb_s``: scale-up bandwidth per GPU, GB/s, *both directions added* as marketed
  (H100 NVLink 4: 900 GB/s = 450 GB/s each way). Use ``nvlink_gb_s / 2`` for one direction.
- ``nvlink_domain``: GPUs that share one NVLink domain (8 in an HGX board, 72 in a GB200 NVL72 rack).
- ``node_gpus``: GPUs per node, the unit that fails and is replaced (8 in an HGX/DGX server, 4 in a GB200
  compute tray); the planner's default `gpus_per_node`.

Sources: NVIDIA A100 datasheet (2021), H100 datasheet (SXM5), H200 product brief, DGX B200 and
GB200 NVL72 datasheets (per-GPU = system figure / GPU count).

Local-GPU detection (`match_device_name`, `detect_local_gpu`) maps a ``torch.cuda.get_device_name()`` string
to an entry only when the whole name is one of that entry's ``aliases`` (case, '-'/'_'/space and a leading
'NVIDIA' ignored), never by substring: a part the catalogue lacks (H100 NVL, A100 PCIe, GH200, H200 NVL, a MIG
slice such as 'NVIDIA A100-SXM4-40GB MIG 1g.5gb', ...) gives None, and the trainer then reports MFU as null
rather than against another part's peak. Adding a part here also needs its ``gpus`` entry in
``plan/data/kernels.json``: every entry of `GPUS` is a planner choice.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True, frozen=True)
class GPU:
    name: str
    peak_tflops: dict[str, float]  # dtype -> dense TFLOP/s
    hbm_gb: float  # GiB (2**30 bytes), as marketed
    hbm_gb_s: float  # GB/s
    tdp_w: float  # W
    nvlink_gb_s: float  # GB/s per GPU, both directions added
    nvlink_domain: int = 8  # GPUs per NVLink domain
    node_gpus: int = 8  # GPUs per node (server or compute tray)
    idle_w: float = 0.0  # W, board power when idle (0 = unknown, planner uses a fraction of TDP)
    aliases: tuple[str, ...] = field(default=())  # whole torch.cuda.get_device_name() strings of this very part

    def peak(self, dtype: str) -> float:
        """Dense peak in FLOP/s (not TFLOP/s) for `dtype`; raises KeyError naming the supported dtypes."""
        try:
            return self.peak_tflops[dtype] * 1e12
        except KeyError:
            raise KeyError(f"{self.name} has no {dtype!r} peak; known: {sorted(self.peak_tflops)}") from None


def _tf(fp32: float, tf32: float, bf16: float, fp8: float | None = None, int8: float | None = None) -> dict[str, float]:
    d = {"fp32": fp32, "tf32": tf32, "bf16": bf16, "fp16": bf16}
    if fp8 is not None:
        d["fp8"] = fp8
    if int8 is not None:
        d["int8"] = int8
    return d


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        # A100-40GB / A100-80GB are the SXM4 modules (400 W; 80GB: 2,039 GB/s). The PCIe cards share the peaks
        # but not the board (A100 datasheet: 40GB PCIe 250 W; 80GB PCIe 300 W, 1,935 GB/s), so their device
        # names ('NVIDIA A100-PCIE-40GB', 'NVIDIA A100 80GB PCIe') are not aliases here: they match nothing.
        GPU(name="A100-40GB", peak_tflops=_tf(19.5, 156, 312, None, 624), hbm_gb=40, hbm_gb_s=1555,
            tdp_w=400, nvlink_gb_s=600, idle_w=50, aliases=("NVIDIA A100-SXM4-40GB",)),
        GPU(name="A100-80GB", peak_tflops=_tf(19.5, 156, 312, None, 624), hbm_gb=80, hbm_gb_s=2039,
            tdp_w=400, nvlink_gb_s=600, idle_w=50, aliases=("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM-80GB")),
        # PCIe cards are joined by NVLink bridges in pairs (600 GB/s within the pair), not by an 8-GPU switch
        GPU(name="H100-PCIe", peak_tflops=_tf(51, 378, 756, 1513, 1513), hbm_gb=80, hbm_gb_s=2000,
            tdp_w=350, nvlink_gb_s=600, nvlink_domain=2, idle_w=50, aliases=("NVIDIA H100 PCIe",)),
        GPU(name="H100-SXM", peak_tflops=_tf(67, 494.7, 989.4, 1978.9, 1978.9), hbm_gb=80, hbm_gb_s=3350,
            tdp_w=700, nvlink_gb_s=900, idle_w=70, aliases=("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB")),
        GPU(name="H200", peak_tflops=_tf(67, 494.7, 989.4, 1978.9, 1978.9), hbm_gb=141, hbm_gb_s=4800,
            tdp_w=700, nvlink_gb_s=900, idle_w=70, aliases=("NVIDIA H200",)),
        GPU(name="B200", peak_tflops=_tf(75, 1100, 2250, 4500, 4500), hbm_gb=180, hbm_gb_s=8000,
            tdp_w=1000, nvlink_gb_s=1800, idle_w=100, aliases=("NVIDIA B200",)),
        GPU(name="GB200", peak_tflops=_tf(80, 1250, 2500, 5000, 5000), hbm_gb=186, hbm_gb_s=8000,
            tdp_w=1200, nvlink_gb_s=1800, nvlink_domain=72, node_gpus=4, idle_w=120, aliases=("NVIDIA GB200",)),
    )
}


def get_gpu(name: str) -> GPU:
    """Catalogue entry by exact name; raises KeyError naming the known GPUs."""
    try:
        return GPUS[name]
    except KeyError:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def _name_key(device_name: str) -> str:
    """Canonical form of a device name: case-folded, runs of '-', '_' and spaces -> one space, 'NVIDIA' dropped."""
    key = re.sub(r"[\s_\-]+", " ", device_name.strip().lower())
    return key.removeprefix("nvidia ")


def _alias_index() -> dict[str, GPU]:
    index: dict[str, GPU] = {}
    for gpu in GPUS.values():
        for alias in gpu.aliases:
            key = _name_key(alias)
            if key in index and index[key] is not gpu:
                raise ValueError(f"device name {alias!r} is an alias of both {index[key].name} and {gpu.name}")
            index[key] = gpu
    return index


_BY_DEVICE_NAME = _alias_index()


def match_device_name(device_name: str) -> GPU | None:
    """Map a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') to its catalogue entry, or None if unknown.

    The whole name must be one of an entry's `aliases` (compared by `_name_key`): no substring or longest-alias
    guess. A substring rule took 'NVIDIA H100 NVL' for the H100 SXM (alias 'H100'), 'NVIDIA GH200 480GB' for
    the H200 (alias 'H200'), 'NVIDIA A100 80GB PCIe' for the A100 80GB SXM and MIG slices for their whole GPU.
    A name this catalogue lacks gives None, so MFU is null rather than computed against another part's peak.
    """
    return _BY_DEVICE_NAME.get(_name_key(device_name))


def detect_local_gpu(device_index: int = 0) -> GPU | None:
    """The catalogue entry of the local CUDA device, or None: no CUDA, or a GPU not in the catalogue (then a
    RuntimeWarning names the device, and the trainer reports MFU as null rather than against a wrong peak)."""
    import torch  # lazy: the planner imports this module without torch

    if not torch.cuda.is_available():
        return None
    device_name = torch.cuda.get_device_name(device_index)
    gpu = match_device_name(device_name)
    if gpu is None:
        warnings.warn(f"GPU {device_name!r} is not in megacluster.hardware's catalogue (known: "
                      f"{', '.join(GPUS)}): MFU is reported as null", RuntimeWarning, stacklevel=2)
    return gpu
