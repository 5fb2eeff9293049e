"""`minilora serve` (its HTTP side: serve_http.py): one base model and many LoRA adapters behind an OpenAI-compatible HTTP API, on the
standard library alone (http.server, threads, queues).

    minilora serve asset:smollm2 --adapter quotes=runs/quotes/adapter --port 8000 [--api-key KEY]

Endpoints: GET /v1/models (the base, then each adapter), POST /v1/completions, /v1/chat/completions (the
model's chat template, the assistant's turn opened), with "stream": true as server-sent events, and
vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}.
A request's "model" picks the adapter (the base's name: no adapter); "temperature" (0: greedy; 1 by
default, as OpenAI's), "top_p", "max_tokens" (16 by default for completions, as OpenAI's; for chat,
what the context leaves, at most 256), "stop" (up to 4 strings), "seed".

Batching (the policy): one engine thread owns the model. It takes the oldest waiting request, waits
up to `batch_wait` seconds (10 ms by default) for more, and runs together those that can share a
generation: the same end-of-turn ids (completions end at EOS, chat turns at the template's end
token) and the same sampling (all greedy ones together; sampled ones by equal temperature and top_p;
one with a seed alone, so that its seed reproduces), at most `max_batch` of them, each row through its
own adapter (lora/mixed.py) with the KV cache. A row ends at its own max_tokens or stop string; the
batch runs until its last row ends. Loading and unloading adapters run on the same thread, between
batches. Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}) with its statuses:
an unknown model 404, a missing field or bad value 400, a prompt beyond the context 400, a wrong API
key 401. One line is logged per request. A client that goes away mid-stream has its row ended.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .data.chat import end_of_turn_ids
from .errors import CheckpointError, ConfigError, DataError
from .generate import generate_ids
from .lora.adapters import delete_adapter, set_adapter
from .lora.config import lora_state
from .lora.inject import remove_lora
from .lora.mixed import BASE
from .lora.peft_files import load_adapter


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation: what it asks, and the events its handler reads (deltas, then the end)."""
    adapter: str
    prompt: list[int]
    eos: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool = False      # deltas as they come (else the text once, at the end)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    sent: int = 0             # characters of the text already sent as deltas
    ids: list[int] = field(default_factory=list)

    def key(self) -> tuple:
        """Jobs with equal keys share a batch (the policy above)."""
        if self.temperature == 0:
            return self.eos, 0.0
        return self.eos, self.temperature, self.top_p, id(self) if self.seed is not None else None


class Engine:
    """The thread that owns the model: batches of jobs, and adapter loads/unloads between them."""

    def __init__(self, model: nn.Module, tokenizer, base_name: str, max_batch: int = 32,
                 batch_wait: float = 0.01) -> None:
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.inbox: queue.Queue = queue.Queue()
        self.batch_log: list[list[str]] | None = None  # set to a list to record each batch's adapters
        self.context = getattr(model, "max_length", None) or 2048
        self.thread = threading.Thread(target=self._loop, name="minilora-engine", daemon=True)
        self.thread.start()

    def adapters(self) -> list[str]:
        state = lora_state(self.model)
        return list(state.adapters) if state is not None else []

    def control(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread, between batches; its result (or its exception) comes back."""
        done: queue.Queue = queue.Queue()
        self.inbox.put(("control", fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def submit(self, job: Job) -> None:
        self.inbox.put(("job", job))

    def _loop(self) -> None:
        waiting: list[Job] = []
        while True:
            item = self.inbox.get() if not waiting else None
            items = [item] if item is not None else []
            deadline = time.monotonic() + self.batch_wait
            while True:  # what else arrives within the wait
                try:
                    items.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            for it in items:
                if it[0] == "control":
                    _, fn, done = it
                    try:
                        done.put((True, fn()))
                    except Exception as e:  # noqa: BLE001 (it goes back to the request that asked)
                        done.put((False, e))
                else:
                    waiting.append(it[1])
            known = set(self.adapters())
            for job in [j for j in waiting if j.adapter != BASE and j.adapter not in known]:  # unloaded meanwhile
                job.events.put(("error", RequestError(404, f"The model `{job.adapter}` does not exist", param="model",
                                                      code="model_not_found")))
            waiting = [j for j in waiting if not j.cancelled and (j.adapter == BASE or j.adapter in known)]
            if not waiting:
                continue
            key = waiting[0].key()
            batch = [j for j in waiting if j.key() == key][:self.max_batch]
            waiting = [j for j in waiting if j not in batch]
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        if self.batch_log is not None:
            self.batch_log.append([j.adapter for j in batch])
        names = [j.adapter for j in batch] if lora_state(self.model) is not None else None
        decode = self.tokenizer.decode

        def stop_check(row: int, ids: list[int]) -> bool:
            job = batch[row]
            job.ids = list(ids)
            text = decode(ids)
            cut = _cut_at_stop(text, job.stop)
            if cut is not None:
                _send(job, cut, final=True)
                return True
            if job.stream:  # a non-streaming request's handler is woken once, at the end: each wake costs
                _send(job, text, final=False)  # the engine the GIL (up to 5 ms a switch, per row per token)
            return job.cancelled or len(ids) >= job.max_tokens
        try:
            with torch.no_grad():
                new = generate_ids(self.model, [j.prompt for j in batch], list(first.eos),
                                   self.tokenizer.pad_token_id or 0, max(j.max_tokens for j in batch),
                                   first.temperature, None, first.top_p if first.temperature else None,
                                   seed=first.seed, stop_check=stop_check, adapter_names=names)
        except (ConfigError, DataError, RuntimeError) as e:
            for job in batch:
                job.events.put(("error", RequestError(500, f"generation failed: {e}", kind="server_error")))
            return
        for job, ids in zip(batch, new):
            text = decode(ids)
            cut = _cut_at_stop(text, job.stop)
            length = cut is None and len(ids) >= job.max_tokens
            _send(job, text if cut is None else cut, final=True)
            job.events.put(("done", "length" if length else "stop", len(ids)))


def _cut_at_stop(text: str, stop: list[str]) -> str | None:
    """The text before the first stop string in it, or None."""
    hits = [text.index(s) for s in stop if s in text]
    return text[:min(hits)] if hits else None


def _send(job: Job, text: str, final: bool) -> None:
    """Send the part of `text` not sent yet, holding back (unless final) what may still turn out to be a
    stop string's start or half of a character (the decoder's U+FFFD)."""
    hold = 0 if final else max((len(s) - 1 for s in job.stop), default=0)
    if not final and text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    ready = text[:len(text) - hold] if hold else text
    if len(ready) > job.sent:
        job.events.put(("delta", ready[job.sent:]))
        job.sent = len(ready)


# ---------------------------------------------------------------------------------------------
# Requests: checked fields, in OpenAI's terms


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"stop must be a string or up to 4 non-empty strings, got {body.get('stop')!r}",
                           param="stop")
    return stop


class Service:
    """What the handlers call: the model's names, requests turned into jobs, adapter loads."""

    def __init__(self, engine: Engine, api_key: str | None = None) -> None:
        self.engine, self.api_key = engine, api_key

    def models(self) -> dict:
        created = int(time.time())
        rows = [{"id": self.engine.base_name, "object": "model", "created": created, "owned_by": "minilora"}]
        rows += [{"id": n, "object": "model", "created": created, "owned_by": "minilora",
                  "parent": self.engine.base_name} for n in self.engine.adapters()]
        return {"object": "list", "data": rows}

    def adapter_of(self, body: dict) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "you must provide a model parameter", param="model")
        if name == self.engine.base_name:
            return BASE
        if name not in self.engine.adapters():
            raise RequestError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return name

    def job(self, body: dict, chat: bool) -> tuple[Job, str]:
        """The request's Job and the model name it answers as."""
        adapter = self.adapter_of(body)
        tokenizer, context = self.engine.tokenizer, self.engine.context
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise RequestError(400, "messages must be a non-empty list of {role, content} with text content",
                                   param="messages")
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except (ConfigError, DataError) as e:
                raise RequestError(400, f"messages: {e}", param="messages") from None
            prompt, eos = tokenizer.encode(text, add_special_tokens=False), tuple(end_of_turn_ids(tokenizer))
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str) or not text:
                raise RequestError(400, "prompt must be a non-empty string (one prompt per request here)",
                                   param="prompt")
            prompt = tokenizer.encode(text)
            eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        if not prompt:
            raise RequestError(400, "the prompt encodes to no tokens", param="messages" if chat else "prompt")
        if body.get("n", 1) != 1:
            raise RequestError(400, f"n must be 1 here, got {body.get('n')!r}", param="n")
        default = min(256, context - len(prompt)) if chat else 16
        max_tokens = body.get("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
        max_tokens = default if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if len(prompt) + max_tokens > context:
            raise RequestError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                    f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for "
                                    "the completion). Please reduce the prompt or max_tokens.",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise RequestError(400, f"seed must be a non-negative integer, got {seed!r}", param="seed")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError(400, f"stream must be true or false, got {body.get('stream')!r}", param="stream")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError(400, "top_p must be greater than 0", param="top_p")
        return Job(adapter, prompt, eos, max_tokens, temperature, top_p, seed, _stop(body),
                   bool(body.get("stream"))), body["model"]

    def load(self, body: dict) -> str:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise RequestError(400, "load_lora_adapter needs lora_name and lora_path (strings)",
                               param="lora_name" if not isinstance(name, str) or not name else "lora_path")
        if name == self.engine.base_name or name in self.engine.adapters():
            raise RequestError(400, f"The lora adapter '{name}' has already been loaded", param="lora_name")
        try:
            self.engine.control(lambda: load_adapter(self.engine.model, path, adapter_name=name).eval())
        except (CheckpointError, ConfigError, OSError) as e:
            raise RequestError(400, f"could not load the adapter from {path}: {e}", param="lora_path") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self.engine.adapters():
            raise RequestError(404, f"The lora adapter '{name}' cannot be found", param="lora_name",
                               code="model_not_found")

        def drop() -> None:
            model, others = self.engine.model, [n for n in self.engine.adapters() if n != name]
            if not others:
                remove_lora(model, merge=False)
                return
            if name in lora_state(model).active:
                set_adapter(model, others[0])
            delete_adapter(model, name)
        try:
            self.engine.control(drop)
        except ConfigError as e:
            raise RequestError(400, f"could not unload {name!r}: {e}", param="lora_name") from None
        return f"Success: LoRA adapter '{name}' removed successfully."
