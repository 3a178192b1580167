"""models.yaml: the shipped files load; mistakes are reported with their line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.autoscale_policy import ScaleSettings
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


def test_elastic_fields_parse_with_their_defaults():
    config = parse_config(
        "min_residency: 2m\nmodels:\n"
        "  - {name: a, source: hf://o/a, load: on_demand, idle_unload: 10m}\n"
        "  - {name: b, source: hf://o/b, evictable: true}\n"
        "  - {name: c, source: hf://o/c}\n"
    )
    a, b, c = config.models
    assert config.residency_seconds == 120
    assert a.load == "on_demand" and a.idle_seconds == 600 and a.may_evict
    assert b.load == "always" and b.idle_seconds is None and b.may_evict
    assert not c.may_evict  # always loaded: not evicted unless the operator says so


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("load: sometimes", r"models\[0\].load: Input should be 'always' or 'on_demand'"),
        ("idle_unload: soon", r"models\[0\].idle_unload: .*'soon' is not a duration"),
        ("idle_unload: 0s", r"models\[0\].idle_unload: .*must be a positive duration"),
        ("evictable: maybe", r"models\[0\].evictable: Input should be a valid boolean"),
    ],
)
def test_bad_elastic_fields_name_the_line_and_field(entry: str, problem: str):
    with pytest.raises(ConfigError, match=r"m.yaml:3: " + problem):
        parse_config(f"models:\n  - name: a\n    {entry}\n    source: hf://o/a\n", "m.yaml")


def test_a_negative_min_residency_is_refused():
    with pytest.raises(ConfigError, match=r"min_residency: .*must not be negative"):
        parse_config("min_residency: -1\n")


def test_autoscale_timings_parse_with_their_defaults_and_a_bad_one_is_located():
    config = parse_config("autoscale: {window: 5s, calm: 2m}\n")
    assert config.autoscale.settings() == ScaleSettings(window=5, calm=120, cooldown=30)
    assert parse_config("").autoscale.settings() == ScaleSettings()
    with pytest.raises(ConfigError, match=r"m.yaml:2: autoscale.cooldown: .*must be a positive"):
        parse_config("autoscale:\n  cooldown: 0s\n", "m.yaml")


def test_a_cluster_may_keep_engines_off_its_head():
    assert parse_config("cluster: {address: h:6379}\n").cluster.engines_on_head is True  # type: ignore[union-attr]
    off = parse_config("cluster: {address: h:6379, engines_on_head: false}\n").cluster
    assert off is not None and off.engines_on_head is False
