"""The NVML inventory against nvidia-smi, on a machine with an NVIDIA GPU (skipped elsewhere)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from supervisor.resources import CpuInventory, NvmlInventory, detect


def nvidia_smi_rows() -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return bool(nvidia_smi_rows())
    except (subprocess.CalledProcessError, OSError):
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="no NVIDIA GPU here (nvidia-smi finds none)")
def test_nvml_inventory_matches_nvidia_smi():
    devices = NvmlInventory().devices()
    rows = nvidia_smi_rows()
    assert len(devices) == len(rows)
    for device, (index, uuid, name, total_mib) in zip(devices, rows, strict=True):
        assert device.id == index
        assert device.uuid == uuid
        assert device.name == name
        assert abs(device.total / 2**20 - int(total_mib)) <= 1
        assert 0 < device.free <= device.total
    assert isinstance(detect("auto", "auto"), NvmlInventory)


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU")
def test_without_a_driver_auto_falls_back_to_the_cpu():
    inventory = detect("auto", "8GiB")
    assert isinstance(inventory, CpuInventory)
    (device,) = inventory.devices()
    assert device.id == "cpu" and device.total == 8 * 2**30
    with pytest.raises(RuntimeError, match="devices: gpu was asked for"):
        detect("gpu", "auto")
