"""Which of the box's GPUs sem may use: a pure decision over what NVML reports.

Two inputs narrow the GPUs NVML lists:
- sem's own CUDA_VISIBLE_DEVICES (indexes or UUIDs), as an operator hides GPUs from any CUDA
  program. Its indexes are CUDA's, which follow CUDA_DEVICE_ORDER: NVML's (PCI bus) order only
  under CUDA_DEVICE_ORDER=PCI_BUS_ID. Under CUDA's default order (fastest first) indexes on a
  box of mixed GPUs are ambiguous: refused, with the fix. UUIDs are never ambiguous.
- `devices: [0, 1]` or `devices: [GPU-uuid, ...]` in models.yaml. Indexes there are NVML's (as
  `nvidia-smi` and `sem resources` show them); each must also be visible.
Engines get CUDA_DEVICE_ORDER=PCI_BUS_ID and NVML indexes (engine.py), so both agree.

MIG: a GPU in MIG mode is split into instances whose memory NVML's device-level figures do not
describe, and whose CUDA names are MIG UUIDs. sem does not place engines on MIG instances: such
a GPU is left out with the reason (refused outright when listed or made visible by name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MIG_REFUSED = "sem does not place engines on MIG instances; turn MIG off or use other GPUs"


class DeviceError(RuntimeError):
    """The operator's choice of GPUs cannot be honoured; the message says which and why."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it; `index` is NVML's, in PCI bus order."""

    index: int
    uuid: str
    name: str
    total: int
    free: int
    mig: bool = False  # MIG mode on: its memory belongs to MIG instances


@dataclass(frozen=True)
class Selection:
    chosen: list[int]  # NVML indexes sem may use
    left_out: list[str] = field(default_factory=list)  # GPUs that exist but cannot be used, why
    hidden: list[int] = field(default_factory=list)  # not visible or not listed


def check_device_list(items: Sequence[int | str]) -> None:
    """ValueError for a `devices:` list that can name no GPU (checked when the file loads)."""
    if not items:
        raise ValueError("devices: an empty list names no GPU (use cpu for the CPU)")
    if len(set(items)) != len(items):
        raise ValueError("devices: a GPU is listed twice")
    for item in items:
        if isinstance(item, int) and item < 0:
            raise ValueError(f"devices: {item} is not a GPU index")
        if isinstance(item, str) and item.startswith("MIG-"):
            raise ValueError(f"devices: {item}: {MIG_REFUSED}")
        if isinstance(item, str) and not item.startswith("GPU-"):
            raise ValueError(f"devices: {item!r} is neither a GPU index nor a GPU-... UUID")


def _find(found: list[GpuInfo], item: int | str, where: str) -> GpuInfo:
    """The GPU an index or a (unique prefix of a) UUID names, as CUDA matches UUIDs."""
    if isinstance(item, int):
        match = [g for g in found if g.index == item]
    else:
        match = [g for g in found if g.uuid.startswith(item)]
    if len(match) != 1:
        known = ", ".join(f"{g.index} ({g.uuid})" for g in found) or "none"
        problem = "names several GPUs" if match else "is not a GPU here"
        raise DeviceError(f"{where}: {item} {problem}; NVML lists {known}")
    return match[0]


def _parse_visible(value: str) -> list[int | str]:
    items: list[int | str] = []
    for raw in value.split(","):
        item = raw.strip()
        if item.startswith("MIG-"):
            raise DeviceError(f"CUDA_VISIBLE_DEVICES: {item}: {MIG_REFUSED}")
        if item == "-1" or not item:  # CUDA stops at the first invalid entry
            break
        items.append(int(item) if item.isdigit() else item)
    return items


def visible_gpus(found: list[GpuInfo], environ: Mapping[str, str]) -> list[GpuInfo]:
    """The GPUs sem's own CUDA_VISIBLE_DEVICES lets it see (all when unset)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return list(found)
    items = _parse_visible(value)
    pci_order = environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    mixed = len({g.name for g in found}) > 1
    if any(isinstance(i, int) for i in items) and not pci_order and mixed:
        raise DeviceError(
            f"CUDA_VISIBLE_DEVICES={value}: indexes follow CUDA's fastest-first order on"
            " this box of mixed GPUs, not NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID or use"
            " GPU UUIDs (nvidia-smi -L)"
        )
    return [_find(found, item, f"CUDA_VISIBLE_DEVICES={value}") for item in items]


def select_gpus(
    found: list[GpuInfo], wanted: Sequence[int | str] | None, environ: Mapping[str, str]
) -> Selection:
    """The GPUs sem uses: visible, listed (when a list is given), not in MIG mode."""
    visible = visible_gpus(found, environ)
    candidates = visible
    if wanted is not None:
        candidates = [_find(found, item, "devices") for item in wanted]
        for gpu in candidates:
            if gpu not in visible:
                raise DeviceError(
                    f"devices: GPU {gpu.index} is hidden by sem's CUDA_VISIBLE_DEVICES="
                    f"{environ.get('CUDA_VISIBLE_DEVICES')}"
                )
            if gpu.mig:
                raise DeviceError(f"devices: GPU {gpu.index} is in MIG mode: {MIG_REFUSED}")
    left_out = [
        f"GPU {g.index} ({g.name}) is in MIG mode: {MIG_REFUSED}" for g in candidates if g.mig
    ]
    chosen = sorted(g.index for g in candidates if not g.mig)
    hidden = sorted(g.index for g in found if g not in candidates)
    return Selection(chosen, left_out, hidden)
