"""The supervisor's status page in a real headless Chromium (Debian's package, driven by
Playwright), over `sem run` with stand-in engines: it shows the models ready, follows a removal
without a reload, shows why a model waits, shows throughput, and prints user text as text.

Screenshots go to the test's tmp_path; their paths are printed and attached to the report
(`user_properties`, in the JUnit XML)."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apt import apt_install
from tests.e2e.helpers import SemRun

CHROMIUM = Path("/usr/bin/chromium")
# As root in a container: no sandbox; nothing fetched behind the test's back.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 30_000


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed once per session if missing."""
    if not CHROMIUM.exists():
        started = time.monotonic()
        why_not = apt_install(["chromium", "fonts-liberation"])  # a font for the screenshots
        if why_not is not None:
            pytest.skip(f"no headless browser for the status page test: {why_not}")
        print(f"installed chromium in {time.monotonic() - started:.0f} s")
    if not CHROMIUM.exists():
        pytest.skip(f"chromium installed but {CHROMIUM} is missing")
    return CHROMIUM


@pytest.fixture
def browser_page(chromium: Path) -> Iterator[Any]:
    """A page of a fresh Chromium profile (`--headless`, a new `--user-data-dir`); Playwright
    never downloads a browser of its own here."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    with (
        tempfile.TemporaryDirectory(prefix="sem-chromium-") as profile,
        sync_api.sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def sem_three(tmp_path: Path, model_dir: Path) -> Iterator[SemRun]:
    """Models a and b fit the CPU budget; c (same size) waits for room. b's folder name has
    markup in it, which the page must show as text."""
    odd_dir = tmp_path / "<i>odd</i>"
    shutil.copytree(model_dir, odd_dir)
    config = tmp_path / "models.yaml"
    config.write_text(
        "devices: cpu\ncpu_memory_budget: 2.5GiB\nrecheck_interval: 1s\nmodels:\n"
        f"  - {{name: a, source: 'path:{model_dir}', memory: 1GiB}}\n"
        f"  - {{name: b, source: 'path:{odd_dir}', memory: 1GiB}}\n"
        f"  - {{name: c, source: 'path:{model_dir}', memory: 1GiB}}\n"
    )
    run = SemRun(
        config=config, state_dir=tmp_path / "state",
        engine_python=sys.executable, engine_module="tests.fake_engine",
    ).start()  # fmt: skip
    try:
        run.wait_supervisor(timeout=60)
        yield run
    finally:
        run.kill_all()


def shoot(page: Any, path: Path, request: pytest.FixtureRequest) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    request.node.user_properties.append(("screenshot", str(path)))


@pytest.mark.timeout(900)  # a first run may apt-get install chromium
def test_status_page_shows_models_follows_removal_and_says_why_one_waits(
    sem_three: SemRun, browser_page: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from playwright.sync_api import expect

    page, run = browser_page, sem_three
    elsewhere: list[str] = []
    page.on("request", lambda r: r.url.startswith(run.supervisor) or elsewhere.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{run.supervisor}/")  # redirects to /status
    assert page.url == f"{run.supervisor}/status"
    for name in ("a", "b"):
        expect(page.locator(f'tr[data-model="{name}"] .state').first).to_have_text(
            "ready", timeout=WAIT_MS
        )
    waiting = page.locator('[data-pending="c"]')
    expect(waiting).to_contain_text("pending", timeout=WAIT_MS)
    expect(waiting.locator(".reason")).to_contain_text(
        "needs 1.00 GiB on 1 device; largest free is 0.5 GiB on CPU"
    )
    expect(page.locator('[data-device="cpu"]')).to_contain_text("reserved by sem 2.0 GiB")
    # The event naming b's folder shows the markup as text, and no element came of it.
    expect(page.locator("#events")).to_contain_text("<i>odd</i>", timeout=WAIT_MS)
    assert page.locator("#events i").count() == 0

    with httpx.Client(base_url=run.gateway, timeout=30) as client:
        for _ in range(5):
            answer = client.post("/generate", json={"model": "a", "prompt": "x y", "max_tokens": 8})
            assert answer.status_code == 200, answer.text
    tokens = page.locator('tr[data-model="a"] .tps')
    expect(tokens).not_to_have_text("0.0", timeout=WAIT_MS)
    shoot(page, tmp_path / "status-ready.png", request)

    page.evaluate("window.__sameDocument = true")
    removed = httpx.delete(f"{run.supervisor}/models/a", params={"timeout": 1}, timeout=10)
    assert removed.status_code == 202, removed.text
    expect(page.locator('tr[data-model="a"]')).to_have_count(0, timeout=WAIT_MS)
    # a's memory went to c, which was waiting for it.
    expect(page.locator('tr[data-model="c"] .state').first).to_have_text("ready", timeout=WAIT_MS)
    expect(page.locator('[data-pending="c"]')).to_have_count(0)
    expect(page.locator("#events")).to_contain_text("model_removed")
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    shoot(page, tmp_path / "status-after-removal.png", request)

    assert elsewhere == [], f"the page fetched from elsewhere: {elsewhere}"
    assert errors == [], errors
    # The page's open event stream does not hold the supervisor up when sem stops.
    code, seconds = run.stop(timeout=60)
    assert code == 0, run.output()[-2000:]
    assert seconds < 30 and run.leftovers() == []
