"""deploy/prometheus.yml scrapes both daemons, and every query of deploy/grafana-dashboard.json
names only metrics that really exist: sem's as its exporters render them, vLLM's as the
installed vLLM declares them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from contract import defaults
from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.routes import RouteWatcher
from supervisor.engine_metrics import EngineScraper, parse
from supervisor.metrics import SupervisorMetrics
from tests.conftest import REPO, ManagerFactory
from tests.e2e.helpers import ENGINE_PYTHON
from tests.supervisor.test_metrics import FakeProcessMemory

DEPLOY = REPO / "deploy"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                 "unless", "bool", "offset", "inf", "nan"}  # fmt: skip


def exported_names(text: str) -> set[str]:
    """The sample names an exposition's `# TYPE` lines promise (with or without samples)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":
            name = name.removesuffix("_total")  # newer clients write the _total name here
        names |= {name + suffix for suffix in _SUFFIXES.get(kind, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (labels, functions and keywords left out)."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if following.startswith("(") or match.group() in _PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(match.group())
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def vllm_declared() -> set[str]:
    """The `vllm:` names the installed vLLM's metrics code declares, with exposition suffixes."""
    found = list(REPO.glob(".venv-engine/lib/python3*/site-packages/vllm/v1/metrics/*.py"))
    if not found:
        pytest.skip(f"no vLLM installed beside {ENGINE_PYTHON} to check vllm: names against")
    names = set()
    for path in found:
        for base in re.findall(r'"(vllm:[a-z_]+)"', path.read_text()):
            names |= {base + suffix for suffixes in _SUFFIXES.values() for suffix in suffixes}
    return names


def test_prometheus_config_scrapes_gateway_and_supervisor() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"sem-gateway", "sem-supervisor"}
    for job, port in (("sem-gateway", defaults.GATEWAY_PORT),
                      ("sem-supervisor", defaults.SUPERVISOR_PORT)):  # fmt: skip
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        assert jobs[job]["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    assert "credentials_file" in (DEPLOY / "prometheus.yml").read_text(), "the token note"


def test_dashboard_is_grafana_json_with_unique_ids_and_queries() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] and p["gridPos"]["w"] <= 24 for p in graphs)
    titles = " ".join(p["title"] for p in graphs).lower()
    for topic in ("states", "memory", "requests per second", "tokens per second", "kv cache",
                  "queue", "restarts"):  # fmt: skip
        assert topic in titles, f"no panel about {topic}"


async def test_dashboard_queries_name_only_metrics_that_exist(
    make_manager: ManagerFactory,
) -> None:
    manager = make_manager()
    gpus = FakeProcessMemory()  # so the per-process GPU families are rendered too
    gpus.found = {"0": {1: 1}}
    supervisor = SupervisorMetrics(manager, manager.events, EngineScraper(), gpus)
    await supervisor.start()
    try:
        exported = exported_names((await supervisor.render()).decode())
    finally:
        await supervisor.aclose()
    async with aiohttp.ClientSession() as session:
        watcher = RouteWatcher("http://127.0.0.1:1", session)
        gateway = GatewayMetrics(watcher, Admission(watcher))
        exported |= exported_names(gateway.render().decode())
    vllm = vllm_declared()

    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    unknown = [
        (title, name)
        for title, expr in dashboard_queries(dashboard)
        for name in metric_names(expr)
        if name not in (vllm if name.startswith("vllm:") else exported)
    ]
    assert unknown == []
    used = {n for _, expr in dashboard_queries(dashboard) for n in metric_names(expr)}
    assert {"vllm:kv_cache_usage_perc", "sem_gateway_requests_total",
            "sem_supervisor_device_reserved_bytes"} <= used  # fmt: skip


def test_metric_names_reads_past_functions_labels_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{model=~"$m",a!="b"}[5m])))'
        " / on (model) group_left y_total + vllm:z"
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "vllm:z"}


async def test_vllm_names_sem_reads_and_fakes_are_declared_by_vllm() -> None:
    """The names sem's code reads, and those the stand-in engine serves, are vLLM's own."""
    from supervisor.engine_metrics import REQUESTS, TOKENS
    from tests.fake_engine import FakeEngine

    response = await FakeEngine("m").metrics(None)  # type: ignore[arg-type]
    assert response.text is not None
    faked = {s.name for f in parse(response.text) for s in f.samples}
    read = {REQUESTS, TOKENS, "vllm:num_requests_running", "vllm:num_requests_waiting"}
    assert len(faked) >= 6
    assert faked | read <= vllm_declared()
