"""A stand-in for vLLM's OpenAI server: same command line, same endpoints, instant start.

Run as `python -m tests.fake_engine --model DIR --served-model-name NAME --port P ...` (unknown
vLLM flags are accepted and ignored). Like vLLM, it forks a child that stays in its process
group (the "EngineCore"), so group-stopping is exercised for real.

Fault knobs, from the environment:
  FAKE_START_DELAY=S      seconds before /health answers (connection refused until then)
  FAKE_EXIT_AT_START=N    exit with code N before ever being healthy
  FAKE_CRASH_AFTER=S      exit with code 1 after S seconds of being healthy
  FAKE_IGNORE_SIGTERM=1   ignore SIGTERM (only SIGKILL stops it)
  FAKE_TOKEN_DELAY=S      seconds between streamed tokens (and per token when not streaming)
  FAKE_DIE_AFTER=N        exit (connections cut) once N tokens have been generated in all
  FAKE_CRASH_ON=WORD      exit at once on a prompt containing WORD (a "poison" request)
  FAKE_SIGTERM_ABORT=1    on SIGTERM, end every answer in flight at once as if it had finished
                          (finish_reason "length", usage and [DONE] counting only the tokens
                          sent): vLLM 0.32's shutdown in mode=abort (engine-notes.md)
  FAKE_LOG_REQUESTS=1     print a line per request it receives (and always one on SIGTERM), so
                          a test can tell whether a request reached it after the signal

Fault signals (what `sem chaos` sends the stand-in):
  SIGUSR1                 wedge: /health stays 200, but no request makes progress any more
                          (like a deadlocked EngineCore behind a live API process), and
                          /metrics stays as it was (vLLM's API process serves the figures its
                          EngineCore last sent)
  SIGUSR2                 unwedge: requests go on where they stood

Like vLLM, `--api-key KEY` (or VLLM_API_KEY) makes every /v1 route demand `Authorization: Bearer
KEY` (401 `{"error": "Unauthorized"}` otherwise); /health and /metrics stay open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware


def engine_core() -> None:
    """The forked child: just lives until its group is signalled."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        time.sleep(1)


def completion_text(prompt: str, max_tokens: int) -> list[str]:
    """Deterministic 'tokens': the prompt's words reversed, cycled. A prompt ending in a number
    counts on from it, like a language model continuing a sequence: going on from the prompt
    plus part of the answer gives the rest of the same answer (what stream resumption needs)."""
    words = prompt.split() or ["empty"]
    if words[-1].isdigit():
        return [f" {int(words[-1]) + 1 + i}" for i in range(max_tokens)]
    return [f" {words[-1 - (i % len(words))]}" for i in range(max_tokens)]


def cut(usage: dict[str, int], completion_tokens: int) -> dict[str, int]:
    """Usage of an answer cut short after `completion_tokens`."""
    return usage | {"completion_tokens": completion_tokens,
                    "total_tokens": usage["prompt_tokens"] + completion_tokens}  # fmt: skip


class FakeEngine:
    """`die_after`: after that many tokens in all, the connection is cut mid-answer (as when the
    engine is killed; in a process, it exits too); `error_after`: a stream gets vLLM's in-band
    error event instead of its next token; `crash_on`: a prompt with this word kills it."""

    def __init__(
        self,
        served_name: str,
        token_delay: float | None = None,
        die_after: int | None = None,
        error_after: int | None = None,
        crash_on: str | None = None,
        tokens_per_chunk: int = 1,
        empty_every: int = 0,
    ) -> None:
        self.served_name = served_name
        self.tokens_per_chunk = tokens_per_chunk  # >1: like speculative decoding
        self.empty_every = empty_every  # >0: an empty-text chunk after every that many chunks
        self.running = 0
        if token_delay is None:
            token_delay = float(os.environ.get("FAKE_TOKEN_DELAY", "0"))
        self.token_delay = token_delay
        self.die_after = die_after
        self.error_after = error_after
        self.crash_on = crash_on
        self.tokens_sent = 0
        self.finished = 0  # requests answered to the end (vllm:request_success_total)
        self.prompt_tokens = 0
        self.requests: list[dict[str, object]] = []
        self.aborted = 0  # generations whose client (the gateway) went away before the end
        self.exit_process = False  # set when it runs as its own process
        self.log_requests = os.environ.get("FAKE_LOG_REQUESTS") == "1"
        self._flowing = asyncio.Event()  # cleared while wedged: tokens wait for it
        self._flowing.set()
        self._frozen: str | None = None  # /metrics as it was when wedged
        self.aborting = False

    def abort(self) -> None:
        """Shut down like vLLM in mode=abort: answers in flight end now, looking finished."""
        self.aborting = True
        self._flowing.set()

    def wedge(self) -> None:
        """Alive and healthy, but no token comes out until `unwedge`; its figures freeze."""
        self._flowing.clear()
        self._frozen = self._frozen or self._exposition()

    def unwedge(self) -> None:
        self._flowing.set()
        self._frozen = None

    async def _next_token(self) -> None:
        await asyncio.sleep(self.token_delay)
        await self._flowing.wait()

    def _die(self, request: web.Request) -> web.StreamResponse:
        """Cut the connection like a killed engine; a real process also exits."""
        if request.transport is not None:
            request.transport.abort()
        if self.exit_process:
            os._exit(1)
        raise asyncio.CancelledError

    def _count(self, request: web.Request, tokens: int = 1) -> None:
        self.tokens_sent += tokens
        if self.die_after is not None and self.tokens_sent > self.die_after:
            self.die_after = None  # once
            self._die(request)

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served_name}]})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self._frozen or self._exposition())

    def _exposition(self) -> str:
        """A few of vLLM's own metrics, under vLLM's names, types and labels."""
        labels = f'engine="0",model_name="{self.served_name}"'
        kv_use = min(1.0, self.running / 8)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {self.running}.0",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {kv_use}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{labels},finished_reason="length"}} {self.finished}.0',
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}.0",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {self.tokens_sent}.0",
        ]
        return "\n".join(lines) + "\n"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.log_requests:
            print(f"fake engine {os.getpid()}: request", flush=True)
        if body.get("model") != self.served_name:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                           "type": "NotFoundError", "code": 404}}, status=404)  # fmt: skip
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        else:
            prompt = str(body.get("prompt", ""))
        if self.crash_on is not None and self.crash_on in prompt.split():
            self._die(request)
        max_tokens = int(body.get("max_tokens") or 16)
        tokens = completion_text(prompt, max_tokens)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
                 "total_tokens": len(prompt.split()) + len(tokens)}  # fmt: skip
        kind = "chat.completion" if chat else "text_completion"
        self.running += 1
        self.prompt_tokens += usage["prompt_tokens"]
        try:
            if body.get("stream"):
                return await self._stream(request, tokens, chat, kind, usage, body)
            for n in range(len(tokens)):
                await self._next_token()
                if self.aborting:
                    tokens, usage = tokens[:n], cut(usage, n)
                    break
                self._count(request)
            self.finished += 1
        except asyncio.CancelledError:  # vLLM aborts a request whose connection closed
            self.aborted += 1
            raise
        finally:
            self.running -= 1
        text = "".join(tokens)
        choice: dict[str, object] = {"index": 0, "finish_reason": "length"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return web.json_response({"id": "cmpl-fake", "object": kind, "model": self.served_name,
                                  "choices": [choice], "usage": usage})  # fmt: skip

    async def _stream(
        self, request: web.Request, tokens: list[str], chat: bool, kind: str,
        usage: dict[str, int], body: dict[str, object],
    ) -> web.StreamResponse:  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))
        per = self.tokens_per_chunk
        groups = [tokens[i : i + per] for i in range(0, len(tokens), per)]
        sent = 0  # tokens, not chunks

        async def write(choice: dict[str, object]) -> None:
            chunk: dict[str, object] = {"id": "cmpl-fake", "object": f"{kind}.chunk",
                                        "model": self.served_name, "choices": [choice]}  # fmt: skip
            if continuous:
                chunk["usage"] = cut(usage, sent)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        for n, group in enumerate(groups):
            token = "".join(group)
            await self._next_token()
            if self.aborting:
                usage = cut(usage, sent)
                choice = {"index": 0, "finish_reason": "length"}
                await write(choice | ({"delta": {"content": ""}} if chat else {"text": ""}))
                break
            if self.error_after is not None and self.tokens_sent >= self.error_after:
                self.error_after = None  # once
                error = {"error": {"message": "EngineCore encountered an issue",
                                   "type": "InternalServerError", "code": 500}}  # fmt: skip
                await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                await response.write_eof()
                return response
            self._count(request, len(group))
            sent += len(group)
            last = n == len(groups) - 1
            choice: dict[str, object] = {"index": 0, "finish_reason": "length" if last else None}
            await write(choice | ({"delta": {"content": token}} if chat else {"text": token}))
            if self.empty_every and (n + 1) % self.empty_every == 0 and not last:
                await write({"index": 0, "finish_reason": None}
                            | ({"delta": {"content": ""}} if chat else {"text": ""}))  # fmt: skip
        if options.get("include_usage"):
            final = {"id": "cmpl-fake", "object": f"{kind}.chunk", "model": self.served_name,
                     "choices": [], "usage": usage}  # fmt: skip
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
        self.finished += 1
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def require_key(api_key: str) -> Middleware:
    """vLLM's check: /v1 routes need the bearer key."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        wanted = f"Bearer {api_key}"
        if request.path.startswith("/v1") and request.headers.get("Authorization") != wanted:
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check


def make_app(engine: FakeEngine, api_key: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[require_key(api_key)] if api_key else [],
        client_max_size=64 * 1024**2,  # long contexts, like vLLM
    )
    app.router.add_get("/health", engine.health)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/metrics", engine.metrics)
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_post("/v1/chat/completions", engine.chat_completions)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    args, _unknown = parser.parse_known_args()

    if os.environ.get("FAKE_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    core = multiprocessing.get_context("fork").Process(target=engine_core, daemon=False)
    core.start()
    print(f"fake engine {args.served_model_name} pid {os.getpid()} core {core.pid}", flush=True)

    await asyncio.sleep(float(os.environ.get("FAKE_START_DELAY", "0")))
    if "FAKE_EXIT_AT_START" in os.environ:
        print("fake engine: failing at start as asked", flush=True)
        core.kill()
        sys.exit(int(os.environ["FAKE_EXIT_AT_START"]))

    engine = FakeEngine(
        args.served_model_name,
        die_after=int(os.environ["FAKE_DIE_AFTER"]) if "FAKE_DIE_AFTER" in os.environ else None,
        crash_on=os.environ.get("FAKE_CRASH_ON"),
    )
    engine.exit_process = True
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, engine.wedge)
    loop.add_signal_handler(signal.SIGUSR2, engine.unwedge)
    app = make_app(engine, args.api_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"fake engine ready on {args.port}", flush=True)

    crash_after = os.environ.get("FAKE_CRASH_AFTER")
    if crash_after is not None:
        await asyncio.sleep(float(crash_after))
        print("fake engine: crashing as asked", flush=True)
        os._exit(1)
    stop = asyncio.Event()
    abort_on_stop = os.environ.get("FAKE_SIGTERM_ABORT") == "1"

    def on_sigterm() -> None:
        print(f"fake engine {os.getpid()}: SIGTERM", flush=True)
        if abort_on_stop:
            engine.abort()
        stop.set()

    if os.environ.get("FAKE_IGNORE_SIGTERM") != "1":
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    await stop.wait()
    await runner.cleanup()
    core.terminate()
    core.join()


if __name__ == "__main__":
    asyncio.run(main())
    print(json.dumps({"fake_engine": "stopped"}), flush=True)
