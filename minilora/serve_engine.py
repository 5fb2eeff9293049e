"""The engine of `minilora serve` (serve.py checks the requests; serve_http.py speaks HTTP): one thread
that owns the model and generates for every request, rows of different adapters in one batch.

Continuous batching (Yu et al. 2022, Orca's iteration-level scheduling; what vLLM does): the batch is
re-formed at every generation step, not once per batch. A row that ends (EOS, its max_tokens, a stop
string, a client gone) leaves at once, and a request that arrives while others run joins at the next
step: its prompt is run through the model by itself (the prefill), and its KV cache is then laid
beside the running rows' caches, left-padded to one length. Positions come from the attention mask
(models/common.py), so the padding changes no row's result. Without this, a batch runs until its
slowest row ends and a request that arrives meanwhile waits for all of it.

The policy: rows share a batch when they can share a sampling step: the same end-of-turn ids
(completions end at EOS, chat turns at the template's end token) and the same sampling (all greedy
rows together; sampled ones by equal temperature and top_p; a request with a seed alone, so that its
seed reproduces), at most `max_batch` rows. From idle, the engine takes the oldest waiting request and
waits up to `batch_wait` seconds (10 ms by default) for others to fill the batch. While it runs, a
waiting request joins if it can share the batch and no request that cannot waited before it (first
come, first served: a sampled request is never starved by a stream of greedy ones; it runs when the
batch before it drains). Adapter loads and unloads run on this thread, between steps; rows whose
adapter was unloaded end with a 404.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, DataError
from .generate import sample_next
from .lora.config import lora_state
from .lora.mixed import BASE, mixed_adapters
from .models.common import KVCache


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


@dataclass
class _Batch:
    """The running rows: their jobs, one KV cache, the attention mask over it (B, T) and each row's
    last sampled token, which the next step feeds."""
    key: tuple
    jobs: list[Job]
    cache: KVCache
    mask: torch.Tensor
    last: torch.Tensor
    generator: torch.Generator | None


class Engine:
    """The thread that owns the model: continuous batches of jobs, adapter loads/unloads between steps."""

    def __init__(self, model: nn.Module, tokenizer, base_name: str, max_batch: int = 32,
                 batch_wait: float = 0.01, thread: bool = True) -> None:
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.inbox: queue.Queue = queue.Queue()
        self.batch_log: list[list[str]] | None = None  # set to a list to record each step's adapters
        self.context = getattr(model, "max_length", None) or 2048
        self.device = next(model.parameters()).device
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="minilora-engine", daemon=True) if thread else None
        if self.thread is not None:
            self.thread.start()

    def adapters(self) -> list[str]:
        state = lora_state(self.model)
        return list(state.adapters) if state is not None else []

    def control(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread, between steps; its result (or its exception) comes back."""
        done: queue.Queue = queue.Queue()
        self.inbox.put(("control", fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def submit(self, job: Job) -> None:
        self.inbox.put(("job", job))

    def stop(self) -> None:
        """End run() once the steps under way are done (the rows still running get no more tokens)."""
        self.inbox.put(("stop",))

    def run(self) -> None:
        """The engine's loop, on the calling thread (a thread of its own unless Engine(thread=False)), until stop().

        Why the command line runs it on the main thread, the one that loaded the model: each OS thread that
        runs torch's CPU ops gets a team of OpenMP workers of its own, and once the process holds more
        OpenMP threads than cores, libgomp stops spinning at its barriers for every team; each of the many
        small parallel regions of a generation step then waits for a wake-up, and every step of the
        process ran 2.3x slower here (SmolLM2, 16 rows, 2 cores)."""
        waiting: list[Job] = []
        batch: _Batch | None = None
        while not self.stopped:
            self._take(waiting, idle=batch is None and not waiting)
            known = set(self.adapters())
            gone = [j for j in waiting + (batch.jobs if batch else []) if j.adapter != BASE and j.adapter not in known]
            for job in gone:  # unloaded meanwhile
                job.events.put(("error", RequestError(404, f"The model `{job.adapter}` does not exist", param="model",
                                                      code="model_not_found")))
                job.cancelled = True
            waiting[:] = [j for j in waiting if not j.cancelled]
            if batch is not None:
                batch = self._without(batch, [i for i, j in enumerate(batch.jobs) if not j.cancelled])
            joining = self._joining(waiting, batch)
            if not joining and batch is None:
                continue
            waiting[:] = [j for j in waiting if j not in joining]
            try:
                with torch.no_grad():
                    if joining:
                        batch = self._beside(batch, self._prefill(joining))
                    if batch is not None:
                        batch = self._step(batch)
            except (ConfigError, DataError, RuntimeError) as e:
                for job in joining + (batch.jobs if batch else []):
                    job.events.put(("error", RequestError(500, f"generation failed: {e}", kind="server_error")))
                batch = None

    def _take(self, waiting: list[Job], idle: bool) -> None:
        """Move what the inbox holds into `waiting`, running control items at once. Idle: wait for a first
        item, then `batch_wait` for more."""
        items = [self.inbox.get()] if idle else []
        deadline = time.monotonic() + (self.batch_wait if idle else 0.0)
        while True:
            try:
                items.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())) if idle
                             else self.inbox.get_nowait())
            except queue.Empty:
                break
        for it in items:
            if it[0] == "stop":
                self.stopped = True
            elif it[0] == "control":
                _, fn, done = it
                try:
                    done.put((True, fn()))
                except Exception as e:  # noqa: BLE001 (it goes back to the request that asked)
                    done.put((False, e))
            else:
                waiting.append(it[1])

    def _joining(self, waiting: list[Job], batch: _Batch | None) -> list[Job]:
        """The waiting jobs that join now: from idle every one that shares the oldest's key; while a batch
        runs, those sharing its key that no other-key job waited before."""
        room = self.max_batch - (len(batch.jobs) if batch else 0)
        if batch is None:
            key = waiting[0].key() if waiting else None
            return [j for j in waiting if j.key() == key][:room]
        joining = []
        for job in waiting:
            if job.key() != batch.key or len(joining) == room:
                break
            joining.append(job)
        return joining

    def _forward(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Last-position logits of one step, each row through its job's adapter."""
        if self.batch_log is not None:
            self.batch_log.append([j.adapter for j in jobs])
        if lora_state(self.model) is None:
            return self.model(ids, attention_mask=mask, cache=cache)[:, -1]
        with mixed_adapters(self.model, [j.adapter for j in jobs]):
            return self.model(ids, attention_mask=mask, cache=cache)[:, -1]

    def _prefill(self, jobs: list[Job]) -> _Batch:
        """The joining jobs' prompts, left-padded to one length, through the model: their cache and first token."""
        T = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), T), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(jobs), T), dtype=torch.long, device=self.device)
        for i, job in enumerate(jobs):
            ids[i, T - len(job.prompt):] = torch.tensor(job.prompt, device=self.device)
            mask[i, T - len(job.prompt):] = 1
        first = jobs[0]
        generator = (torch.Generator(device=self.device).manual_seed(first.seed) if first.seed is not None else None)
        cache = KVCache()
        logits = self._forward(jobs, ids, mask, cache)
        return self._sampled(_Batch(first.key(), jobs, cache, mask, ids[:, -1], generator), logits)

    def _step(self, batch: _Batch) -> _Batch | None:
        """One token for every running row."""
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        logits = self._forward(batch.jobs, batch.last[:, None], batch.mask, batch.cache)
        return self._sampled(batch, logits)

    def _sampled(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample each row's next token, hand it to its job, and let the rows that end leave."""
        first = batch.jobs[0]
        nxt = sample_next(logits, first.temperature, None, first.top_p if first.temperature else None,
                          batch.generator)
        eos = torch.tensor(first.eos, dtype=torch.long, device=nxt.device)
        ended = torch.isin(nxt, eos).tolist()
        keep = []
        for i, (job, token) in enumerate(zip(batch.jobs, nxt.tolist())):
            if ended[i]:
                self._finish(job, None)
                continue
            job.ids.append(token)
            text = self.tokenizer.decode(job.ids)
            cut = _cut_at_stop(text, job.stop)
            if cut is not None or job.cancelled or len(job.ids) >= job.max_tokens:
                self._finish(job, text if cut is None else cut, length=cut is None and not job.cancelled)
                continue
            if job.stream:  # a non-streaming request's handler is woken once, at the end: each wake costs
                _send(job, text, final=False)  # the engine the GIL (up to 5 ms a switch, per row per token)
            keep.append(i)
        batch.last = nxt
        return self._without(batch, keep)

    def _finish(self, job: Job, text: str | None, length: bool = False) -> None:
        _send(job, self.tokenizer.decode(job.ids) if text is None else text, final=True)
        job.events.put(("done", "length" if length else "stop", len(job.ids)))

    @staticmethod
    def _without(batch: _Batch, keep: list[int]) -> _Batch | None:
        """The batch with only the rows `keep`, and the cache's columns that are padding for all of them cut."""
        if not keep:
            return None
        if len(keep) < len(batch.jobs):
            rows = torch.tensor(keep, device=batch.mask.device)
            batch.jobs = [batch.jobs[i] for i in keep]
            batch.cache.select(rows)
            batch.mask, batch.last = batch.mask[rows], batch.last[rows]
            start = int(batch.mask.any(0).long().argmax())
            if start:
                batch.cache.keys = [k[:, :, start:] for k in batch.cache.keys]
                batch.cache.values = [v[:, :, start:] for v in batch.cache.values]
                batch.mask = batch.mask[:, start:]
        return batch

    @staticmethod
    def _beside(batch: _Batch | None, new: _Batch | None) -> _Batch | None:
        """Two batches as one: each left-padded (cache and mask) to the longer's length, rows stacked."""
        if batch is None or new is None:
            return new if batch is None else batch
        length = max(batch.mask.shape[1], new.mask.shape[1])
        pad = lambda t, dim: F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (length - t.shape[dim], 0))  # noqa: E731
        for a, b in ((batch.cache.keys, new.cache.keys), (batch.cache.values, new.cache.values)):
            a[:] = [torch.cat([pad(x, 2), pad(y, 2)]) for x, y in zip(a, b)]
        batch.mask = torch.cat([pad(batch.mask, 1), pad(new.mask, 1)])
        batch.last = torch.cat([batch.last, new.last])
        batch.jobs = batch.jobs + new.jobs
        return batch


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
