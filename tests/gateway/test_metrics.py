"""The gateway's metrics as a scrape shows them: histogram buckets cumulative with Prometheus'
`le` (a value on a bound counts in that bucket), counters per label set."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.routes import RouteWatcher


def scraped(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_latencies_land_in_the_buckets_prometheus_means() -> None:
    watcher = RouteWatcher("http://127.0.0.1:1", None)  # type: ignore[arg-type]
    metrics = GatewayMetrics(watcher, Admission(watcher))
    model = metrics.model("m")
    for seconds in (0.005, 0.0051, 0.3, 301.0):
        model.request_seconds.observe(seconds)
    model.count("/v1/completions", "ok")
    model.count("/v1/completions", "ok")
    model.retried("resume")
    got = scraped(metrics)

    def bucket(le: str) -> float:
        return got[("sem_gateway_request_seconds_bucket", (("le", le), ("model", "m")))]

    assert bucket("0.005") == 1  # on the bound: in it
    assert bucket("0.01") == 2 and bucket("0.25") == 2 and bucket("0.5") == 3
    assert bucket("300.0") == 3 and bucket("+Inf") == 4
    assert got[("sem_gateway_request_seconds_count", (("model", "m"),))] == 4
    assert got[("sem_gateway_request_seconds_sum", (("model", "m"),))] == 0.005 + 0.0051 + 0.3 + 301
    requests = ("model", "m"), ("outcome", "ok"), ("route", "/v1/completions")
    assert got[("sem_gateway_requests_total", requests)] == 2
    assert got[("sem_gateway_retries_total", (("kind", "resume"), ("model", "m")))] == 1
    assert got[("sem_gateway_retries_total", (("kind", "replay"), ("model", "m")))] == 0
