"""A Hugging Face hub look-alike on loopback, for tests and benchmarks: no real hub is reachable.

Serves every folder `ROOT/<org>/<name>/` as the model repository `org/name`, with the endpoints the
real `huggingface_hub` client calls (checked against huggingface_hub 2.4):

- `GET /api/models/{repo}[/revision/{rev}]`: id, sha, siblings (`?blobs=true`: size, blobId, lfs)
- `GET /api/models/{repo}/tree/{rev}?recursive=true`: the listing snapshot_download reads
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: X-Repo-Commit, ETag/X-Linked-Etag (sha256 for LFS
  files, the git blob id for the others), X-Linked-Size, Content-Length, Range (206) for resumes

Xet is never advertised (no X-Xet-* headers), so the client downloads over plain HTTP.
A repo is gated when `--gated org/name` names it: its files then need `Authorization: Bearer
<--token>` (401 without a token, 403 with another), like the real hub (its metadata stays
public). Test hooks: `POST /_admin/throttle?bps=N` (per connection, 0 = off),
`GET /_admin/requests` (what was asked, with Range headers), `POST /_admin/fail?status=N`.

    python -m tests.hub_server --root DIR [--port 0] [--gated org/name] [--token T] [--throttle N]

prints `listening on http://127.0.0.1:PORT` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack", ".onnx")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass
class HubState:
    root: Path
    gated: set[str] = field(default_factory=set)
    token: str = "hf_test_token"
    throttle: int = 0  # bytes per second per connection; 0: as fast as possible
    fail_status: int = 0  # answer every API call with this status (hub down)
    requests: list[dict[str, Any]] = field(default_factory=list)
    _hashes: dict[tuple[str, int, int], tuple[str, str | None]] = field(default_factory=dict)

    def repo_dir(self, repo: str) -> Path | None:
        folder = self.root / repo
        return folder if repo.count("/") == 1 and folder.is_dir() else None

    def file_info(self, folder: Path, path: str) -> RepoFile:
        full = folder / path
        stat = full.stat()
        key = (str(full), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = _hash_file(full, path.endswith(LFS_SUFFIXES))
        blob_id, sha256 = self._hashes[key]
        return RepoFile(path=path, size=stat.st_size, blob_id=blob_id, sha256=sha256)

    def listing(self, folder: Path) -> list[RepoFile]:
        paths = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()
        )
        return [self.file_info(folder, p) for p in paths if not p.startswith(".")]

    @staticmethod
    def commit(files: list[RepoFile]) -> str:
        digest = hashlib.sha1()
        for f in files:
            digest.update(f"{f.path}\0{f.blob_id}\0".encode())
        return digest.hexdigest()


def _hash_file(path: Path, lfs: bool) -> tuple[str, str | None]:
    size = path.stat().st_size
    git = hashlib.sha1(f"blob {size}\0".encode())
    sha = hashlib.sha256() if lfs else None
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            git.update(chunk)
            if sha is not None:
                sha.update(chunk)
    return git.hexdigest(), sha.hexdigest() if sha is not None else None


class _HubError(web.HTTPException):
    """An error the way the hub sends it: JSON body, `X-Error-Code` for the client to map."""

    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        self.status_code = status
        headers = {"X-Error-Code": code, **extra} if code else extra
        super().__init__(
            headers=headers, text=json.dumps({"error": message}), content_type="application/json"
        )


def make_app(state: HubState) -> web.Application:
    app = web.Application()

    async def repo_files(request: web.Request) -> tuple[str, Path, list[RepoFile]]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        folder = state.repo_dir(repo)
        if folder is None:
            raise _HubError(404, "RepoNotFound", f"Repository not found: {repo}")
        files = await asyncio.to_thread(state.listing, folder)
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", state.commit(files)):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, folder, files

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_admin"):
            state.requests.append(
                {"method": request.method, "path": request.path,
                 "range": request.headers.get("Range"),
                 "auth": "Authorization" in request.headers}
            )  # fmt: skip
            if state.fail_status:
                raise _HubError(state.fail_status, "", "the hub is having a bad day")
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(record)

    async def model_info(request: web.Request) -> web.Response:
        repo, _, files = await repo_files(request)
        blobs = request.query.get("blobs") in ("true", "True", "1")
        siblings = []
        for f in files:
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.sha256:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response(
            {"_id": repo, "id": repo, "modelId": repo, "sha": state.commit(files),
             "private": False, "disabled": False,
             "gated": "manual" if repo in state.gated else False,
             "tags": [], "siblings": siblings}
        )  # fmt: skip

    async def tree(request: web.Request) -> web.Response:
        _, _, files = await repo_files(request)
        entries = []
        for f in files:
            entry: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size,
                                     "oid": f.blob_id}  # fmt: skip
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def resolve(request: web.Request) -> web.StreamResponse:
        repo, folder, files = await repo_files(request)
        if repo in state.gated:
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not presented:
                raise _HubError(401, "GatedRepo", f"Access to model {repo} is restricted.")
            if presented != state.token:
                raise _HubError(403, "GatedRepo", f"Access to model {repo} is restricted.")
        path = request.match_info["path"]
        match = [f for f in files if f.path == path]
        commit = state.commit(files)
        if not match:
            raise _HubError(404, "EntryNotFound", f"{path} not found", **{"X-Repo-Commit": commit})
        info = match[0]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{info.etag}"',
            "X-Linked-Etag": f'"{info.etag}"',
            "X-Linked-Size": str(info.size),
            "Accept-Ranges": "bytes",
        }
        return await _send_file(request, folder / path, info.size, headers, state.throttle)

    async def throttle(request: web.Request) -> web.Response:
        state.throttle = int(request.query.get("bps", "0"))
        return web.json_response({"throttle": state.throttle})

    async def fail(request: web.Request) -> web.Response:
        state.fail_status = int(request.query.get("status", "0"))
        return web.json_response({"fail_status": state.fail_status})

    async def requests(_: web.Request) -> web.Response:
        return web.json_response(state.requests)

    repo = "/{org}/{name}"
    app.router.add_get(f"/api/models{repo}", model_info)
    app.router.add_get(f"/api/models{repo}/revision/{{rev}}", model_info)
    app.router.add_get(f"/api/models{repo}/tree/{{rev}}", tree)
    app.router.add_route("*", f"{repo}/resolve/{{rev}}/{{path:.+}}", resolve)
    app.router.add_post("/_admin/throttle", throttle)
    app.router.add_post("/_admin/fail", fail)
    app.router.add_get("/_admin/requests", requests)
    return app


async def _send_file(
    request: web.Request, path: Path, size: int, headers: dict[str, str], throttle: int
) -> web.StreamResponse:
    start, end = 0, size - 1
    status = 200
    if (header := request.headers.get("Range")) and (match := _RANGE.match(header)):
        start = int(match.group(1))
        end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if start >= size:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1
    if request.method == "HEAD":
        return web.Response(status=status, headers={**headers, "Content-Length": str(length)})
    if not throttle and status == 200:
        return web.FileResponse(path, headers=headers)  # sendfile: cheapest for benchmarks
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    chunk = min(_CHUNK, max(throttle // 10, 16384)) if throttle else _CHUNK
    with path.open("rb") as f:
        f.seek(start)
        remaining = length
        while remaining > 0:
            data = f.read(min(chunk, remaining))
            if not data:
                break
            began = loop.time()
            await response.write(data)
            remaining -= len(data)
            if throttle:
                await asyncio.sleep(max(0.0, len(data) / throttle - (loop.time() - began)))
    await response.write_eof()
    return response


async def serve(state: HubState, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.hub_server", description=__doc__)
    p.add_argument("--root", type=Path, required=True, help="folders ROOT/org/name are repos")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--gated", action="append", default=[], metavar="ORG/NAME")
    p.add_argument("--token", default=os.environ.get("HUB_TOKEN", "hf_test_token"))
    p.add_argument("--throttle", type=int, default=0, help="bytes/s per connection")
    args = p.parse_args(argv)
    state = HubState(root=args.root.resolve(), gated=set(args.gated), token=args.token,
                     throttle=args.throttle)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(state, args.host, args.port))


if __name__ == "__main__":
    main()
