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

Here: the sections as dataclasses and load_recipe (read, check, fetch its assets); recipe.py runs one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.assets import resolve_asset
from .data.records import get_template
from .errors import ConfigError, DataError
from .fields import from_table
from .generate import check_sampling
from .loading.weights import check_device, torch_dtype
from .lora.config import PEFT_ALIASES, LoRAConfig
from .training.loop import TrainConfig
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
    if parts["train"].fsdp and parts["model"].keep_quantized:  # named before anything loads (fsdp.py says why)
        raise ConfigError(f"{path}: [model].keep_quantized with [train] fsdp = true: a base kept in a GGUF file's "
                          "own blocks is not sharded yet; drop keep_quantized (the GGUF dequantized), use "
                          "load_in_4bit / load_in_8bit, or set fsdp = false")
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

