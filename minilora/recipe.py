"""Running a recipe: run_recipe loads the [model] and its tokenizer, reads and tokenizes the [data],
applies [lora], trains as [train] says, and scores a held-out test set before and after. The recipe
file itself (its sections, reading and checking it: load_recipe) is recipe_file.py; its names are
importable from here too."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Callable, ContextManager

import torch

from . import hardware
from .data.batching import pack
from .data.preferences import build_pairs
from .data.prompts import build_prompts
from .data.records import build_classification_examples, build_examples, label_ids, read_records, split
from .errors import ConfigError
from .generate import chat_prompt, check_vocabulary, grpo_objective
from .generate import classify as predict
from .loading.tokenizer import load_tokenizer
from .loading.weights import load_model, slice_reader, torch_dtype
from .lora.inject import apply_lora
from .lora.peft_load import load_adapter
from .lora.report import param_report
from .models.common import resize_token_embeddings
from .recipe_file import (  # noqa: F401 (the command line, the demo and tests take them from here)
    RECIPES,
    SECTIONS,
    DataSection,
    GenerateSection,
    ModelSection,
    Recipe,
    load_recipe,
    packaged_recipes,
    parse_value,
)
from .ship.hub import check_can_push, push_to_hub
from .training import distributed, fsdp_load
from .training.checks import refuse_an_untrained_head
from .training.evaluate import evaluate_classification
from .training.loop import train


def run_recipe(recipe: Recipe, stop_request: Callable[[], ContextManager[Callable[[], bool]]] | None = None):
    """Load the model and data, apply LoRA, train; returns (model, tokenizer, TrainResult).

    stop_request (the command line's is cli.stop_on_signals) is entered around the training loop alone
    and yields the should_stop() that train() asks after every step; loading and evaluating outside the
    loop are interrupted as usual.

    Launched by torchrun (WORLD_SIZE > 1), joins the process group and trains data-parallel; every
    rank loads the model and data, rank 0 alone prints and writes."""
    m, d = recipe.model, recipe.data
    classify = d.task == "classification"
    if recipe.train.push_to_hub and distributed.is_main():
        check_can_push(recipe.train.hub_model_id)  # before hours of training, not after
    torch.manual_seed(recipe.train.seed)  # a fresh classifier head is initialised from the global RNG
    records = _read_records(d)
    label2id, id2label = _class_ids(recipe, records[0]) if classify else (None, None)
    device = distributed.init_from_env(torch.device(m.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    say = print if distributed.is_main() else (lambda *a, **k: None)
    sharded = recipe.train.fsdp and fsdp_load.plain_lora(recipe.lora) is None  # each rank reads its slices
    model, tokenizer = _load_model_and_tokenizer(recipe, device, id2label, sharded)
    train_data, eval_data, test_data = _examples(recipe, tokenizer, label2id, records, say)
    apply_lora(model, recipe.lora)
    reader = slice_reader(model) if sharded else None  # None: a GGUF or pytorch_model.bin, loaded whole
    if reader is not None:
        fsdp_load.read_when_sharded(model, reader)
    refuse_an_untrained_head(model, f"{recipe.source} [lora].modules_to_save")  # train() asks too, without the key
    if recipe.generate.prompts and not classify:
        _refuse_prompts_past_the_context(recipe, model, tokenizer)
    say(param_report(model))
    kind = "packed rows" if d.packing else "prompts" if recipe.train.objective == "grpo" else "examples"
    say(f"training on {len(train_data)} {kind}, evaluating on {len(eval_data or [])}")
    if recipe.train.bf16 == "auto":
        say("bf16 autocast: " + ("on" if hardware.use_bf16("auto", torch.device(device)) else
                                 "off (this machine has no fast bf16 matrix product: training in fp32)"))
    objective = grpo_objective(tokenizer, recipe.train, beside=Path(recipe.source).parent) \
        if recipe.train.objective == "grpo" else None  # it samples with generate.py, which training may not import
    _report_test(recipe, model, tokenizer, test_data, "before", say, objective)
    with stop_request() if stop_request is not None else contextlib.nullcontext() as should_stop:
        result = train(model, tokenizer, train_data, eval_data, recipe.train, should_stop=should_stop,
                       objective=objective)
    _report_test(recipe, model, tokenizer, test_data, "after", say, objective)
    if recipe.train.push_to_hub and distributed.is_main() and not result.stopped_early:
        say(f"pushed {result.adapter_dir} to the Hub: "
            + push_to_hub(result.adapter_dir, recipe.train.hub_model_id, recipe.train.hub_private))
    return model, tokenizer, result


def _read_records(d: DataSection) -> tuple[list, list, list]:
    """(train, eval, test) records: eval from its own file, or else val_size of train held out."""
    records = read_records(d.train)
    if d.eval:
        train_records, eval_records = records, read_records(d.eval)
    elif d.val_size:
        train_records, eval_records = split(records, d.val_size, d.seed, d.split_by)
    else:
        train_records, eval_records = records, []
    if d.limit:
        train_records = train_records[:d.limit]
    if d.eval_limit:
        eval_records = [eval_records[i] for i in sorted(random.Random(d.seed).sample(range(len(eval_records)),
                                                                                   min(d.eval_limit, len(eval_records))))]
    return train_records, eval_records, read_records(d.test) if d.test else []


def _class_ids(recipe: Recipe, train_records: list) -> tuple[dict[str, int], dict[int, str]]:
    """A classifier's label -> class id (labels, or the sorted values found), and class id -> name."""
    d = recipe.data
    label2id = label_ids(train_records, d.label_field, d.labels)
    if len(label2id) < 2:
        raise ConfigError(f"{recipe.source} [data]: {len(label2id)} class(es) in field {d.label_field!r} of "
                          f"{d.train} (or in labels): a classifier needs at least 2")
    names = d.label_names or list(label2id)
    if len(names) != len(label2id) or len(set(names)) != len(names):
        raise ConfigError(f"{recipe.source} [data].label_names: {len(names)} names ({len(set(names))} different) "
                          f"for {len(label2id)} labels")
    return label2id, dict(enumerate(names))


def _load_model_and_tokenizer(recipe: Recipe, device: torch.device, id2label: dict[int, str] | None,
                              shard: bool = False):
    """The [model] section's model (a classifier with id2label) and its tokenizer, refused if they do not
    belong together or the context is shorter than the cutoff; a classifier gets a pad token if it lacks one."""
    m, d = recipe.model, recipe.data
    classify = d.task == "classification"
    model = load_model(m.name, dtype=torch_dtype(m.dtype, f"{recipe.source} [model].dtype"), device=device,
                       revision=m.revision, load_in_8bit=m.load_in_8bit, load_in_4bit=m.load_in_4bit,
                       keep_quantized=m.keep_quantized, shard=shard,
                       task="classification" if classify else None, id2label=id2label)
    tokenizer = load_tokenizer(m.name, revision=m.revision)
    check_vocabulary(model, tokenizer, m.name)
    if d.cutoff > model.max_length:
        raise ConfigError(f"{recipe.source} [data].cutoff: {d.cutoff} tokens is longer than the model's context of "
                          f"{model.max_length}")
    if classify and not tokenizer.has_pad_token:  # batches need padding: add [PAD], grow the embeddings
        tokenizer.add_pad_token()
        resize_token_embeddings(model, tokenizer.vocab_size)
    return model, tokenizer


def load_trained(recipe: Recipe, adapter_dir: str | os.PathLike):
    """The recipe's base model and tokenizer, loaded whole in this process, with the adapter a run saved
    in `adapter_dir` on it: what generates after an FSDP run whose model stayed sharded."""
    device = torch.device(recipe.model.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = _load_model_and_tokenizer(recipe, device, None)
    load_adapter(model, adapter_dir)
    return model, tokenizer


def _examples(recipe: Recipe, tokenizer, label2id: dict[str, int] | None, records: tuple[list, list, list],
              say: Callable[..., None]):
    """(train, eval, test) records -> examples (None where there are no records), training's packed if asked."""
    d, t = recipe.data, recipe.train

    def examples(rows: list, source: str):
        if not rows:
            return None
        if t.objective in ("dpo", "simpo", "orpo"):  # records of prompt, chosen, rejected
            return build_pairs(rows, tokenizer, t.max_length, t.max_prompt_length, d.skip_bad_rows, source)
        if t.objective == "grpo":  # records of a prompt (and the columns its rewards read)
            return build_prompts(rows, tokenizer, t.max_prompt_length, d.skip_bad_rows, source)
        if d.task == "classification":
            return build_classification_examples(rows, tokenizer, label2id, d.text_field, d.label_field, d.cutoff,
                                                 d.truncation, d.skip_bad_rows, source)
        return build_examples(rows, tokenizer, d.template, d.cutoff, d.add_eos, d.train_on_prompt, d.truncation,
                              d.skip_bad_rows, source)
    train_data = examples(records[0], d.train)
    eval_data = examples(records[1], d.eval or f"{d.train} (held out)")
    test_data = examples(records[2], d.test)
    if train_data.skipped:
        say(f"skipped {train_data.skipped} malformed training rows")
    if getattr(train_data, "without_targets", 0):
        say(f"{train_data.without_targets} of {len(train_data)} training examples keep no response token after "
            f"truncation to cutoff={d.cutoff}: they teach nothing")
    if d.packing:
        unpacked, train_data = len(train_data), pack(train_data, d.cutoff)
        say(f"packed {unpacked} training examples into {len(train_data)} rows of up to {d.cutoff} tokens")
    return train_data, eval_data, test_data


def _refuse_prompts_past_the_context(recipe: Recipe, model, tokenizer) -> None:
    """[generate]'s prompts, as generate() writes them, plus max_new_tokens must fit the model's context."""
    g = recipe.generate
    longest = max(len(tokenizer.encode(chat_prompt(tokenizer, p, g.system), add_special_tokens=False) if g.chat
                      else tokenizer.encode(p)) for p in g.prompts)
    if longest + g.max_new_tokens > model.max_length:
        raise ConfigError(f"{recipe.source} [generate].max_new_tokens: {g.max_new_tokens} tokens after "
                          f"a prompt of {longest} run past the model's context of {model.max_length}")


def _report_test(recipe: Recipe, model, tokenizer, test_data, when: str, say: Callable[..., None],
                 grpo=None) -> None:
    """Held-out test scores before or after training: GRPO's rewards of greedy completions, a
    classifier's accuracy and F1 (and its [generate] prompts' labels)."""
    classify = recipe.data.task == "classification"
    if test_data and grpo is not None:  # one greedy completion per held-out prompt, scored by the rewards
        metrics = grpo.evaluate(model, test_data, tokenizer.pad_token_id, recipe.train.micro_batch_size,
                                hardware.use_bf16(recipe.train.bf16, next(model.parameters()).device))
        say(f"held-out test set ({len(test_data)} prompts), {when}: " + ", ".join(
            f"{k.removeprefix('eval_rewards/').removesuffix('/mean')} {v:.3f}" for k, v in metrics.items()
            if k != "eval_reward") + f" (reward {metrics['eval_reward']:.3f})")
        model.test_metrics = {**getattr(model, "test_metrics", {}), when: metrics}
    if test_data and classify:
        metrics = evaluate_classification(model, test_data, tokenizer.pad_token_id, recipe.train.micro_batch_size)
        say(f"held-out test set ({len(test_data)} examples), {when}: accuracy {metrics['eval_accuracy']:.3f}, "
            f"F1 {metrics['eval_f1']:.3f}")
        model.test_metrics = {**getattr(model, "test_metrics", {}), when: metrics}
    if classify and recipe.generate.prompts and distributed.is_main():
        for text, (label, p) in zip(recipe.generate.prompts, predict(model, tokenizer, recipe.generate.prompts,
                                                                    recipe.data.cutoff, recipe.data.truncation)):
            print(f"  {when:>6}: {label:<10} {p:.2f}  {text}")
