"""The daemon's start-up log names the GPUs it left out and why (issue 12, point 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from supervisor.daemon import log_devices
from tests.gpusim.box import SimBox
from tests.gpusim.ledger import GiB, SimGpu


def test_gpus_left_out_for_mig_or_hidden_are_logged_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    sim = SimBox.create(
        tmp_path, [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB, mig=True), SimGpu(2, 24 * GiB)]
    )
    inventory = sim.inventory("auto", environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    with caplog.at_level(logging.INFO, logger="sem.supervisor"):
        log_devices(inventory, inventory.devices())
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "devices: GPU0 NVIDIA Sim GPU 24.0 GiB"),
        (logging.WARNING, "devices: GPU 1 (NVIDIA Sim GPU) is in MIG mode: sem does not place"
                          " engines on MIG instances; turn MIG off or use other GPUs"),
        (logging.WARNING, "devices: GPUs [2] hidden by CUDA_VISIBLE_DEVICES or devices:"),
    ]  # fmt: skip
