"""The front door's limits: how long a client may take and how much it may send or hold.

nginx is the reference for the timeouts (its `client_header_timeout`, `client_body_timeout`,
`send_timeout` and `keepalive_timeout`). The body cap is sized for LLM traffic: a 128k-token
context is about 0.5 MB of text, up to ~3 MB when JSON escapes most of it (`\\uXXXX` is 6 bytes
a character), and a chat request may carry a few base64 images (a 4 MB picture is 5.4 MB
encoded): 8 MiB covers that with room, where nginx's 1 MiB default would refuse long contexts.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

MiB = 1024 * 1024


def default_max_connections() -> int:
    """Half the process's open-file limit (`ulimit -n`): every client connection may need one
    connection to an engine, and the rest (listening sockets, logs) needs a few."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) // 2 - 16)


@dataclass(frozen=True)
class Limits:
    """Every front-door limit, with its default (the daemon's options set each one)."""

    header_timeout: float = 10.0  # s from accepting a connection to its first request's headers
    body_timeout: float = 30.0  # s between two reads of a request body (and to get memory for it)
    client_write_timeout: float = 30.0  # s a client may leave what it was sent unread
    keepalive_timeout: float = 75.0  # s an idle connection is kept between requests
    max_connections: int = 0  # open client connections at once; 0: default_max_connections()
    max_body: int = 8 * MiB  # bytes of one request body
    max_body_memory: int = 256 * MiB  # bytes of request bodies held at once, by all requests
    max_json_depth: int = 64  # nesting of arrays and objects in a request body

    @property
    def connections(self) -> int:
        """The connection cap in force."""
        return self.max_connections or default_max_connections()
