"""The cache folder on disk, in huggingface_hub's layout (see hub.py's docstring): where a
repo's files are, which snapshots sem has complete, their listing, last use and deletion.

Everything here blocks on the disk and runs in the cache's worker threads. Every path built from
a name (a repo, a revision, a file the hub lists, a ref's content) goes through `inside` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name

from supervisor.config import Source
from supervisor.errors import InvalidSource

COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class CachedModel:
    repo: str
    commit: str
    revisions: list[str]
    size: int
    path: Path
    completed: float
    last_used: float | None

    def to_json(self) -> dict[str, Any]:
        sources = [f"hf://{self.repo}" + ("" if r == "main" else f"@{r}") for r in self.revisions]
        return {
            "source": sources[0] if sources else f"hf://{self.repo}@{self.commit}",
            "sources": sources or [f"hf://{self.repo}@{self.commit}"],
            "repo": self.repo,
            "revision": self.revisions[0] if self.revisions else self.commit,
            "commit": self.commit,
            "size": self.size,
            "path": str(self.path),
            "completed": self.completed,
            "last_used": self.last_used,
        }


class CacheFolder:
    """One HF cache folder; every method blocks."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    # -- where things are ----------------------------------------------------------------------

    def storage(self, repo: str) -> Path:
        try:
            folder = repo_folder_name(repo_id=repo, repo_type="model")
        except HFValidationError as exc:
            raise InvalidSource(f"hf://{repo}: {exc}") from None
        return inside(self.cache_dir, self.cache_dir / folder)

    def _manifest(self, repo: str, commit: str) -> Path:
        return inside(self.storage(repo), self.storage(repo) / "sem" / f"{commit}.json")

    def _commit_of(self, source: Source) -> str | None:
        """The commit a revision names: itself, or what its ref file holds (a commit, else None)."""
        revision = source.revision or "main"
        if COMMIT.match(revision):
            return revision
        refs = self.storage(source.repo) / "refs"
        commit = _read_small(inside(refs, refs / revision)).strip()
        return commit if COMMIT.match(commit) else None

    def local(self, source: Source) -> Path | None:
        """The snapshot folder if sem has it complete (no network); None otherwise."""
        commit = self._commit_of(source)
        if commit is None:
            return None
        files = read_json(self._manifest(source.repo, commit)).get("files")
        if not isinstance(files, dict):
            return None
        storage = self.storage(source.repo)
        snapshot = storage / "snapshots" / commit
        for path, size in files.items():
            try:
                if inside(storage, snapshot / path).stat().st_size != size:
                    return None
            except (OSError, InvalidSource):
                return None
        return snapshot

    # -- disk ----------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        folder = self.cache_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def used_bytes(self) -> int:
        """Bytes of every blob in the cache folder (complete or not), sem's or not."""
        total = 0
        for blobs in self.cache_dir.glob("models--*/blobs"):
            for entry in os.scandir(blobs):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def touch(self, source: Source) -> None:
        """Record that an engine starts from this snapshot now."""
        commit = self._commit_of(source)
        if commit is None:
            return
        manifest = self._manifest(source.repo, commit)
        data = read_json(manifest)
        if data:
            data["last_used"] = time.time()
            write_atomic(manifest, json.dumps(data, indent=1))

    # -- listing and freeing -------------------------------------------------------------------

    def listing(self) -> list[CachedModel]:
        out = []
        for manifest in sorted(self.cache_dir.glob("models--*/sem/*.json")):
            data = read_json(manifest)
            if not data:
                continue
            storage = manifest.parent.parent
            try:
                source = Source.parse(f"hf://{data['repo']}@{data['commit']}")
            except (ValueError, KeyError):
                continue  # not a manifest sem wrote
            if self.local(source) is None:
                continue  # a file went missing: not cached any more
            refs = storage / "refs"
            revisions = sorted(
                str(ref.relative_to(refs))
                for ref in refs.rglob("*")
                if _read_small(ref).strip() == data["commit"]
            )
            out.append(
                CachedModel(
                    repo=data["repo"], commit=data["commit"], revisions=revisions,
                    size=data["size"], path=storage / "snapshots" / data["commit"],
                    completed=data["completed"], last_used=data.get("last_used"),
                )
            )  # fmt: skip
        return out

    def delete(self, repo: str, commit: str) -> int:
        """Free one snapshot: its links, the blobs no other snapshot uses, refs to it. Bytes."""
        if not COMMIT.match(commit):
            raise InvalidSource(f"hf://{repo}: {commit!r} is not a commit")
        storage = self.storage(repo)
        snapshots = storage / "snapshots"
        keep: set[str] = set()
        for other in snapshots.iterdir() if snapshots.is_dir() else []:
            if other.name != commit:
                keep |= {
                    os.path.basename(os.readlink(p)) for p in other.rglob("*") if p.is_symlink()
                }
        freed = 0
        snapshot = snapshots / commit
        for link in snapshot.rglob("*") if snapshot.is_dir() else []:
            if link.is_symlink() and (name := _blob_name(link)) not in keep:
                blob = inside(storage, storage / "blobs" / name)
                with contextlib.suppress(FileNotFoundError):
                    freed += blob.stat().st_size
                    blob.unlink()
        shutil.rmtree(snapshot, ignore_errors=True)
        self._manifest(repo, commit).unlink(missing_ok=True)
        refs = storage / "refs"
        for ref in list(refs.rglob("*")) if refs.is_dir() else []:
            if _read_small(ref).strip() == commit:
                ref.unlink()
        if not snapshots.is_dir() or not any(snapshots.iterdir()):
            shutil.rmtree(storage, ignore_errors=True)  # nothing left of the repo: partials too
        return freed


def _blob_name(link: Path) -> str:
    return os.path.basename(os.readlink(link))


def incomplete(blob: Path) -> Path:
    return blob.with_name(blob.name + ".incomplete")


def inside(base: Path, path: Path) -> Path:
    """`path`, if it stays within `base` once `..` and links are resolved; InvalidSource if not.

    Every path built from a name (a repo, a revision, a file the hub lists, a ref's content)
    goes through here before it is read, written or deleted.
    """
    if not path.resolve().is_relative_to(base.resolve()):
        raise InvalidSource(f"{path} is outside the cache folder {base}")
    return path


def _read_small(path: Path) -> str:
    """A ref or manifest: a regular file's text, else "" (a FIFO or device would block a read)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return ""
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_small(path))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
