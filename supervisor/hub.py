"""The blocking half of the model cache: huggingface_hub calls (the files on disk: cache_folder.py).

Everything here blocks (network, disk) and runs in the cache's worker threads (cache.py owns
them). Files go where huggingface_hub puts them, in the standard cache layout, so a user's
earlier downloads are reused and `snapshot_download(..., local_files_only=True)` finds sem's:

    <cache>/models--org--name/blobs/<etag>              file contents, named by their ETag
    <cache>/models--org--name/blobs/<etag>.incomplete   a download in progress: resumed by Range
    <cache>/models--org--name/snapshots/<commit>/<file> relative symlinks to the blobs
    <cache>/models--org--name/refs/<revision>           the commit a branch or tag pointed to
    <cache>/models--org--name/sem/<commit>.json         sem's manifest: written last, so a
                                                        snapshot is cached only when complete

Listing, sizes and ETags come from the hub (`model_info(files_metadata=True)`, one HEAD per
file, as `hf_hub_download` does); the bytes come through huggingface_hub's own `http_get`, with
`resume_size` so that a download killed half-way goes on from where it stopped (huggingface_hub's
`hf_hub_download` writes to a process-unique temporary file and starts such a file over).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import (
    get_hf_file_metadata,
    hf_hub_url,
    http_get,
)
from huggingface_hub.utils._fixes import WeakFileLock
from huggingface_hub.utils._headers import build_hf_headers

from supervisor.cache_folder import (
    CacheFolder,
    incomplete,
    inside,
    read_json,
    write_atomic,
)
from supervisor.config import Source
from supervisor.errors import (
    CacheError,
    HubAccessDenied,
    HubForbidden,
    HubUnreachable,
    InsufficientDisk,
    InvalidSource,
    RepoNotFound,
    RevisionNotFound,
)

# What vLLM reads besides the weights: configs, tokenizers, chat templates, remote code.
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
_FALLBACK_WEIGHTS = ("*.bin", "*.pt")  # only when a repo has no safetensors at all


def select_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """(wanted, skipped): top-level config/tokenizer files and the safetensors weights.

    Folders (`original/` and the like) and other weight formats (.bin, .pth, .gguf) are skipped
    when safetensors exist; a repo without safetensors gets its `*.bin`/`*.pt` weights instead.
    """
    top = [p for p in paths if "/" not in p]
    has_safetensors = any(p.endswith(".safetensors") for p in top)
    weights = ("*.safetensors",) if has_safetensors else _FALLBACK_WEIGHTS
    patterns = _SIDE_FILES + weights
    wanted = [p for p in top if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    return wanted, [p for p in paths if p not in set(wanted)]


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    etag: str  # the blob's name in the cache
    url: str  # where its bytes are (after the hub's redirect, if any)


@dataclass(frozen=True)
class Plan:
    """What caching one source takes, once the hub has been asked."""

    source: Source
    commit: str
    files: list[RemoteFile]
    skipped: list[str]
    present: int  # bytes already on disk: complete blobs and partial (.incomplete) ones

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> int:
        return self.total - self.present


class DownloadCancelled(Exception):
    """The job was cancelled (shutdown, or another file of it failed): stop at the next chunk."""


ProgressHook = Callable[[int], None]


def _counter(on_bytes: ProgressHook, cancelled: threading.Event) -> type:
    """A stand-in for tqdm that huggingface_hub's `http_get` feeds with each chunk's size."""

    class ByteCounter:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> ByteCounter:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def close(self) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            if cancelled.is_set():
                raise DownloadCancelled
            on_bytes(int(n or 0))

    return ByteCounter


@contextlib.contextmanager
def hub_errors(source: Source, endpoint: str) -> Iterator[None]:
    """huggingface_hub's exceptions as sem's typed ones, each saying what to do."""
    try:
        yield
    except GatedRepoError as exc:
        status = exc.response.status_code if exc.response is not None else 401
        token = get_token()
        why = (
            "no token was sent: set HF_TOKEN to a token that has access"
            if token is None and status == 401
            else "the token in HF_TOKEN has no access to it (request access on the hub)"
        )
        error = HubAccessDenied if status == 401 else HubForbidden
        raise error(f"{source} is gated or private: {why}") from None
    except RevisionNotFoundError:
        raise RevisionNotFound(
            f"{source}: revision {source.revision or 'main'!r} not found in {source.repo}"
        ) from None
    except RepositoryNotFoundError:
        raise RepoNotFound(
            f"{source}: repository {source.repo} not found on {endpoint}"
            " (a private repository also needs HF_TOKEN)"
        ) from None
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError) as exc:
        raise HubUnreachable(f"{source}: cannot reach the hub at {endpoint}: {exc}") from None
    except OfflineModeIsEnabled:
        raise HubUnreachable(
            f"{source}: HF_HUB_OFFLINE is set and the model is not in the cache"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise CacheError(f"{source}: the hub at {endpoint} answered {status}: {exc}") from None
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise InsufficientDisk(f"{source}: the disk filled up: {exc}") from None
        raise


class HubClient(CacheFolder):
    """One cache folder (cache_folder.py: what is on disk) and one hub endpoint (here: asking
    the hub, fetching); every method blocks."""

    def __init__(self, cache_dir: Path, endpoint: str | None = None) -> None:
        super().__init__(cache_dir)
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self._api = HfApi(endpoint=self.endpoint)

    # -- asking the hub ------------------------------------------------------------------------

    def plan(self, source: Source, pool: ThreadPoolExecutor) -> Plan:
        """Listing and sizes (model_info), then one HEAD per wanted file for ETag and URL."""
        with hub_errors(source, self.endpoint):
            info = self._api.model_info(source.repo, revision=source.revision, files_metadata=True)
            assert info.sha is not None, "the hub names the commit"
            commit = info.sha
            siblings = {s.rfilename: s for s in info.siblings or []}
            wanted, skipped = select_files(sorted(siblings))
            if not any(p == "config.json" for p in wanted):
                raise InvalidSource(f"{source}: no config.json in {source.repo}: not a model")
            headers = build_hf_headers()
            heads = list(pool.map(lambda p: self._head(source.repo, commit, p, headers), wanted))
        files = [
            RemoteFile(path=p, size=size, etag=etag, url=url)
            for p, (size, etag, url) in zip(wanted, heads, strict=True)
        ]
        present = sum(self._present(source.repo, f) for f in files)
        return Plan(source=source, commit=commit, files=files, skipped=skipped, present=present)

    def _head(
        self, repo: str, commit: str, path: str, headers: dict[str, str]
    ) -> tuple[int, str, str]:
        url = hf_hub_url(repo, path, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, headers=dict(headers), endpoint=self.endpoint)
        if meta.etag is None or meta.size is None:
            raise CacheError(f"hf://{repo}: the hub sent no ETag or size for {path}")
        return meta.size, meta.etag, meta.location

    def _present(self, repo: str, file: RemoteFile) -> int:
        blob = self.storage(repo) / "blobs" / file.etag
        for candidate, whole in ((blob, True), (incomplete(blob), False)):
            with contextlib.suppress(OSError):
                size = candidate.stat().st_size
                return file.size if whole else min(size, file.size)
        return 0

    # -- fetching ------------------------------------------------------------------------------

    def fetch(
        self, plan: Plan, file: RemoteFile, on_bytes: ProgressHook, cancelled: threading.Event
    ) -> None:
        """One file into blobs/ (resuming a partial one) and its snapshot link."""
        repo = plan.source.repo
        storage = self.storage(repo)
        # Both names come from the hub's answer: neither may lead out of the repo's folder.
        blob = inside(storage, storage / "blobs" / file.etag)
        pointer = inside(storage, storage / "snapshots" / plan.commit / file.path)
        lock = self.cache_dir / ".locks" / storage.name / f"{file.etag}.lock"
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with hub_errors(plan.source, self.endpoint), WeakFileLock(lock):
            if not blob.exists():
                partial = incomplete(blob)
                with partial.open("ab") as out:
                    resume = out.tell()
                    if resume > file.size:  # not ours to continue: start over
                        out.truncate(0)
                        resume = 0
                    http_get(
                        file.url, out, resume_size=resume, headers=self._headers_for(file.url),
                        expected_size=file.size, displayed_filename=file.path,
                        tqdm_class=_counter(on_bytes, cancelled),
                    )  # fmt: skip
                os.replace(partial, blob)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob, pointer.parent)
        if not pointer.is_symlink() or os.readlink(pointer) != target:
            pointer.unlink(missing_ok=True)
            os.symlink(target, pointer)

    def _headers_for(self, url: str) -> dict[str, str]:
        """The hub's headers (token included) for the hub itself; none of the token for a CDN
        it redirected to (as huggingface_hub does)."""
        headers = build_hf_headers()
        if urlsplit(url).netloc != urlsplit(self.endpoint).netloc:
            headers.pop("authorization", None)
        return headers

    def finish(self, plan: Plan) -> Path:
        """Every file is in: record the ref and the manifest (which makes it `cached`)."""
        storage = self.storage(plan.source.repo)
        revision = plan.source.revision or "main"
        if revision != plan.commit:
            write_atomic(inside(storage, storage / "refs" / revision), plan.commit)
        manifest = self._manifest(plan.source.repo, plan.commit)
        previous = read_json(manifest)
        write_atomic(
            manifest,
            json.dumps(
                {
                    "repo": plan.source.repo,
                    "commit": plan.commit,
                    "files": {f.path: f.size for f in plan.files},
                    "size": plan.total,
                    "completed": previous.get("completed", time.time()),
                    "last_used": previous.get("last_used"),
                },
                indent=1,
            ),
        )
        return storage / "snapshots" / plan.commit
