"""engine_args and env may not override what sem owns: refused by name, prefix and key=value."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from supervisor.api import create_app
from supervisor.config import ConfigError, ModelSpec, parse_config
from supervisor.fence import FENCED_ENV, FENCED_FLAGS
from tests.conftest import REPO, ManagerFactory


def spec(**fields: object) -> ModelSpec:
    return ModelSpec(name="m", source="path:/x", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", sorted(FENCED_FLAGS))
@pytest.mark.parametrize("form", ["dashes", "underscores", "key=value", "dotted"])
def test_every_fenced_flag_is_refused_in_every_spelling(flag: str, form: str):
    key = {
        "dashes": flag,
        "underscores": flag.replace("-", "_"),
        "key=value": f"{flag}=1",
        "dotted": f"{flag}.x",
    }[form]
    with pytest.raises(ValidationError, match=rf"engine_args\.{key} is set by sem \(--{flag}\)"):
        spec(engine_args={key: "1"})


@pytest.mark.parametrize(
    ("key", "flag"),
    [
        ("hos", "host"),  # the engine bound 127.0.0.2 with {"hos": "127.0.0.2"}
        ("host=127.0.0.2", "host"),
        ("gpu_memory", "gpu-memory-utilization"),
        ("kv-cache-mem", "kv-cache-memory-bytes"),
        ("max-num-s", "max-num-seqs"),
        ("served", "served-model-name"),
        ("tensor_parallel", "tensor-parallel-size"),
        ("--port", "port"),
        ("API_KEY", "api-key"),
    ],
)
def test_argparse_abbreviations_of_fenced_flags_are_refused(key: str, flag: str):
    with pytest.raises(ValidationError, match=rf"is set by sem \(--{flag}\)"):
        spec(engine_args={key: True})


@pytest.mark.parametrize(
    "args",
    [
        {"enforce_eager": True},
        {"enable_prefix_caching": True},
        {"dtype": "float16", "kv_cache_dtype": "fp8"},
        {"max_num_batched_tokens": 8192},
        {"model_impl": "vllm"},  # starts with a fenced flag's name, but is another flag
        {"compilation_config.level": 3},
        {"hf_overrides": '{"rope_scaling": null}'},
    ],
)
def test_ordinary_engine_args_pass(args: dict[str, object]):
    assert spec(engine_args=args).engine_args == args


def test_a_key_that_is_not_a_flag_name_is_refused():
    with pytest.raises(ValidationError, match=r"engine_args\.enable prefix caching: a key is"):
        spec(engine_args={"enable prefix caching": True})
    with pytest.raises(ValidationError, match=r"write \{flag: value\}"):
        spec(engine_args={"seed=1": True})


def test_a_value_that_reads_as_another_flag_is_refused():
    with pytest.raises(ValidationError, match=r"engine_args\.tokenizer: a value may not start"):
        spec(engine_args={"tokenizer": "--host=127.0.0.2"})


@pytest.mark.parametrize("key", sorted(FENCED_ENV))
def test_every_fenced_env_key_is_refused(key: str):
    with pytest.raises(ValidationError, match=rf"env\.{key} is set by sem"):
        spec(env={key: "x"})


def test_env_names_with_equals_signs_are_refused():
    """execve reads `CUDA_VISIBLE_DEVICES=0=x` as CUDA_VISIBLE_DEVICES set to `0=x`."""
    with pytest.raises(ValidationError, match=r"env\.CUDA_VISIBLE_DEVICES=0: not a variable"):
        spec(env={"CUDA_VISIBLE_DEVICES=0": "x"})


def test_ordinary_env_passes():
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}
    assert spec(env=env).env == env


def test_models_yaml_names_the_line_and_field():
    text = "models:\n  - name: a\n    source: 'path:/x'\n    engine_args: {hos: 127.0.0.2}\n"
    with pytest.raises(ConfigError, match=r"models.yaml:4: models\[0\]\.engine_args: .*--host"):
        parse_config(text)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"engine_args": {"hos": "127.0.0.2"}}, "body.engine_args", "--host"),
        ({"engine_args": {"gpu_memory_utilization": 0.9}}, "body.engine_args", "reserved"),
        ({"env": {"SEM_REPLICA_ID": "other-0"}}, "body.env", "restart"),
        ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "body.env", "arbitrary code"),
    ],
)
async def test_the_admin_api_answers_422_naming_the_field(
    make_manager: ManagerFactory, body: dict[str, object], field: str, says: str
):
    manager = make_manager()
    app = create_app(manager, manager.events, token="t")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
        response = await client.post(
            "/models",
            json={"name": "m", "source": "path:/x", **body},
            headers={"Authorization": "Bearer t"},
        )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert message.startswith(field) and says in message
    assert manager.entries() == []


def test_the_configuration_page_lists_every_fenced_name():
    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [f for f in FENCED_FLAGS if f"`{f.replace('-', '_')}" not in page]
    missing += [key for key in FENCED_ENV if f"`{key}`" not in page]
    assert missing == []
