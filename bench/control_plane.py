"""Does a request on a kept-alive connection cost what it should? The control plane's latency.

Sequential GETs on one kept-alive connection against a new connection per GET, for the
supervisor's admin API (/health, /models) and the gateway's /health. Kept alive should be the
cheaper of the two; a ratio far above 1 is the mark of a Nagle/delayed-ACK stall (a response
written in two send() calls on a socket without TCP_NODELAY waits ~40 ms for the client's ACK:
what the supervisor's admin API paid until its listening socket said IPPROTO_TCP). Every route
long-poll, dashboard and script that polls pays it, so this prints the ratio to show it coming back.

    .venv/bin/python bench/control_plane.py [--requests 50] [--reps 3]

Starts its own supervisor (no models) and gateway (static route) on free ports.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Latencies:
    """Per-request seconds on one kept-alive connection and on a new connection each."""

    kept: list[float]
    new: list[float]

    @property
    def ratio(self) -> float:
        """Median kept-alive over median new-connection latency: <= ~1 when healthy."""
        return statistics.median(self.kept) / statistics.median(self.new)


def read_response(sock: socket.socket) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body; return its status line."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response's headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]  # fmt: skip
    if not lengths:
        raise ValueError("response without Content-Length")
    while len(body) < int(lengths[0]):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the response's body")
        body += chunk
    return head.split(b"\r\n", 1)[0]


def timed_get(sock: socket.socket, request: bytes) -> float:
    started = time.perf_counter()
    sock.sendall(request)
    read_response(sock)
    return time.perf_counter() - started


def measure(port: int, path: str, requests: int = 20) -> Latencies:
    """`requests` GETs of `path` on one kept-alive connection and as many on new connections,
    alternated so that the machine's load falls on both alike.

    A plain blocking socket (no TCP_NODELAY, as many clients have): each request is one send(),
    so any stall measured is the server's."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    kept: list[float] = []
    new: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as alive:
        timed_get(alive, request)  # the connection's first exchanges are ACKed at once
        for _ in range(requests):
            kept.append(timed_get(alive, request))
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                timed_get(sock, request)
            new.append(time.perf_counter() - started)
    return Latencies(kept, new)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until `path` answers on `port` (RuntimeError if the process exits or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            measure(port, path, requests=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers {path} on {port}")


@contextmanager
def daemon(argv: list[str], port: int, log: Path) -> Iterator[int]:
    """Run `python -m ...` from the repository until the block ends; yields its port."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_http(port, "/health", proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def supervisor(folder: Path) -> Iterator[int]:
    """A supervisor with no models (its admin API is what is measured); yields its port."""
    config = folder / "models.yaml"
    config.write_text("devices: cpu\nmodels: []\n")
    port = free_port()
    argv = ["supervisor", "--config", str(config), "--port", str(port),
            "--state-dir", str(folder / "state"), "--cache-dir", str(folder / "hf")]  # fmt: skip
    with daemon(argv, port, folder / "supervisor.log") as ready:
        yield ready


@contextmanager
def gateway(folder: Path) -> Iterator[int]:
    """A gateway with a static route (no supervisor to follow); yields its port."""
    port = free_port()
    argv = ["gateway", "--port", str(port), "--route", "fake=http://127.0.0.1:9"]
    with daemon(argv, port, folder / "gateway.log") as ready:
        yield ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="per connection kind and rep")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, supervisor(Path(tmp)) as sup, \
            gateway(Path(tmp)) as gw:  # fmt: skip
        targets = [("supervisor", sup, "/health"), ("supervisor", sup, "/models"),
                   ("gateway", gw, "/health")]  # fmt: skip
        for rep in range(args.reps):  # interleaved: every target once per rep
            for name, port, path in targets:
                got = measure(port, path, args.requests)
                kept, new = statistics.median(got.kept), statistics.median(got.new)
                print(f"rep {rep} {name:10} {path:8} kept-alive p50 {kept * 1000:7.2f} ms"
                      f"  new connection p50 {new * 1000:7.2f} ms"
                      f"  ratio {got.ratio:5.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
