"""The demo models are complete Hugging Face folders, rebuilt byte for byte from their seeds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.helpers import ENGINE_PYTHON

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]  # fmt: skip


@pytest.mark.parametrize("name", ["tiny-llama-base", "tiny-llama-chat"])
def test_demo_model_folder_is_complete(name: str):
    folder = REPO / "models" / name
    for file in FILES:
        assert (folder / file).is_file(), f"{folder / file} missing: run `make models`"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 64, "head_dim 16 crashes vLLM"
    has_template = (folder / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text()
    )
    assert has_template == (name == "tiny-llama-chat")


def test_rebuilding_gives_identical_files(tmp_path: Path):
    subprocess.run(
        [ENGINE_PYTHON, str(REPO / "scripts" / "build_demo_models.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    for name in ["tiny-llama-base", "tiny-llama-chat"]:
        built, shipped = tmp_path / name, REPO / "models" / name
        assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in shipped.iterdir())
        for path in built.iterdir():
            assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
