"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stopping on EOS or
stop strings, for a batch of prompts left-padded to one length; `show_comparison`, the base model's and
the adapted model's completions side by side. And `classify`, for classifiers.

Padding is told apart from text by the attention mask alone, never by comparing ids with the pad id:
models whose pad token is their EOS token still stop on EOS.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from itertools import zip_longest

import torch
import torch.nn as nn

from .data.batching import collate
from .data.chat import end_of_turn_ids
from .training.objectives.grpo import GRPO
from .training.rewards import load_reward_function
from .data.records import Example
from .errors import ConfigError, DataError
from .lora.inject import adapter_disabled
from .lora.mixed import mixed_adapters
from .models.common import KVCache


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that would sample something other than what they say."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")


def check_vocabulary(model: nn.Module, tokenizer, where: str | None = None) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows: it belongs to another
    model, even where the ids of a given text happen to fit. Fewer tokens than rows is common
    (vocabularies padded to a multiple of 64). `where` names the model (its source, by default)."""
    rows = getattr(getattr(model, "input_embeddings", None), "num_embeddings", None)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(rows, int) and isinstance(size, int) and size > rows:
        if where is None:
            provenance = getattr(model, "provenance", None)
            where = provenance.source if provenance is not None else type(model).__name__
        raise ConfigError(f"{where}: the tokenizer has {size} tokens but the model's embeddings only {rows} rows: "
                          "they do not belong together")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab): argmax when temperature is 0 (or below 1e-4, where
    sampling is argmax too, and dividing by it would overflow fp32 into NaN)."""
    if temperature < 1e-4:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        # Nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose mass reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: list[list[int]], eos_ids: list[int], pad_id: int,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, seed: int | None = None,
                 stop_check=None, keep_eos: bool = False, adapter_names: list[str] | None = None) -> list[list[int]]:
    """New token ids for each prompt (ids lists), without the EOS that ended it (with it, keep_eos:
    GRPO scores that token too; it counts among max_new_tokens).

    stop_check(row, new_ids) -> bool may end a row early (stop strings). adapter_names: one adapter
    name per prompt ("__base__": none), all generated in one batch (lora/mixed.py)."""
    if adapter_names is not None:
        if not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != len(prompts):
            raise ConfigError(f"adapter_names must name one adapter per prompt ({len(prompts)}), got {adapter_names!r}")
        with mixed_adapters(model, list(adapter_names)):
            return generate_ids(model, prompts, eos_ids, pad_id, max_new_tokens, temperature, top_k, top_p,
                                use_cache, seed, stop_check, keep_eos)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if getattr(model, "task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ConfigError(f"{type(model).__name__} does not generate text: it is a {model.task_type} model")
    if not prompts:
        raise ConfigError("no prompts to complete")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ConfigError(f"prompt {empty[0]} is empty (no tokens): generation needs at least one token to start from")
    context = getattr(model, "max_length", None)
    if context is not None and max(len(p) for p in prompts) + max_new_tokens > context:
        raise ConfigError(f"a prompt of {max(len(p) for p in prompts)} tokens and max_new_tokens={max_new_tokens} "
                          f"run past the model's context of {context} tokens")
    rows = getattr(getattr(model, "input_embeddings", None), "num_embeddings", None)
    beyond = [t for p in [*prompts, [pad_id]] for t in p if not 0 <= t < (rows or float("inf"))]
    if beyond:
        raise ConfigError(f"token id {beyond[0]} is outside the model's {rows} embeddings: the tokenizer does not "
                          "belong to this model")
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, T - len(p):] = torch.tensor(p, device=device)
        mask[i, T - len(p):] = 1
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(eos_ids, device=device)
    cache = KVCache() if use_cache else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids = ids
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_ids, attention_mask=mask, cache=cache)[:, -1]
        else:
            logits = model(ids, attention_mask=mask)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        finished_now = torch.isin(nxt, eos) & ~done
        ended, tokens = finished_now.tolist(), nxt.tolist()  # one transfer a step, not one per row
        for i in (~done).nonzero().flatten().tolist():
            if ended[i] and not keep_eos:
                continue
            out[i].append(tokens[i])
            if not ended[i] and stop_check is not None and stop_check(i, out[i]):
                finished_now[i] = True
        done |= finished_now
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        step_ids = nxt[:, None]
    return out


def grpo_objective(tokenizer, config, reward_funcs: list | None = None, beside=None) -> GRPO:
    """GRPO as a TrainConfig (objective = "grpo") sets it, sampling with generate_ids (the KV cache,
    stopping at the end of a turn). Its reward functions are `reward_funcs` (callables), else the
    config's reward_funcs by name ("module:function", found beside the folder `beside` or on the path)."""
    from .training.objectives import settings_of
    settings = settings_of("grpo", config)
    names = settings.pop("reward_funcs", None) or []
    funcs = reward_funcs if reward_funcs is not None else [load_reward_function(n, beside) for n in names]
    return GRPO(tokenizer, funcs, generate_ids, seed=config.seed, eos_ids=end_of_turn_ids(tokenizer), **settings)


def chat_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """`text` as a user message in the tokenizer's chat template (after `system`, else the template's
    default system prompt, if it has one), the assistant's turn opened."""
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"system must be text, got {system!r}")
    head = [] if system is None else [{"role": "system", "content": system}]
    return tokenizer.apply_chat_template([*head, {"role": "user", "content": text}], add_generation_prompt=True)


def generate(model: nn.Module, tokenizer, prompts: str | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop: list[str] | None = None, seed: int | None = None, use_cache: bool = True,
             chat: bool = False, system: str | None = None, adapter_names: list[str] | None = None) -> str | list[str]:
    """Complete one prompt (returns a string) or several (returns a list), stopping at EOS or a stop string.
    adapter_names: one adapter per prompt ("__base__" for none), in one mixed batch (lora/mixed.py).

    chat: each prompt is a user message, written by the model's chat template (its default system
    prompt included, unless `system` is given) with the assistant's turn opened; the answer ends at
    the end-of-turn token."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else prompts
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"prompts must be a string or a list of strings, got {prompts!r}")
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"stop strings must be non-empty text, got {stop!r}")
    if system is not None and not chat:
        raise ConfigError("system is a chat setting: give chat=True (or --chat)")
    check_vocabulary(model, tokenizer)
    if chat:
        encoded = []
        for n, text in enumerate(texts):
            try:
                encoded.append(tokenizer.encode(chat_prompt(tokenizer, text, system), add_special_tokens=False))
            except DataError as e:  # the template's failure, named with the prompt it failed on
                raise DataError(f"prompt {n} ({text[:40]!r}): {e}") from None
    else:
        encoded = [tokenizer.encode(t) for t in texts]

    def stop_check(row: int, new_ids: list[int]) -> bool:
        text = tokenizer.decode(new_ids)
        return any(s in text for s in stop)

    eos = end_of_turn_ids(tokenizer) if chat else [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    new = generate_ids(model, encoded, eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                       max_new_tokens, temperature, top_k, top_p, use_cache, seed, stop_check if stop else None,
                       adapter_names=adapter_names)
    results = []
    for ids in new:
        text = tokenizer.decode(ids)
        for s in stop:  # cut at the first stop string, which is not part of the answer
            text = text.split(s, 1)[0]
        results.append(text)
    return results[0] if single else results


@torch.no_grad()
def classify(model: nn.Module, tokenizer, texts: list[str], max_length: int = 512,
             truncation: str = "right") -> list[tuple[str, float]]:
    """(label name, probability) of the most likely class for each text (one text: a list of one)."""
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"texts must be a non-empty list of strings, got {texts!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ConfigError(f"max_length must be a positive number of tokens, got {max_length!r}")
    if truncation not in ("right", "left"):
        raise ConfigError(f"truncation must be 'right' or 'left', got {truncation!r}")
    if getattr(model, "task_type", None) != "SEQ_CLS":
        raise ConfigError(f"{type(model).__name__} is not a classifier: load it with task='classification'")
    check_vocabulary(model, tokenizer)
    encoded = [tokenizer.encode_truncated(t, max_length, truncation) for t in texts]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ConfigError(f"text {empty} ({texts[empty]!r}) gives no tokens to classify")
    device = next(model.parameters()).device
    batch = collate([Example(ids, 0) for ids in encoded], tokenizer.pad_token_id)
    probs = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float().softmax(-1)
    id2label = getattr(model.config, "id2label", None) or {}
    names = {int(i): str(v) for i, v in id2label.items()}
    best = probs.max(-1)
    return [(names.get(int(i), str(int(i))), float(p)) for p, i in zip(best.values, best.indices)]


def show_comparison(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                    seed: int | None = 0, chat: bool = False, system: str | None = None) -> None:
    """Base model (adapter off) and adapted model, completion by completion, in two columns."""
    with adapter_disabled(model):
        base = generate(model, tokenizer, prompts, max_new_tokens, temperature, seed=seed, chat=chat, system=system)
    tuned = generate(model, tokenizer, prompts, max_new_tokens, temperature, seed=seed, chat=chat, system=system)
    width = max(30, (min(shutil.get_terminal_size().columns, 160) - 3) // 2)
    for prompt, b, t in zip(prompts, base, tuned):
        print(f"\n=== {prompt}")
        print(f"{'base model':<{width}} | with the adapter")
        print(f"{'-' * width}-+-{'-' * width}")
        left = textwrap.wrap(b.replace("\n", "\\n"), width) or [""]  # newlines shown as \n
        right = textwrap.wrap(t.replace("\n", "\\n"), width) or [""]
        for l, r in zip_longest(left, right, fillvalue=""):
            print(f"{l:<{width}} | {r}")
