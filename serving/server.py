"""The OpenAI-compatible HTTP server over the engine: FastAPI on uvicorn (the ASGI stack vLLM and
SGLang serve the same API with: async endpoints, server-sent events, graceful shutdown on SIGTERM).

  POST /v1/completions, /v1/chat/completions   (stream=true: server-sent events, then `data: [DONE]`)
  GET  /v1/models, /health, /metrics           (Prometheus text)

The engine runs in its own thread; each request's outputs reach its handler through an asyncio queue.
Errors are OpenAI error bodies: 400 for an invalid parameter (named in `param`) or a prompt longer than
max_model_len less max_tokens, 404 for another model's name, 503 when the queue is full. A client that
disconnects cancels its request (its slot is freed at the next step). On SIGTERM uvicorn stops accepting
connections and lets the open ones finish; then the engine drains and stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from serving.engine import Engine, EngineStoppedError, QueueFullError
from serving.openai_api import ChatRequest, CompletionRequest, Responses, error_body
from serving.sampling import RequestError

DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def create_app(engine: Engine, model_name: str, default_max_tokens: int = 16) -> FastAPI:
    app = FastAPI(title="jamba-jax", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{param}: {first.get('msg', 'invalid request')}", param=param)

    @app.post("/v1/completions")
    async def completions(http: Request, body: CompletionRequest):
        return await _answer(engine, model_name, default_max_tokens, http, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, body: ChatRequest):
        return await _answer(engine, model_name, default_max_tokens, http, body, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "jamba-jax", "max_model_len": engine.config.max_model_len}]}

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return _error(503, f"the engine stopped after an internal error: {engine.error!r}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _answer(engine: Engine, model_name: str, default_max_tokens: int, http: Request, body, chat: bool):
    """One completions or chat request: submitted to the engine, answered whole or as a stream."""
    if body.model is not None and body.model != model_name:
        return _error(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                      param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue = asyncio.Queue()
    try:
        sampling = body.sampling(default_max_tokens)
        request = engine.submit(body.prompt_ids(engine.tokenizer), sampling,
                                on_output=lambda _, out: loop.call_soon_threadsafe(outputs.put_nowait, out))
    except RequestError as e:
        return _error(400, str(e), param=e.param)
    except QueueFullError as e:
        return _error(503, f"the server is overloaded: {e}", kind="server_error", code="queue_full")
    except EngineStoppedError as e:
        return _error(500, str(e), kind="server_error")
    responses = Responses(chat, model_name)
    if body.stream:
        return StreamingResponse(_stream(engine, request, outputs, responses, body.include_usage),
                                 media_type="text/event-stream")
    while not request.finished:
        try:
            await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await http.is_disconnected():
                engine.cancel(request)
                return Response(status_code=499)
    if request.finish_reason == "error":
        return _error(500, f"the engine stopped after an internal error: {engine.error!r}", kind="server_error")
    return JSONResponse(responses.full(request))


async def _stream(engine: Engine, request, outputs: asyncio.Queue, responses: Responses, include_usage: bool):
    """Server-sent events of one request; a client gone mid-stream cancels it (the task is cancelled)."""

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        if responses.chat:
            yield event(responses.chunk("", first=True))
        while True:
            out = await outputs.get()
            if out.finish_reason is not None:
                yield event(responses.chunk(out.text, out.finish_reason, request=request))
                break
            if out.text:
                yield event(responses.chunk(out.text))
        if include_usage:
            yield event(responses.usage_chunk(request))
        yield "data: [DONE]\n\n"
    finally:
        if not request.finished:
            engine.cancel(request)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one, read back with getsockname); connections made before the
    server runs wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def make_server(engine: Engine, model_name: str, default_max_tokens: int = 16) -> uvicorn.Server:
    config = uvicorn.Config(create_app(engine, model_name, default_max_tokens), log_level="warning",
                            timeout_graceful_shutdown=None)
    return uvicorn.Server(config)


def serve(engine: Engine, sock: socket.socket, model_name: str, default_max_tokens: int = 16) -> None:
    """Serves until SIGTERM / Ctrl-C (the open requests finish first), then drains and stops the engine and
    returns (exit status 0). Call it from the main thread."""
    # uvicorn shuts down gracefully on these, then raises them again under the handlers it found: with these
    # no-op ones that second delivery ends nothing, so the engine is stopped below and the program exits normally
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    try:
        make_server(engine, model_name, default_max_tokens).run(sockets=[sock])
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """The server on 127.0.0.1 in a background thread (tests, benchmarks): `with ServerThread(engine) as s:`
    gives s.base_url; leaving the block stops the server and the engine, whatever happened inside."""

    def __init__(self, engine: Engine, model_name: str = "jamba", default_max_tokens: int = 16):
        self.engine, self.sock = engine, bind("127.0.0.1", 0)
        self.server = make_server(engine, model_name, default_max_tokens)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(30)
        self.sock.close()
