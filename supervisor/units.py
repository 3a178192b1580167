"""Parsing of human sizes ("20GiB", "1.5 GB") and durations ("10s", "500ms", "2m")."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "B": 1,
    "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024,
    "M": 1000**2, "MB": 1000**2, "MI": 1024**2, "MIB": 1024**2,
    "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3,
    "T": 1000**4, "TB": 1000**4, "TI": 1024**4, "TIB": 1024**4,
}  # fmt: skip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

GiB = 1024**3


def parse_size(text: str | int) -> int:
    """Bytes from an int or a size string; raises ValueError naming the accepted forms."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 20GiB, 1.5GB, 512MiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[(unit or "").upper()])


def parse_duration(text: str | float) -> float:
    """Seconds from a number or a duration string ("10s", "500ms", "2m", "1h")."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 10s, 500ms, 2m)")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[unit]


def format_size(num_bytes: int | float) -> str:
    return f"{num_bytes / GiB:.1f} GiB"


def human(num_bytes: float) -> str:
    """1.20 GiB, 12.00 MiB, 3.00 KiB, 512 B."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{int(num_bytes)} B"
