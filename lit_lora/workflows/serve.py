"""An OpenAI-compatible HTTP server: one base model, any number of adapters, one continuous batch.

    GET  /v1/models             the base model and every adapter, by the name a request gives as `model`
    POST /v1/completions        text in, text out (`prompt`: a string, or a list of token ids)
    POST /v1/chat/completions   a dialog in the model's chat format (`prompts.encode_dialog`)
    GET  /metrics               what the engine did (steps, rows per step, adapters per step, queue)

Both generation routes take `max_tokens`, `temperature` (0: greedy), `top_p`, `stop` (strings),
`seed` and `stream` (server-sent events, as OpenAI sends them), and two extensions vLLM also has:
`ignore_eos` and `return_token_ids` (each choice then lists its generated token ids). Errors have
OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 404 for an unknown model, 400 for bad
parameters or a prompt that leaves no room in the context, 429 when `max_batch_size + max_waiting`
requests are already in flight, 503 while shutting down. A client that goes away mid-answer frees its row
at the next decoding step.

The stack: FastAPI (request validation with pydantic, routing, streaming responses) on uvicorn (the HTTP
server; it finishes in-flight requests on SIGTERM, then stops). The model runs on the engine's own thread
(lit_lora/workflows/batching.py); request handlers only encode, wait for tokens and decode them.
"""

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from lit_lora.files.checkpoint import check_same_base, load_config
from lit_lora.generate import check_generation_settings
from lit_lora.methods import read_weights
from lit_lora.prompts import encode_dialog
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.batching import Engine, Request
from lit_lora.workflows.inference import decode_new, encode_prompts, load_for_generation
from lit_lora.workflows.row_adapters import RowAdapters


log = logging.getLogger("lit_lora.serve")


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


# ----------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------


class Sampling(BaseModel):
    """The settings both routes share (OpenAI's names and defaults); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    n: Optional[int] = 1
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionBody(Sampling):
    prompt: Union[str, List[str], List[int]]
    max_tokens: Optional[int] = 16
    echo: Optional[bool] = False
    logprobs: Optional[int] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, List[Dict[str, Any]]]


class ChatBody(Sampling):
    messages: List[Message]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False


def stop_strings(stop: Optional[Union[str, List[str]]]) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    return stops


class TextOutput:
    """The text of the generated ids so far, cut before the first stop string, released piece by piece:
    text ending in an incomplete character (U+FFFD) or in the beginning of a stop string is held back
    until the next tokens decide it."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], context: Optional[torch.Tensor]) -> None:
        self.tokenizer, self.stops, self.context = tokenizer, stops, context
        self.ids: List[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: Optional[int], final: bool) -> str:
        """Take the next token (None: none) and return the text that can be sent now."""
        if token is not None:
            self.ids.append(token)
        text = decode_new(self.tokenizer, self.ids, self.context)
        ends = [text.find(stop) for stop in self.stops if stop in text]
        if ends:
            text, self.stopped = text[:min(ends)], True
        elif not final:
            if text.endswith("\ufffd"):
                text = self.sent
            held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            text = text[:len(text) - held]
        new = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent += new
        return new


# ----------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------


class Relay:
    """Hands the engine's tokens to the event loop: one wake-up of the loop per decoding step, not per token
    (each wake-up is a system call, and at 16 rows there would be 16 per step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock = loop, threading.Lock()
        self.pending: List[Tuple[asyncio.Queue, Optional[int], Optional[str]]] = []

    def emit(self, queue: asyncio.Queue, token: Optional[int], reason: Optional[str]) -> None:  # the engine's thread
        with self.lock:
            self.pending.append((queue, token, reason))
            if len(self.pending) > 1:  # a flush is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the event loop is already closed: nobody is waiting any more
            pass

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, token, reason in pending:
            queue.put_nowait((token, reason))


class Job:
    """One request on the HTTP side: the engine's tokens arrive in an asyncio queue."""

    def __init__(self, relay: Relay) -> None:
        self.relay, self.queue = relay, asyncio.Queue()

    def emit(self, token: Optional[int], reason: Optional[str]) -> None:
        self.relay.emit(self.queue, token, reason)


class Server:
    """The routes over an `Engine`: `app()` is the FastAPI application uvicorn runs."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, base_name: str, adapters: Optional[RowAdapters]) -> None:
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.models = {base_name: (0, "base")}
        for index, name in enumerate(adapters.names if adapters else [], start=1):
            self.models[name] = (index, adapters.method(index))
        self.created = int(time.time())
        self.relay: Optional[Relay] = None  # made on the event loop's first request

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.engine.start()
            yield
            self.engine.close()

        app = FastAPI(title="lit-lora", lifespan=lifespan)
        app.add_exception_handler(APIError, lambda request, error: error.response())
        app.add_exception_handler(RequestValidationError, lambda request, error: APIError(
            400, "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors()[:3])).response())
        app.add_exception_handler(HTTPException, lambda request, error: APIError(error.status_code, str(error.detail)).response())

        @app.get("/v1/models")
        async def models() -> Dict[str, Any]:
            return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                                "owned_by": "lit-lora", "method": method}
                                               for name, (_, method) in self.models.items()]}

        @app.get("/metrics")
        async def metrics() -> Dict[str, Any]:
            return self.engine.metrics.as_dict()

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, http: HTTPRequest) -> Any:
            if body.echo or body.logprobs is not None:
                raise APIError(400, "echo and logprobs are not supported", "echo" if body.echo else "logprobs")
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise APIError(400, "give one prompt per request (a string)", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, bos=True).tolist()
            elif prompt and all(0 <= t < self.engine.model.config.vocab_size for t in prompt):
                ids = list(prompt)
            else:
                raise APIError(400, "prompt must be a string or a non-empty list of token ids of this model", "prompt")
            return await self.generate(body, ids, body.max_tokens, "text_completion", http, context=torch.tensor(ids))

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, http: HTTPRequest) -> Any:
            if body.logprobs:
                raise APIError(400, "logprobs are not supported", "logprobs")
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         "".join(part.get("text", "") for part in m.content if part.get("type") == "text")}
                        for m in body.messages]
            if not messages:
                raise APIError(400, "messages is empty", "messages")
            try:
                ids = encode_dialog(self.tokenizer, messages)[0]
            except ValueError as error:
                raise APIError(400, str(error), "messages") from None
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            return await self.generate(body, ids, limit, "chat.completion", http, context=None)

        return app

    async def generate(self, body: Sampling, ids: List[int], max_tokens: Optional[int], kind: str,
                       http: HTTPRequest, context: Optional[torch.Tensor]) -> Any:
        """Check the request, queue it in the engine, and answer (streamed or whole)."""
        if body.model not in self.models:
            raise APIError(404, f"The model `{body.model}` does not exist; this server has {', '.join(self.models)}",
                           "model", "model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, "n must be 1 (ask several times, or send several requests at once)", "n")
        context_length = self.engine.cache_length
        if len(ids) >= context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens, and your prompt has "
                           f"{len(ids)}: shorten it", "messages" if context is None else "prompt", "context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = None if body.top_p is None or body.top_p == 1 else body.top_p
        max_tokens = context_length - len(ids) if max_tokens is None else max_tokens
        try:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
            check_generation_settings(max_tokens, temperature, None, top_p)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        stops = stop_strings(body.stop)
        generator = torch.Generator()
        try:
            generator.manual_seed(body.seed) if body.seed is not None else generator.seed()
        except (RuntimeError, ValueError) as error:  # a seed beyond 64 bits
            raise APIError(400, f"seed: {error}", "seed") from None
        if self.relay is None:
            self.relay = Relay(asyncio.get_running_loop())
        job = Job(self.relay)
        request = Request(ids, max_tokens, job.emit, adapter=self.models[body.model][0], temperature=temperature,
                          top_p=top_p, generator=generator, ignore_stop=body.ignore_eos)
        if not self.engine.submit(request):
            raise APIError(429, f"the server is busy ({self.engine.max_batch_size + self.engine.max_waiting} requests "
                           "in flight): retry later", code="rate_limit_exceeded")
        answer = Answer(self, body, job, request, kind, TextOutput(self.tokenizer, stops, context))
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(answer.events(include_usage), media_type="text/event-stream")
        return await answer.whole(http)


class Answer:
    """The response to one queued request: the tokens the engine emits, as text, whole or streamed."""

    def __init__(self, server: Server, body: Sampling, job: Job, request: Request, kind: str, text: TextOutput) -> None:
        self.server, self.body, self.job, self.request, self.kind, self.text = server, body, job, request, kind, text
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.token_ids: List[int] = []

    async def next(self) -> Tuple[str, Optional[str]]:
        """(text to send, finish_reason or None) after the next tokens (all that have arrived: one chunk for
        several when the client reads slower than the engine decodes); finish_reason 'stop' at a stop string."""
        pieces = []
        token, reason = await self.job.queue.get()
        while True:
            if reason is not None and (reason == "cancelled" or reason.startswith("error")):
                raise APIError(503 if reason == "cancelled" else 500, "the server is shutting down"
                               if reason == "cancelled" else f"generation failed ({reason})")
            if token is not None:
                self.token_ids.append(token)
            pieces.append(self.text.add(token, final=reason is not None))
            if self.text.stopped:
                self.server.engine.cancel(self.request)  # its row is freed at the next step
                return "".join(pieces), "stop"
            if reason is not None or self.job.queue.empty():
                return "".join(pieces), reason
            token, reason = self.job.queue.get_nowait()

    def choice(self, text: str, reason: Optional[str], delta: bool, token_ids: List[int]) -> Dict[str, Any]:
        choice: Dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.kind == "text_completion":
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if text or reason is None else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        if self.body.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def envelope(self, choices: List[Dict[str, Any]], chunk: bool) -> Dict[str, Any]:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model, "choices": choices}

    def usage(self) -> Dict[str, int]:
        prompt = len(self.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.token_ids),
                "total_tokens": prompt + len(self.token_ids)}

    async def whole(self, http: HTTPRequest) -> Any:
        parts = []
        while True:
            try:
                piece, reason = await asyncio.wait_for(self.next(), timeout=0.5)
            except asyncio.TimeoutError:  # no token for a while: is anybody still waiting for them?
                if await http.is_disconnected():
                    self.server.engine.cancel(self.request)
                    return None
                continue
            parts.append(piece)
            if reason is not None:
                return {**self.envelope([self.choice("".join(parts), reason, False, self.token_ids)], chunk=False),
                        "usage": self.usage()}

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, the last with the finish_reason, then [DONE]."""
        sse = lambda payload: f"data: {json.dumps(payload)}\n\n"
        try:
            if self.kind == "chat.completion":
                yield sse(self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None, "logprobs": None}], chunk=True))
            reason, sent = None, 0
            while reason is None:
                try:
                    piece, reason = await self.next()
                except APIError as error:
                    yield sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": None}})
                    return
                if piece or reason is not None:
                    yield sse(self.envelope([self.choice(piece, reason, True, self.token_ids[sent:])], chunk=True))
                    sent = len(self.token_ids)
            if include_usage:
                yield sse({**self.envelope([], chunk=True), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the response is closed): free the row
            if not self.request.done:
                self.server.engine.cancel(self.request)


# ----------------------------------------------------------------------------------------------------
# Starting it
# ----------------------------------------------------------------------------------------------------


def parse_adapters(items: Sequence[str], base_name: str) -> Dict[str, Path]:
    """'name=path' items -> {name: path}, with one-line errors for a missing '=', an empty or repeated name."""
    found: Dict[str, Path] = {}
    for item in items:
        name, equals, path = item.partition("=")
        name = name.strip()
        if not equals or not name or not path.strip():
            raise ValueError(f"--adapters {item!r}: write name=path, e.g. sql=out/lora/sql/lit_lora.safetensors")
        if name in found or name == base_name:
            raise ValueError(f"--adapters: the name {name!r} is given twice (the base model is called {base_name!r})")
        found[name] = Path(path.strip())
    return found


def load_server(checkpoint_dir: Path, adapters: Mapping[str, Path], name: Optional[str] = None, device: str = "auto",
                dtype: str = "auto", max_batch_size: int = 16, max_waiting: int = 64,
                max_seq_length: Optional[int] = None) -> Server:
    """The base checkpoint and every adapter file, checked before the base weights are read, then loaded."""
    config = load_config(checkpoint_dir)
    for adapter_name, path in adapters.items():
        check_same_base(f"{adapter_name}={path}", read_weights(path).model_config, config)
    tokenizer, _ = encode_prompts(checkpoint_dir, [], 0)
    model = load_for_generation(checkpoint_dir, device, dtype)
    rows = RowAdapters(model, adapters) if adapters else None
    engine = Engine(model, rows, [tokenizer.eos_id], max_batch_size, max_waiting, max_seq_length)
    server = Server(engine, tokenizer, name or Path(checkpoint_dir).name, rows)
    print("serving " + ", ".join(f"{n} ({method})" for n, (_, method) in server.models.items())
          + f"; up to {max_batch_size} rows decode together, {max_waiting} more wait", file=sys.stderr)
    return server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a server started right after: tests, benchmarks)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Return once the server `process` started answers `url`/v1/models; an error with the end of its `log`
    if it exits first or does not answer within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return
        except OSError:  # not listening yet (URLError and ConnectionError are OSErrors)
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def serve(server: Server, host: str, port: int, shutdown_timeout: float) -> None:
    """Run the server until SIGTERM or Ctrl-C: then no new connection is accepted, the requests in flight
    get up to `shutdown_timeout` seconds to finish, and what is left is cancelled."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    uvicorn.run(server.app(), host=host, port=port, timeout_graceful_shutdown=shutdown_timeout, log_level="info")
