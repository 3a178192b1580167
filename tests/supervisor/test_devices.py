"""Which GPUs sem uses: `devices:` lists, sem's own CUDA_VISIBLE_DEVICES, MIG refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ConfigError, parse_config
from supervisor.gpu_selection import DeviceError, GpuInfo, select_gpus
from supervisor.resources import CpuInventory, NvmlApi, NvmlInventory, detect
from tests.gpusim.ledger import GiB, Ledger, SimGpu
from tests.gpusim.nvml import SimNvml

A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
UUID1 = "GPU-51510001-0000-0000-0000-000000000000"


def box(*names: str, mig: tuple[int, ...] = ()) -> list[GpuInfo]:
    return [
        GpuInfo(
            i,
            f"GPU-5151{i:04d}-0000-0000-0000-000000000000",
            name,
            80 * GiB,
            80 * GiB,
            mig=i in mig,
        )
        for i, name in enumerate(names)
    ]


def chosen(found: list[GpuInfo], wanted: list[int | str] | None, **env: str) -> list[int]:
    return select_gpus(found, wanted, env).chosen


def test_a_list_of_indexes_or_uuids_picks_those_gpus():
    found = box(A100, A100, A100)
    assert chosen(found, [0, 2]) == [0, 2]
    assert chosen(found, [UUID1]) == [1]
    assert chosen(found, ["GPU-51510002"]) == [2], "a unique UUID prefix, as CUDA accepts"


def test_sems_cuda_visible_devices_narrows_the_gpus():
    found = box(A100, A100, A100)
    assert chosen(found, None, CUDA_VISIBLE_DEVICES="2,0") == [0, 2]
    assert chosen(found, None, CUDA_VISIBLE_DEVICES=UUID1) == [1]
    assert chosen(found, None, CUDA_VISIBLE_DEVICES="") == []
    assert chosen(found, None, CUDA_VISIBLE_DEVICES="1,-1,2") == [1], "CUDA stops at -1"
    with pytest.raises(DeviceError, match=r"devices: GPU 0 is hidden by sem's CUDA_VISIBLE_DEV"):
        chosen(found, [0], CUDA_VISIBLE_DEVICES="1")


def test_indexes_on_a_mixed_box_need_pci_order():
    found = box(A100, H100)
    with pytest.raises(DeviceError, match=r"set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs"):
        chosen(found, None, CUDA_VISIBLE_DEVICES="1")
    assert chosen(found, None, CUDA_VISIBLE_DEVICES="1", CUDA_DEVICE_ORDER="PCI_BUS_ID") == [1]
    assert chosen(found, None, CUDA_VISIBLE_DEVICES=UUID1) == [1], "UUIDs are never ambiguous"


def test_unknown_gpus_are_refused_naming_those_there_are():
    with pytest.raises(DeviceError, match=r"devices: 5 is not a GPU here; NVML lists 0 \(GPU-"):
        chosen(box(A100, A100), [5])
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES=7: 7 is not a GPU here"):
        chosen(box(A100), None, CUDA_VISIBLE_DEVICES="7")


def test_mig_gpus_are_left_out_with_the_reason_or_refused_when_named():
    found = box(A100, A100, mig=(1,))
    selection = select_gpus(found, None, {})
    assert selection.chosen == [0]
    assert selection.left_out == [
        "GPU 1 (NVIDIA A100-SXM4-80GB) is in MIG mode: sem does not place engines on MIG"
        " instances; turn MIG off or use other GPUs"
    ]
    with pytest.raises(DeviceError, match="devices: GPU 1 is in MIG mode"):
        chosen(found, [1])
    with pytest.raises(DeviceError, match="CUDA_VISIBLE_DEVICES: MIG-1234: sem does not"):
        chosen(found, None, CUDA_VISIBLE_DEVICES="MIG-1234")


def sim(tmp_path: Path, *gpus: SimGpu) -> NvmlApi:
    path = tmp_path / f"ledger-{len(list(tmp_path.iterdir()))}.json"
    return SimNvml(Ledger.create(path, list(gpus)).path)


def test_detect_through_the_nvml_stand_in(tmp_path: Path):
    api = sim(tmp_path, SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB, mig=True))
    inventory = detect("auto", "auto", environ={}, nvml=lambda: api)
    assert isinstance(inventory, NvmlInventory)
    assert [d.id for d in inventory.devices()] == ["0"]
    assert "GPU 1 (NVIDIA Sim GPU) is in MIG mode" in inventory.notes[0]
    with pytest.raises(DeviceError, match="devices: GPU 1 is in MIG mode"):
        detect([1], "auto", environ={}, nvml=lambda: api)


def test_detect_falls_back_to_the_cpu_only_for_auto(tmp_path: Path):
    api = sim(tmp_path, SimGpu(0, 24 * GiB))
    hidden = detect("auto", "8GiB", environ={"CUDA_VISIBLE_DEVICES": ""}, nvml=lambda: api)
    assert isinstance(hidden, CpuInventory), "the operator hid every GPU"
    with pytest.raises(RuntimeError, match="devices: gpu was asked for, but no GPU is visible"):
        detect("gpu", "8GiB", environ={"CUDA_VISIBLE_DEVICES": ""}, nvml=lambda: api)
    only_mig = sim(tmp_path, SimGpu(0, 24 * GiB, mig=True))
    with pytest.raises(RuntimeError, match=r"auto was asked for, but GPU 0 .* is in MIG mode"):
        detect("auto", "8GiB", environ={}, nvml=lambda: only_mig)

    def no_driver() -> NvmlApi:
        raise OSError("NVML Shared Library Not Found")

    assert isinstance(detect("auto", "8GiB", environ={}, nvml=no_driver), CpuInventory)
    with pytest.raises(RuntimeError, match=r"devices: \[0\] was asked for, but NVML unavailable"):
        detect([0], "8GiB", environ={}, nvml=no_driver)


def test_models_yaml_devices_list():
    config = parse_config("devices: [0, '1', GPU-51510002]\n")
    assert config.devices == [0, 1, "GPU-51510002"]
    for bad, problem in [
        ("[]", "empty list"),
        ("[0, 0]", "listed twice"),
        ("[MIG-abc]", "MIG instances"),
        ("[gpu0]", "neither a GPU index"),
    ]:
        with pytest.raises(ConfigError, match=rf"models.yaml:1: devices: .*{problem}"):
            parse_config(f"devices: {bad}\n")
