"""Who may reach the admin API: the Host header check and the loopback test behind the token rule.

A web page the operator opens can make their browser send requests to 127.0.0.1:8001 under a
name it controls (DNS rebinding): the browser then sends that name in `Host`. Answering only
requests whose Host is a loopback name, the address the API is bound to, or a name the operator
added (`--allowed-hosts`) shuts that door; it is the check Django (ALLOWED_HOSTS) and the
webpack/Vite dev servers make. A page may also post straight to 127.0.0.1 (cross-site request
forgery: a form needs no CORS preflight); the browser then says where it comes from in `Origin`,
which must name an allowed host too (the `sem` CLI and other programs send none). The API sends
no CORS headers, so no other origin may read an answer either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from contract.errors import error_body

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for a wildcard
    (0.0.0.0, ::) or any other name, which may be reachable from elsewhere."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names answered: loopback names, the bound address, and the operator's extra ones
    (`*` turns the check off)."""
    names = {bind_host.strip("[]").lower(), *LOOPBACK_NAMES}
    names.update(name.strip().strip("[]").lower() for name in extra if name.strip())
    return frozenset(names)


def host_name(header: str) -> str:
    """`Host` without its port, lowercased: `[::1]:8001` -> `::1`, `Example:80` -> `example`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Pure decision: may a request with this Host header be answered?"""
    if ANY_HOST in allowed:
        return True
    if not header:
        return False  # HTTP/1.1 requires Host; a request without one is not a browser's
    name = host_name(header)
    return name in allowed or is_loopback(name)


def origin_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Pure decision: no `Origin` (not a browser), or one whose host may be answered."""
    if header is None or ANY_HOST in allowed:
        return True
    host = urlsplit(header.strip()).hostname  # None for "null" (a sandboxed page, a file)
    return host is not None and host_allowed(host, allowed)


def refusal(
    host: str | None, origin: str | None, allowed: frozenset[str]
) -> tuple[str, str | None] | None:
    """The header that makes a request unwelcome and its value, or None if it may be answered."""
    if not host_allowed(host, allowed):
        return "Host", host
    if not origin_allowed(origin, allowed):
        return "Origin", origin
    return None


class HostCheck:
    """ASGI middleware: 403 in the API's error shape for a Host, or a browser's Origin, that
    names no allowed host."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k: v.decode("latin-1") for k, v in scope["headers"]}
            refused = refusal(headers.get(b"host"), headers.get(b"origin"), self.allowed)
            if refused is not None:
                name, value = refused
                message = (
                    f"{name} {value!r} is not allowed: the admin API answers to"
                    f" {', '.join(sorted(self.allowed))}; add names with --allowed-hosts"
                )
                body = error_body(f"{name.lower()}_not_allowed", message, 403, param=name)
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
