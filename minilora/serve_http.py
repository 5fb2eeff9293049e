"""`minilora serve`'s HTTP side: OpenAI's JSON answers and stream chunks, the request handler (one thread
per request, from http.server), and make_server. What a request means and how it is generated is
serve.py's (the Service and its Engine)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch.nn as nn

from .errors import ConfigError
from .serve import Engine, Job, RequestError, Service


def _answer(job: Job, model: str, chat: bool, text: str, finish: str, completion_tokens: int) -> dict:
    usage = {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
             "total_tokens": len(job.prompt) + completion_tokens}
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage}


def _chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict:
    if chat:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (http.server runs each in its own thread)."""
    service: Service  # set on the subclass make_server builds
    server_version = "minilora"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        pass  # one line per request is written by _log instead

    def _log(self, status: int, started: float, note: str = "") -> None:
        sys.stderr.write(f"{self.client_address[0]} {self.command} {self.path} {status} "
                         f"{time.monotonic() - started:.3f}s{(' ' + note) if note else ''}\n")

    def _json(self, status: int, body: dict | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> None:
        key = self.service.api_key
        if key is not None and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise RequestError(401, "Incorrect API key provided", code="invalid_api_key")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        started = time.monotonic()
        try:
            self._authorised()
            if self.path.rstrip("/") != "/v1/models":
                raise RequestError(404, f"no such endpoint: GET {self.path}", code="not_found")
            self._json(200, self.service.models())
            self._log(200, started)
        except RequestError as e:
            self._json(e.status, e.body())
            self._log(e.status, started, str(e))

    def do_POST(self) -> None:  # noqa: N802
        started, path = time.monotonic(), self.path.rstrip("/")
        try:
            self._authorised()
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the body must be a JSON object")
            if path == "/v1/load_lora_adapter":
                self._json(200, self.service.load(body))
            elif path == "/v1/unload_lora_adapter":
                self._json(200, self.service.unload(body))
            elif path in ("/v1/completions", "/v1/chat/completions"):
                self._generate(body, path.endswith("chat/completions"), started)
                return
            else:
                raise RequestError(404, f"no such endpoint: POST {self.path}", code="not_found")
            self._log(200, started)
        except RequestError as e:
            self._json(e.status, e.body())
            self._log(e.status, started, str(e))

    def _generate(self, body: dict, chat: bool, started: float) -> None:
        job, model = self.service.job(body, chat)
        self.service.engine.submit(job)
        if not body.get("stream"):
            text = ""
            while True:
                event = job.events.get()
                if event[0] == "delta":
                    text += event[1]
                elif event[0] == "error":
                    raise event[1]
                else:
                    self._json(200, _answer(job, model, chat, text, event[1], event[2]))
                    self._log(200, started, f"model={model} tokens={len(job.prompt)}+{event[2]}")
                    return
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            if chat:
                self._event(_chunk(rid, model, chat, None, None, first=True))
            while True:
                event = job.events.get()
                if event[0] == "delta":
                    self._event(_chunk(rid, model, chat, event[1], None))
                elif event[0] == "error":
                    self._event(event[1].body())
                    break
                else:
                    self._event(_chunk(rid, model, chat, None, event[1]))
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self._log(200, started, f"model={model} stream tokens={len(job.prompt)}+{len(job.ids)}")
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True  # the client went away: its row ends at its next token
            self._log(499, started, f"model={model} client disconnected")

    def _event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


def make_server(model: nn.Module, tokenizer, base_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, max_batch: int = 32, batch_wait: float = 0.01,
                engine_thread: bool = True) -> ThreadingHTTPServer:
    """The server, bound and ready (serve_forever() runs it; port 0 takes a free port: server.server_port).
    engine_thread=False: the engine waits for its run() on a thread of the caller's choosing (best the
    one that loaded the model: serve_engine.Engine.run says why); server.engine is it either way."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(batch_wait, (int, float)) or not 0 <= batch_wait <= 10:
        raise ConfigError(f"batch_wait must be a number of seconds in [0, 10], got {batch_wait!r}")
    service = Service(Engine(model, tokenizer, base_name, max_batch, batch_wait, thread=engine_thread), api_key)
    handler = type("MiniloraHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.engine = service.engine
    return server
