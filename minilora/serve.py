"""`minilora serve` (its HTTP side: serve_http.py): one base model and many LoRA adapters behind an OpenAI-compatible HTTP API, on the
standard library alone (http.server, threads, queues).

    minilora serve asset:smollm2 --adapter quotes=runs/quotes/adapter --port 8000 [--api-key KEY]

Endpoints: GET /v1/models (the base, then each adapter), POST /v1/completions, /v1/chat/completions (the
model's chat template, the assistant's turn opened), with "stream": true as server-sent events, and
vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}.
A request's "model" picks the adapter (the base's name: no adapter); "temperature" (0: greedy; 1 by
default, as OpenAI's), "top_p", "max_tokens" (16 by default for completions, as OpenAI's; for chat,
what the context leaves, at most 256), "stop" (up to 4 strings), "seed".

Batching: serve_engine.py's engine thread owns the model and runs continuous batches, rows of different
adapters side by side (the policy is stated there). Errors are OpenAI's JSON ({"error": {"message",
"type", "param", "code"}}) with its statuses: an unknown model 404, a missing field or bad value 400, a
prompt beyond the context 400, a wrong API key 401. One line is logged per request. A client that goes
away mid-stream has its row ended.
"""

from __future__ import annotations

import time

from .data.chat import end_of_turn_ids
from .errors import CheckpointError, ConfigError, DataError
from .lora.adapters import delete_adapter, set_adapter
from .lora.config import lora_state
from .lora.inject import remove_lora
from .lora.mixed import BASE
from .lora.peft_files import load_adapter
from .serve_engine import Engine, Job, RequestError

__all__ = ["Engine", "Job", "RequestError", "Service"]


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
