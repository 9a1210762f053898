"""GPU catalogue (megacluster/hardware.py): device-name matching, local detection, catalogue consistency.

Contract: a device name maps to the catalogue entry of that very part, or to None when the catalogue lacks it
(the trainer then reports MFU as null); it never maps to a different part.
"""

import dataclasses
import math
import subprocess
import sys

import pytest

from megacluster import hardware
from megacluster.hardware import GPUS, detect_local_gpu, get_gpu, match_device_name

# torch.cuda.get_device_name() strings as drivers report them -> expected catalogue entry
KNOWN = [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"),
    ("NVIDIA H100 SXM5 80GB", "H100-SXM"),
    ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100-SXM-80GB", "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA B200", "B200"),
    ("NVIDIA GB200", "GB200"),
]

# real parts the catalogue lacks, or names too vague to pick one part: all must give None. The first group
# used to match another part by substring (wrong entry in the comment).
UNKNOWN = [
    "NVIDIA H100 NVL",  # was H100-SXM (alias 'H100'): 94 GB, 3.9 TB/s, lower clocks than the SXM
    "NVIDIA GH200 480GB",  # was H200 (alias 'H200')
    "NVIDIA H200 NVL",  # was H200: the PCIe card, lower peak than the SXM
    "NVIDIA A100 80GB PCIe",  # was A100-80GB (SXM: 400 W, 2,039 GB/s; the card is 300 W, 1,935 GB/s)
    "NVIDIA A100-PCIE-40GB",  # was A100-40GB (SXM: 400 W; the card is 250 W)
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice has a fraction of the SMs: the whole GPU's peak is wrong
    "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
    "NVIDIA H100",  # which H100?
    "NVIDIA A100",
    "NVIDIA H800",
    "NVIDIA H800 PCIe",
    "NVIDIA H20",
    "NVIDIA A800-SXM4-80GB",
    "NVIDIA B100",
    "NVIDIA GB300",
    "NVIDIA GeForce RTX 4090",
    "Tesla V100-SXM2-32GB",
    "",
]


@pytest.mark.parametrize("device_name,expected", KNOWN)
def test_real_device_names_match_their_part(device_name, expected):
    gpu = match_device_name(device_name)
    assert gpu is not None and gpu.name == expected


@pytest.mark.parametrize("device_name,expected", KNOWN)
def test_matching_ignores_case_separators_and_vendor_prefix(device_name, expected):
    bare = device_name.removeprefix("NVIDIA ")
    for variant in (bare, device_name.upper(), device_name.lower(), f"  {device_name}  ",
                    device_name.replace(" ", "-"), bare.replace("-", " ")):
        assert match_device_name(variant).name == expected, variant


@pytest.mark.parametrize("device_name", UNKNOWN)
def test_unknown_or_ambiguous_names_give_none(device_name):
    assert match_device_name(device_name) is None


def test_every_alias_names_exactly_one_entry():
    seen = {}
    for gpu in GPUS.values():
        assert gpu.aliases, f"{gpu.name} has no device name: it can never be detected"
        for alias in gpu.aliases:
            assert match_device_name(alias) is gpu
            assert seen.setdefault(hardware._name_key(alias), gpu.name) == gpu.name


def test_duplicate_alias_is_rejected(monkeypatch):
    a = dataclasses.replace(GPUS["H100-SXM"], name="X", aliases=("NVIDIA H100 80GB HBM3",))
    monkeypatch.setattr(hardware, "GPUS", {**GPUS, "X": a})
    with pytest.raises(ValueError, match="H100 80GB HBM3.*H100-SXM.*X"):
        hardware._alias_index()


# ------------------------------------------------------------------------------------- catalogue consistency
def test_catalogue_entries_are_complete_and_ordered():
    for name, gpu in GPUS.items():
        assert gpu.name == name and get_gpu(name) is gpu
        p = gpu.peak_tflops
        for dtype in ("fp32", "tf32", "bf16", "fp16"):  # MFU uses bf16 or tf32; the planner any train dtype
            assert dtype in p and math.isfinite(p[dtype]) and p[dtype] > 0, (name, dtype)
        assert p["fp16"] == p["bf16"]
        assert p["bf16"] >= p["tf32"] >= p["fp32"], name
        for low in ("fp8", "int8"):
            if low in p:
                assert p[low] >= p["bf16"], (name, low)
        assert gpu.peak("bf16") == p["bf16"] * 1e12
        for f in ("hbm_gb", "hbm_gb_s", "tdp_w", "nvlink_gb_s"):
            assert getattr(gpu, f) > 0, (name, f)
        assert gpu.nvlink_domain >= 1 and 0 <= gpu.idle_w < gpu.tdp_w


def test_datasheet_figures_of_the_parts_the_matcher_tells_apart():
    # H100 datasheet: SXM 989 / PCIe 756 TFLOP/s dense bf16 (1,979 / 1,513 with sparsity), 3.35 / 2.0 TB/s, 700 / 350 W
    sxm, pcie = GPUS["H100-SXM"], GPUS["H100-PCIe"]
    assert sxm.peak_tflops["bf16"] == pytest.approx(989.4, abs=0.5) and sxm.hbm_gb_s == 3350 and sxm.tdp_w == 700
    assert pcie.peak_tflops["bf16"] == pytest.approx(756, abs=0.5) and pcie.hbm_gb_s == 2000 and pcie.tdp_w == 350
    assert (sxm.nvlink_domain, pcie.nvlink_domain) == (8, 2)  # an HGX board's NVSwitch vs a 2-card NVLink bridge
    # A100 datasheet, SXM4: 312 TFLOP/s dense bf16, 400 W; 1,555 GB/s (40GB), 2,039 GB/s (80GB)
    for name, bw in (("A100-40GB", 1555), ("A100-80GB", 2039)):
        assert GPUS[name].peak_tflops["bf16"] == 312 and GPUS[name].hbm_gb_s == bw and GPUS[name].tdp_w == 400


def test_peak_of_unknown_dtype_names_the_known_ones():
    with pytest.raises(KeyError, match="fp8"):
        GPUS["A100-80GB"].peak("fp8")  # Ampere has no fp8 tensor cores


def test_get_gpu_unknown_names_the_catalogue():
    with pytest.raises(KeyError, match="H100-NVL.*A100-40GB"):
        get_gpu("H100-NVL")


def test_importing_the_catalogue_does_not_import_torch():
    code = "import sys, megacluster.hardware; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ local detection
# The GPU is mocked: these tests run on CPU-only machines, so torch.cuda.is_available / get_device_name are
# monkeypatched to report the device a CUDA machine would.
@pytest.fixture
def fake_cuda(monkeypatch):
    torch = pytest.importorskip("torch")
    asked = []

    def install(device_name: str | None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: device_name is not None)

        def get_device_name(device=None):
            asked.append(device)
            return device_name

        monkeypatch.setattr(torch.cuda, "get_device_name", get_device_name)
        return asked

    return install


@pytest.mark.parametrize("device_name,expected", KNOWN)
def test_detect_local_gpu_known(fake_cuda, recwarn, device_name, expected):
    asked = fake_cuda(device_name)
    assert detect_local_gpu(3).name == expected
    assert asked == [3]  # the rank's own device, not device 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("device_name", ["NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA A100 80GB PCIe"])
def test_detect_local_gpu_unknown_is_none_with_a_warning(fake_cuda, device_name):
    fake_cuda(device_name)
    with pytest.warns(RuntimeWarning, match=f"{device_name!r} is not in .*catalogue.*MFU is reported as null"):
        assert detect_local_gpu() is None


def test_detect_local_gpu_without_cuda(fake_cuda, recwarn):
    asked = fake_cuda(None)
    assert detect_local_gpu() is None
    assert asked == [] and not recwarn.list
