"""A model's source: `hf://org/name[@revision]` or `path:/some/dir`, checked the way the hub
and the cache will use it (a bad one is refused here, never a 500 or a path outside the cache)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # public, documented

_HF_SOURCE = re.compile(r"^hf://([^@/]+/[^@/]+)(?:@(.+))?$")
# A branch, tag or commit, as git's check-ref-format allows them (ASCII subset): `refs/pr/1`
# is one. huggingface_hub stores a revision at `<repo>/refs/<revision>` unchecked, so one with
# an empty, `.`-led or `..` part would name a file outside the cache.
_REF_PART = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
_REF_MAX = 255


@dataclass(frozen=True)
class Source:
    """Where a model's files come from: a hub repository or a local folder."""

    kind: Literal["hf", "path"]
    repo: str = ""  # hf: org/name
    revision: str | None = None  # hf: branch, tag or commit
    path: Path | None = None  # path: absolute folder

    @classmethod
    def parse(cls, text: str, base_dir: Path | None = None) -> Source:
        """ValueError, naming the part, for a source the hub or the cache could not take."""
        if match := _HF_SOURCE.match(text):
            repo, revision = match.group(1), match.group(2)
            try:
                validate_repo_id(repo)  # huggingface_hub's own rule, the one its calls apply
            except HFValidationError as exc:
                raise ValueError(f"source {text!r}: {exc}") from None
            if revision is not None and (why := _bad_revision(revision)):
                raise ValueError(f"source {text!r}: revision {revision!r} {why}")
            return cls(kind="hf", repo=repo, revision=revision)
        if text.startswith("path:") and len(text) > len("path:"):
            path = Path(text[len("path:") :]).expanduser()
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            return cls(kind="path", path=path.resolve())
        raise ValueError(f"source {text!r} is not hf://org/name[@revision] or path:/some/dir")

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")
        return f"path:{self.path}"


def _bad_revision(revision: str) -> str | None:
    """Why `revision` is not a safe branch, tag or commit name; None if it is."""
    if len(revision) > _REF_MAX:
        return f"is longer than {_REF_MAX} characters"
    for part in revision.split("/"):
        if not _REF_PART.match(part) or part.endswith(".lock") or ".." in part:
            return (
                "is not a branch, tag or commit name (parts of letters, digits, `_.+-` joined"
                " by `/`; none empty, led by `.`, holding `..` or ending in `.lock`)"
            )
    return None
