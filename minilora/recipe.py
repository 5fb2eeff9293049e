"""Recipes: one TOML file describes a whole fine-tune, in four sections and an optional fifth.

    [model]  name = "gpt2-medium"          # Hub id, local folder or .gguf; dtype, device, revision
    [lora]   targets = ["c_attn"]  r = 8  alpha = 16  dropout = 0.05  modules_to_save = []  (a LoRAConfig)
    [data]   train = "quotes.jsonl"  template = "quotes"  cutoff = 128  val_size = 0.1
    [train]  any TrainConfig field: output_dir, epochs, micro_batch_size, batch_size, lr, ...
    [generate]  prompts = [...]  max_new_tokens = 48  temperature = 0.0   (optional: shown after training)

LoftQ (`init_lora_weights = "loftq"`, `loftq_config = { loftq_bits = 4, loftq_iter = 1 }` in [lora])
starts from the float weights and quantizes the base itself, to NF4 or int8 as loftq_bits says: its
[model] section loads the base in floating point (no load_in_8bit, load_in_4bit or keep_quantized).

Every key is checked against the dataclass it fills: an unknown key or a value of the wrong type
is a ConfigError naming the file, the section and the key.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from . import hardware
from .data.assets import resolve_asset
from .data.batching import pack
from .data.preferences import build_pairs
from .data.prompts import build_prompts
from .data.records import (
    build_classification_examples,
    build_examples,
    get_template,
    label_ids,
    read_records,
    split,
)
from .errors import ConfigError, DataError
from .fields import from_table
from .generate import chat_prompt, check_sampling, check_vocabulary, grpo_objective
from .generate import classify as predict
from .loading.tokenizer import load_tokenizer
from .loading.weights import check_device, load_model, torch_dtype
from .lora.config import PEFT_ALIASES, LoRAConfig
from .lora.inject import apply_lora
from .lora.report import param_report
from .models.common import resize_token_embeddings
from .ship.hub import check_can_push, push_to_hub
from .training import distributed
from .training.checks import refuse_an_untrained_head
from .training.evaluate import evaluate_classification
from .training.loop import TrainConfig, train
from .training.rewards import load_reward_function


@dataclass
class ModelSection:
    name: str                         # a Hub id, a local folder or a .gguf file
    dtype: str = "float32"
    device: str | None = None         # cpu, cuda, cuda:1, ...; default: cuda where there is one
    revision: str | None = None
    load_in_8bit: bool = False        # frozen linear weights held in int8 (quant.py)
    load_in_4bit: bool = False        # ... or in NF4 with double quantization (nf4.py, QLoRA's base)
    keep_quantized: bool = False      # a .gguf file's linear weights kept in their own blocks (ggml.py)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("name: empty; give a Hub id, a local folder or a .gguf file")
        torch_dtype(self.dtype, "dtype")
        if self.device is not None:
            check_device(self.device)


@dataclass
class DataSection:
    train: str
    eval: str | None = None
    test: str | None = None           # held out: evaluated once, before and after training
    task: str = "causal-lm"           # or "classification": text_field -> label_field
    text_field: str = "text"
    label_field: str = "label"
    labels: list | None = None        # label values in class-id order (default: sorted values found)
    label_names: list[str] | None = None
    val_size: float | int = 0.1
    split_by: str | None = None       # a field: records sharing its value are held out together (val_size groups)
    template: str | dict | None = None  # None: conversations (messages) by the chat template, else "text"
    cutoff: int = 256
    add_eos: bool = True
    train_on_prompt: bool | None = None  # None: yes with a template, only the assistant's turns in a conversation
    packing: bool = False             # training examples packed into rows of `cutoff` tokens
    truncation: str = "right"
    limit: int | None = None          # use only the first N training records (after shuffling)
    eval_limit: int | None = None     # and only N of the held-out ones (drawn across the held-out groups)
    skip_bad_rows: bool = False
    seed: int = 0

    def __post_init__(self) -> None:  # the files, the template and the numbers, before any model is loaded
        for name in ("train", "eval", "test"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{name}: empty; give a file, a folder or a Hub dataset id (or leave the key out)")
        if self.truncation not in ("right", "left", "none"):
            raise ConfigError(f"truncation: expected right, left or none, got {self.truncation!r}")
        if self.task not in ("causal-lm", "classification"):
            raise ConfigError(f"task: expected causal-lm or classification, got {self.task!r}")
        if self.packing and self.task != "causal-lm":
            raise ConfigError("packing: only for causal-lm data (a classifier's examples are one text each)")
        if self.task == "causal-lm" and self.template is not None:
            try:
                get_template(self.template)
            except DataError as e:
                raise ConfigError(f"template: {e}") from None
        for name in ("cutoff", "limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")


@dataclass
class GenerateSection:
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 48
    temperature: float = 0.0
    chat: bool = False                # each prompt a user message in the model's chat template
    system: str | None = None         # a system message instead of the template's default one

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, None, None)
        if self.system is not None and not self.chat:
            raise ConfigError("system: a chat setting; set chat = true too")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError(f"prompts must be a list of strings, got {self.prompts!r}")


@dataclass
class Recipe:
    model: ModelSection
    lora: LoRAConfig
    data: DataSection
    train: TrainConfig
    generate: GenerateSection
    source: str = "recipe"


SECTIONS = {"model": ModelSection, "lora": LoRAConfig, "data": DataSection, "train": TrainConfig,
            "generate": GenerateSection}
def parse_value(text: str) -> Any:
    """A command-line override as a TOML value (1e-4, true, ["a", "b"]), or else the plain string."""
    import tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


RECIPES = Path(__file__).resolve().parent / "recipes"  # the recipes that ship with minilora


def packaged_recipes() -> dict[str, Path]:
    """{"quotes-smollm2": its .toml file, ...}: the recipes in the package, by the name `minilora train` takes."""
    return {p.stem.replace("_", "-"): p for p in sorted(RECIPES.glob("*.toml"))}


def load_recipe(path: str | os.PathLike, overrides: dict[str, str] | None = None) -> Recipe:
    """Read and check a recipe (a .toml file, or the name of a packaged one: "quotes-smollm2"); overrides
    are {"train.lr": "1e-4", ...} from the command line. Paths in [model] name and [data] train/eval/
    test may be "asset:..." (fetched now, see assets.py) or relative to the recipe's folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ConfigError("TOML recipes need Python >= 3.11 (tomllib)") from None
    path = Path(path)
    name = str(path).removesuffix(".toml").replace("_", "-")
    if not path.is_file() and name in packaged_recipes():  # quotes-smollm2, quotes_smollm2, quotes_smollm2.toml
        path = packaged_recipes()[name]
    if not path.is_file():
        raise ConfigError(f"{path}: " + ("a folder, not a recipe file" if path.is_dir() else
                                         f"no such recipe file (packaged recipes: {', '.join(packaged_recipes())})"))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML in UTF-8 ({e})") from None
    paths = (("model", "name"), ("data", "train"), ("data", "eval"), ("data", "test"))
    _read_beside(raw, path, paths, packaged=path.resolve().parent == RECIPES)
    lora = raw.get("lora", {})
    for peft, ours in PEFT_ALIASES.items():  # PEFT's names are ours too: target_modules = [...], lora_alpha = 32
        if isinstance(lora, dict) and peft in lora:
            if ours in lora:
                raise ConfigError(f"{path} [lora]: {ours} and {peft} name the same setting (PEFT's name): give one")
            lora[ours] = lora.pop(peft)
    for dotted, text in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"override --{dotted}: expected --section.key with a section among {', '.join(SECTIONS)}")
        key = PEFT_ALIASES.get(key, key) if section == "lora" else key  # replaces the file's value by either name
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{path}: [{section}] is not a table, so --{dotted} has nothing to go into")
        raw[section][key] = parse_value(text)
    unknown = [s for s in raw if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; sections are {', '.join(SECTIONS)}")
    for required in ("model", "data"):
        if required not in raw:
            raise ConfigError(f"{path}: missing section [{required}]")
    for section, key in paths:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value.startswith("asset:"):
            try:
                raw[section][key] = resolve_asset(value)
            except DataError as e:
                raise ConfigError(f"{path} [{section}].{key}: {e}") from None
    parts = {name: from_table(cls, raw.get(name, {}), f"{path} [{name}]") for name, cls in SECTIONS.items()}
    _refuse_a_quantized_loftq_base(parts["model"], parts["lora"], path)
    for spec in parts["train"].reward_funcs or []:  # GRPO's: each found now, not after the model has loaded
        try:
            load_reward_function(spec, beside=path.parent)
        except ConfigError as e:
            raise ConfigError(f"{path} [train].reward_funcs: {e}") from None
    return Recipe(**parts, source=str(path))


def _refuse_a_quantized_loftq_base(m: ModelSection, lora: LoRAConfig, path: Path) -> None:
    """LoftQ fits its adapter to the quantization of the float weights, so it quantizes the base itself:
    a [model] that asks the base quantized already is refused by name, before anything loads."""
    asked = [k for k in ("load_in_8bit", "load_in_4bit", "keep_quantized") if getattr(m, k)]
    if lora.init_lora_weights == "loftq" and asked:
        raise ConfigError(f"{path}: [model].{asked[0]} with [lora] init_lora_weights = \"loftq\": LoftQ quantizes "
                          f"the float base itself (loftq_bits {lora.loftq_config['loftq_bits']}); remove {asked[0]}")


def _read_beside(raw: dict[str, Any], path: Path, inputs: tuple[tuple[str, str], ...], packaged: bool) -> None:
    """A recipe file's relative paths are read beside it (those given on the command line from here): an
    input (model, data) that exists there; and where a run writes (output_dir, a resume_from_checkpoint
    folder), always. A packaged recipe's runs/ goes into the current folder, not into the package."""
    outputs = () if packaged else (("train", "output_dir"), ("train", "resume_from_checkpoint"))
    for section, key in (*inputs, *outputs):
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str) or not value or value.startswith("asset:") or value == "latest" \
                or Path(value).expanduser().is_absolute():
            continue
        if (section, key) in outputs or (path.parent / value).exists():  # else a Hub id, or a path from here
            raw[section][key] = str(path.parent / value)


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
    model, tokenizer = _load_model_and_tokenizer(recipe, device, id2label)
    train_data, eval_data, test_data = _examples(recipe, tokenizer, label2id, records, say)
    apply_lora(model, recipe.lora)
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


def _load_model_and_tokenizer(recipe: Recipe, device: torch.device, id2label: dict[int, str] | None):
    """The [model] section's model (a classifier with id2label) and its tokenizer, refused if they do not
    belong together or the context is shorter than the cutoff; a classifier gets a pad token if it lacks one."""
    m, d = recipe.model, recipe.data
    classify = d.task == "classification"
    model = load_model(m.name, dtype=torch_dtype(m.dtype, f"{recipe.source} [model].dtype"), device=device,
                       revision=m.revision, load_in_8bit=m.load_in_8bit, load_in_4bit=m.load_in_4bit,
                       keep_quantized=m.keep_quantized,
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
