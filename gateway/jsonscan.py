"""Values read from an engine's raw JSON by searching for their keys, not by parsing it: what the
gateway needs from an answer or a stream's end (its finish reasons, its token count) costs a
search from where the key is likely to be, where a parse (or a regex over every position) would
cost more than relaying the answer.

Sound for JSON: a key is found only as a key, since quotes inside JSON strings are escaped, so
generated text cannot fake one. Each function takes the bytes as latin-1 (`view`: one character
per byte, at the same index), which compiled code searches directly (see gateway.ending).
"""

from __future__ import annotations

from typing import Final

_BLANK: Final = " \t\r\n"  # JSON's whitespace


def value_at(view: str, at: int) -> int:
    """Where the value after a key (`at`: just past its colon) begins."""
    size = len(view)
    while at < size and view[at] in _BLANK:
        at += 1
    return at


def string_at(view: str, at: int) -> str | None:
    """The string value after a key (`at`: just past its colon); None if the value is not a
    non-empty string (null, a number, an object)."""
    at = value_at(view, at)
    if view[at : at + 1] != '"':
        return None
    end = view.find('"', at + 1)
    return view[at + 1 : end] if end > at + 1 else None


def int_at(view: str, at: int) -> int | None:
    """The non-negative integer value after a key (`at`: just past its colon); None if there is
    none."""
    start = end = value_at(view, at)
    size = len(view)
    while end < size and "0" <= view[end] <= "9":
        end += 1
    return int(view[start:end]) if end > start else None
