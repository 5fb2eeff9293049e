"""LoRA's settings (LoRAConfig, one per named adapter), PEFT's names for them (one table), and LoRA's
state on a model (LoRAState: each named adapter's settings, and which are active), in one object.
"""

from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, field

import torch.nn as nn

from ..errors import ConfigError
from ..names import check_regex
from .initialise import check_init, check_loftq_config
from .layers import check_lora_hyperparameters

# LoRAConfig's fields under the names PEFT gives them (adapter_config.json, LoraConfig). Where the two
# differ, PEFT's name is an exact alias of ours everywhere: apply_lora, LoRAConfig, a recipe's [lora],
# `minilora params`.
PEFT_NAMES = {"targets": "target_modules", "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
              "modules_to_save": "modules_to_save", "use_rslora": "use_rslora", "use_dora": "use_dora",
              "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
              "ensure_weight_tying": "ensure_weight_tying", "init_lora_weights": "init_lora_weights",
              "loftq_config": "loftq_config"}
PEFT_ALIASES = {peft: ours for ours, peft in PEFT_NAMES.items() if peft != ours}  # PEFT's -> ours
PEFT_DEFAULTS = {"targets": ["q_proj", "v_proj"], "alpha": 16, "dropout": 0.0}


@dataclass
class LoRAConfig:
    """LoRA's settings, in one place: what apply_lora takes, a recipe's [lora] section, and what an
    adapter file records (under PEFT_NAMES). One per named adapter, in the model's LoRAState.

    targets: module-name suffixes (["q_proj", "v_proj"], ["c_attn"]), one regex string over full
    names (r".*\\.h\\.[0-5]\\.attn\\.c_attn"), or "all-linear" (every linear layer but the output heads).
    Embedding tables are targets when named (["embed_tokens"]), never through "all-linear".
    modules_to_save: modules trained in full and saved with the adapter (a classifier head), matched as
    PEFT matches them (the full name ends with the string). On a head tied to the embeddings the head
    gets its own copy, the embeddings stay as they were (PEFT's default); with ensure_weight_tying the
    shared tensor itself is trained, embeddings included.
    rank_pattern / alpha_pattern: {regex: r} / {regex: alpha} for the modules whose name ends with a
    match (PEFT's rule: the name fullmatches "(.*\\.)?(regex)"; the first that matches wins)."""
    targets: list[str] | str = field(default_factory=lambda: list(PEFT_DEFAULTS["targets"]))
    r: int = 8
    alpha: float = PEFT_DEFAULTS["alpha"]
    dropout: float = PEFT_DEFAULTS["dropout"]
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False  # scale by alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r
    use_dora: bool = False    # DoRA (Liu et al. 2024): a trained magnitude per output row, see lora.py
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    ensure_weight_tying: bool = False
    init_lora_weights: bool | str = True  # True | False | "gaussian" | "pissa" | "pissa_niter_K" | "olora" | "loftq" (initialise.py)
    loftq_config: dict[str, int] = field(default_factory=dict)  # with "loftq" only: {"loftq_bits": 4 | 8, "loftq_iter": n}
    # PEFT's names, exact aliases: LoRAConfig(target_modules=..., lora_alpha=..., lora_dropout=...)
    target_modules: InitVar[list[str] | str | None] = None
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None

    def __post_init__(self, target_modules=None, lora_alpha=None, lora_dropout=None) -> None:
        for ours, peft, value in ((PEFT_ALIASES[k], k, v) for k, v in (("target_modules", target_modules),
                                                                     ("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout))):
            if value is not None:
                same = lambda v: list(v) if isinstance(v, tuple) else "all-linear" if v == "all_linear" else v
                if same(getattr(self, ours)) not in (PEFT_DEFAULTS[ours], same(value)):
                    raise ConfigError(f"{ours} and {peft} name the same setting (PEFT's name): give one")
                setattr(self, ours, value)
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        targets = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        self.targets = "all-linear" if targets in (["all-linear"], ["all_linear"], "all_linear") else targets  # as PEFT
        if not (isinstance(self.targets, str) or isinstance(self.targets, list) and self.targets
                and all(isinstance(t, str) for t in self.targets)):
            raise ConfigError("LoRA targets must be a list of module names, a regex string or 'all-linear', "
                              f"got {self.targets!r}")
        if isinstance(self.targets, str):
            check_regex(self.targets, "LoRA target regex")
        saved = self.modules_to_save or []
        if not isinstance(saved, (list, tuple)) or not all(isinstance(t, str) for t in saved):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(saved)
        for name in ("use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.init_lora_weights = check_init(self.init_lora_weights)
        self.loftq_config = check_loftq_config(self.loftq_config, self.init_lora_weights)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must map module-name regexes to values, got {pattern!r}")
            for key, value in pattern.items():
                check_regex(str(key), f"{name} key")
                check_lora_hyperparameters(value if name == "rank_pattern" else self.r,
                                           value if name == "alpha_pattern" else self.alpha, 0.0)
            setattr(self, name, dict(pattern))

    def settings_for(self, name: str) -> tuple[int, float]:
        """(r, alpha) of the module `name`: rank_pattern/alpha_pattern's first matching key, else r/alpha."""
        def lookup(pattern: dict, default):
            return next((v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?({k})", name)), default)
        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.alpha)


@dataclass
class LoRAState:
    """LoRA's state on a model (`model.lora_state`, set by apply_lora): the settings of each named
    adapter, in the order they were added, and the names of the active ones (those that compute)."""
    adapters: dict[str, LoRAConfig]
    active: list[str]

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (the one a single-adapter API means)."""
        return self.active[0]

    @property
    def config(self) -> LoRAConfig:
        """The first active adapter's settings."""
        return self.adapters[self.active[0]]


def lora_state(model: nn.Module) -> LoRAState | None:
    """The model's LoRAState, or None for a model without LoRA."""
    state = model.__dict__.get("lora_state")
    return state if isinstance(state, LoRAState) else None
