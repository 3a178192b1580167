"""models.yaml: the shipped files load; mistakes are reported with their line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ConfigError, Source, load_config, parse_config
from tests.conftest import REPO


def test_shipped_models_yaml_loads_with_paths_resolved():
    config = load_config(REPO / "models.yaml")
    names = [m.name for m in config.models]
    assert names == ["tiny-llama-base", "tiny-llama-chat"]
    for spec in config.models:
        source = Source.parse(spec.source)
        assert source.kind == "path" and source.path == REPO / "models" / spec.name
    assert config.recheck_seconds == 10


def test_error_names_line_and_field():
    text = "models:\n  - name: a\n    source: path:/x\n    replicas: 0\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, origin="m.yaml")
    assert (
        str(err.value) == "m.yaml:4: models[0].replicas: Input should be greater than or equal to 1"
    )


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"m.yaml:3: models\[0\].replica: Extra inputs"):
        parse_config("models:\n  - name: a\n    replica: 2\n    source: path:/x\n", "m.yaml")


def test_bad_source_and_duplicate_names():
    with pytest.raises(ConfigError, match="is not hf://org/name"):
        parse_config("models:\n  - {name: a, source: 'ftp://x'}\n")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(
            "models:\n  - {name: a, source: 'path:/x'}\n  - {name: a, source: 'path:/y'}\n"
        )


def test_invalid_yaml_names_the_line():
    with pytest.raises(ConfigError, match=r"models.yaml:3: not valid YAML"):
        parse_config("models:\n  - name: [unclosed\n")


def test_engine_args_may_not_override_what_sem_sets():
    with pytest.raises(ConfigError, match=r"engine_args\.port is set by sem"):
        parse_config("models:\n  - {name: a, source: 'path:/x', engine_args: {port: 1}}\n")


def test_hf_source_with_revision():
    source = Source.parse("hf://NousResearch/Llama-2-7b-hf@main")
    assert (source.kind, source.repo, source.revision) == (
        "hf",
        "NousResearch/Llama-2-7b-hf",
        "main",
    )


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
