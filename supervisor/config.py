"""models.yaml: the desired state, validated, with errors that name the line and the field."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)  # fmt: skip
from pydantic_core import PydanticCustomError

from supervisor.autoscale_policy import ScaleSettings
from supervisor.fence import EngineArg as EngineArg  # re-exported: engine.py's value type
from supervisor.fence import check_engine_args, check_env
from supervisor.gpu_selection import check_device_list
from supervisor.source import Source as Source  # re-exported: where most code finds it
from supervisor.units import parse_duration, parse_size

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ConfigError(ValueError):
    """A models.yaml (or a model spec) that cannot be used; the message names where and why."""


class LoadMode(StrEnum):
    """How a model is kept loaded (docs/elastic.md)."""

    ALWAYS = "always"  # its replicas run from the start, whatever the traffic (the default)
    ON_DEMAND = "on_demand"  # starts unloaded; the first request for it loads it


class ReplicaRange(BaseModel):
    """`replicas: {min, max, target_queue_per_replica}`: autoscaled within the range
    (autoscale_policy.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(default=1, ge=1, le=64)
    max: int = Field(ge=1, le=64)
    target_queue_per_replica: float = Field(
        default=4.0, gt=0, description="requests queued per replica above which one is added"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


_COUNT: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(ge=1, le=64)])
_RANGE: TypeAdapter[ReplicaRange] = TypeAdapter(ReplicaRange)


class ModelSpec(BaseModel):
    """One model as the operator asks for it (models.yaml entry or POST /models body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="name clients use in the `model` field")
    source: str = Field(description="hf://org/name[@revision] or path:/some/dir")
    replicas: int | ReplicaRange = Field(
        default=1, description="a count (1-64), or {min, max, target_queue_per_replica}"
    )
    tensor_parallel: int = Field(default=1, ge=1, le=16)
    memory: str = Field(default="auto", description="per replica: auto (estimated) or e.g. 20GiB")
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    kv_cache_tokens: int | None = Field(
        default=None, ge=16, description="KV cache to reserve; default 2 x max_model_len"
    )
    priority: int = Field(default=0, description="higher is placed first when memory is short")
    engine_args: dict[str, EngineArg] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    load: LoadMode = Field(default=LoadMode.ALWAYS, description="always or on_demand")
    idle_unload: str | float | None = Field(
        default=None, description="unload after this long without a request, e.g. 10m"
    )
    evictable: bool | None = Field(
        default=None,
        description="may be unloaded to make room for another; default: if load is on_demand",
    )

    @field_validator("idle_unload")
    @classmethod
    def _check_idle_unload(cls, value: str | float | None) -> str | float | None:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError("idle_unload must be a positive duration")
        return value

    @field_validator("replicas", mode="plain")
    @classmethod
    def _check_replicas(cls, value: object) -> int | ReplicaRange:
        """A count or a range, each with its own errors (a plain union would report both)."""
        adapter = _RANGE if isinstance(value, dict | ReplicaRange) else _COUNT
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = f"{format_loc(tuple(first['loc']))}: " if first["loc"] else ""
            raise PydanticCustomError(first["type"], where + first["msg"]) from None

    @field_serializer("replicas")
    def _dump_replicas(self, value: int | ReplicaRange) -> int | dict[str, Any]:
        return value if isinstance(value, int) else value.model_dump()

    @property
    def min_replicas(self) -> int:
        """The replicas it starts with: the count, or the range's minimum."""
        return self.replicas.min if isinstance(self.replicas, ReplicaRange) else self.replicas

    @property
    def autoscale(self) -> ReplicaRange | None:
        return self.replicas if isinstance(self.replicas, ReplicaRange) else None

    @property
    def may_evict(self) -> bool:
        """`evictable`, or by default: a model loaded on demand may go, one always loaded not."""
        return self.load is LoadMode.ON_DEMAND if self.evictable is None else self.evictable

    @property
    def idle_seconds(self) -> float | None:
        """`idle_unload` in seconds; None: never unloaded for idleness."""
        return None if self.idle_unload is None else parse_duration(self.idle_unload)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        Source.parse(value)
        return value

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        if value != "auto":
            parse_size(value)
        return value

    @field_validator("engine_args")
    @classmethod
    def _check_engine_args(cls, value: dict[str, EngineArg]) -> dict[str, EngineArg]:
        check_engine_args(value)  # what sem owns (fence.py)
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        check_env(value)
        return value


class CacheConfig(BaseModel):
    """Where hf:// models are cached and how much disk they may take."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(default=None, description="default: HF_HUB_CACHE")
    budget: str | int | None = Field(default=None, description="the most the cache may hold")
    margin: str | int = Field(default="1GiB", description="free disk kept after a download")
    parallel_files: int = Field(default=8, ge=1, le=64, description="files per model at once")

    @field_validator("budget", "margin")
    @classmethod
    def _check_size(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_size(value)
        return value


class AutoscaleConfig(BaseModel):
    """The timings of replica autoscaling (docs/elastic.md#replica-autoscaling)."""

    model_config = ConfigDict(extra="forbid")

    window: str | float = Field(default="10s", description="queue above target this long: +1")
    calm: str | float = Field(default="60s", description="calm this long: -1")
    cooldown: str | float = Field(default="30s", description="after each change, no other")

    @field_validator("window", "calm", "cooldown")
    @classmethod
    def _check_positive(cls, value: str | float) -> str | float:
        if parse_duration(value) <= 0:
            raise ValueError("must be a positive duration")
        return value

    def settings(self) -> ScaleSettings:
        return ScaleSettings(window=parse_duration(self.window), calm=parse_duration(self.calm),
                             cooldown=parse_duration(self.cooldown))  # fmt: skip


class ClusterConfig(BaseModel):
    """Place models over a Ray cluster's nodes instead of this machine (docs/cluster.md)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["ray"] = "ray"
    address: str = Field(default="auto", description="the head's host:port, or auto (RAY_ADDRESS)")
    engines_on_head: bool = Field(
        default=True,
        description="false: no replica on the head node (its loss, Ray's GCS, stops the cluster)",
    )


class SemConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    devices: Literal["auto", "cpu", "gpu"] | list[int | str] = Field(
        default="auto", description="auto, cpu, gpu, or GPU indexes (NVML's) / UUIDs: [0, 1]"
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)
    cluster: ClusterConfig | None = Field(default=None, description="absent: this machine only")
    cpu_memory_budget: str = Field(default="auto", description="CPU mode: memory sem may use")
    recheck_interval: str | float = Field(default="10s")
    min_residency: str | float = Field(
        default="30s", description="a model loaded on demand stays at least this long"
    )
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    models: list[ModelSpec] = Field(default_factory=list)

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str | list[int | str]) -> str | list[int | str]:
        if isinstance(value, str):
            return value
        items = [int(v) if isinstance(v, str) and v.isdigit() else v for v in value]
        check_device_list(items)
        return items

    @field_validator("recheck_interval")
    @classmethod
    def _check_interval(cls, value: str | float) -> str | float:
        if parse_duration(value) <= 0:
            raise ValueError("recheck_interval must be positive")
        return value

    @field_validator("min_residency")
    @classmethod
    def _check_residency(cls, value: str | float) -> str | float:
        if parse_duration(value) < 0:
            raise ValueError("min_residency must not be negative")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> SemConfig:
        seen: set[str] = set()
        for spec in self.models:
            if spec.name in seen:
                raise ValueError(f"model name {spec.name!r} is listed twice")
            seen.add(spec.name)
        return self

    @property
    def recheck_seconds(self) -> float:
        return parse_duration(self.recheck_interval)

    @property
    def residency_seconds(self) -> float:
        return parse_duration(self.min_residency)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line in the YAML document of the value at a pydantic error location."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key]
            node = match[0] if match else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            node = node.value[key] if key < len(node.value) else None
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('models', 1, 'replicas') -> 'models[1].replicas'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@dataclass(frozen=True)
class InvalidModel:
    """A models.yaml entry skipped at start; `problem` names its line and field."""

    name: str
    problem: str


def parse_config(
    text: str,
    origin: str = "models.yaml",
    base_dir: Path | None = None,
    skipped: list[InvalidModel] | None = None,
) -> SemConfig:
    """Validate YAML text; ConfigError messages read `origin:LINE: field: problem`.

    With a `skipped` list (at start), an invalid model entry is left out and recorded there
    instead of failing the whole file: one bad model must not keep the others from running.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}:1: expected a mapping with a `models:` list")
    if skipped is not None and isinstance(data.get("models"), list):
        data = dict(data, models=_valid_models(data["models"], node, origin, skipped))
    try:
        config = SemConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, node, origin)) from None
    if base_dir is not None:
        # Resolve path: sources against the file's folder, so the file works from any cwd.
        models = [
            spec.model_copy(update={"source": str(Source.parse(spec.source, base_dir))})
            for spec in config.models
        ]
        config = config.model_copy(update={"models": models})
        if config.cache.dir is not None:
            cache_dir = Path(config.cache.dir).expanduser()
            cache = config.cache.model_copy(update={"dir": str(base_dir / cache_dir)})
            config = config.model_copy(update={"cache": cache})
    return config


def _problems(
    exc: ValidationError, node: yaml.Node | None, origin: str, prefix: tuple[int | str, ...] = ()
) -> str:
    """One `origin:LINE: field: problem` line per error."""
    problems = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        line = _line_of(node, loc)
        where = f"{origin}:{line}" if line else origin
        problems.append(f"{where}: {format_loc(loc)}: {err['msg']}")
    return "\n".join(problems)


def _valid_models(
    items: list[Any], node: yaml.Node | None, origin: str, skipped: list[InvalidModel]
) -> list[Any]:
    """The entries that validate as a ModelSpec; the others go to `skipped`."""
    kept = []
    for i, item in enumerate(items):
        try:
            ModelSpec.model_validate(item)
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            label = name if isinstance(name, str) else f"models[{i}]"
            skipped.append(InvalidModel(label, _problems(exc, node, origin, ("models", i))))
            continue
        kept.append(item)
    return kept


def load_config(path: Path, skipped: list[InvalidModel] | None = None) -> SemConfig:
    """The file at `path`; see parse_config for `skipped`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, origin=str(path), base_dir=path.parent.resolve(), skipped=skipped)
