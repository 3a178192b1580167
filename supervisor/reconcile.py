"""What a new models.yaml changes, compared with the one applied last (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supervisor.config import ModelSpec


@dataclass(frozen=True)
class ConfigDiff:
    added: list[ModelSpec] = field(default_factory=list)  # new in the file
    changed: list[ModelSpec] = field(default_factory=list)  # in both, with another spec
    removed: list[str] = field(default_factory=list)  # no longer in the file
    unchanged: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": [s.name for s in self.added],
            "changed": [s.name for s in self.changed],
            "removed": self.removed,
            "unchanged": self.unchanged,
        }

    def __str__(self) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in self.to_json().items() if v]
        return "; ".join(parts) or "no models"


def diff_config(applied: dict[str, ModelSpec], new: list[ModelSpec]) -> ConfigDiff:
    """The file's changes since it was last applied: what a reload acts on.

    Acting on changes (not on the whole file) keeps runtime edits: a model removed with
    `sem rm` stays removed until its entry in the file changes, and one added with `sem add`
    stays until the file names it.
    """
    diff = ConfigDiff()
    for spec in new:
        before = applied.get(spec.name)
        if before is None:
            diff.added.append(spec)
        elif before != spec:
            diff.changed.append(spec)
        else:
            diff.unchanged.append(spec.name)
    names = {s.name for s in new}
    diff.removed.extend(name for name in applied if name not in names)
    return diff
