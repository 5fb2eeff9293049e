"""LoRA on a model, by name: LoRAConfig, apply_lora, merge/unmerge/remove, and several named adapters.

This file knows nothing of model files: `apply_lora` swaps the targeted `nn.Linear` (and named
`nn.Embedding`) modules for the layers of lora.py, which keep the same `weight` and `bias`, so every
existing state-dict name stays; of a model it reads only the output heads it declares ("all-linear"
leaves those alone).

Several adapters live on one model as PEFT has them: one is active (its tensors are the layers' own,
under PEFT's names), the others wait inside each layer; `set_adapter` swaps them, `adapter_disabled`
runs the base alone, `add_weighted_adapter` makes a new adapter whose update is the weighted sum of
others' updates.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field

import torch
import torch.nn as nn

from .errors import ConfigError
from .lora import LoRAEmbedding, LoRALinear, check_lora_hyperparameters
from .names import CLASSIFIER_NAMES, check_regex, find_saved, find_targets, owners, replace_module

LoRALayer = (LoRALinear, LoRAEmbedding)


PEFT_ALIASES = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout"}  # PEFT's -> ours
PEFT_DEFAULTS = {"targets": ["q_proj", "v_proj"], "alpha": 16, "dropout": 0.0}


@dataclass
class LoRAConfig:
    """LoRA's settings, in one place: what apply_lora takes, a recipe's [lora] section, and what an
    adapter file records (adapter.py maps these names to PEFT's). Kept on the model as `lora_config`.

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
    # PEFT's names, exact aliases: LoRAConfig(target_modules=..., lora_alpha=..., lora_dropout=...)
    target_modules: InitVar[list[str] | str | None] = None
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None

    def __post_init__(self, target_modules=None, lora_alpha=None, lora_dropout=None) -> None:
        for ours, peft, value in (("targets", "target_modules", target_modules), ("alpha", "lora_alpha", lora_alpha),
                                  ("dropout", "lora_dropout", lora_dropout)):
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


def apply_lora(model: nn.Module, targets: list[str] | str | LoRAConfig | None = None, r: int = LoRAConfig.r,
               alpha: float = LoRAConfig.alpha, dropout: float = LoRAConfig.dropout,
               modules_to_save: list[str] | None = None, use_rslora: bool = LoRAConfig.use_rslora,
               use_dora: bool = False, rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None, *, target_modules: list[str] | str | None = None,
               lora_alpha: float | None = None, lora_dropout: float | None = None) -> nn.Module:
    """Freeze `model` and swap the targeted layers for LoRA layers, in place; returns the model.

    The settings are LoRAConfig's (see there), given one by one or as a whole LoRAConfig in place of
    `targets` (a recipe's [lora] section, an adapter's settings); PEFT's names (target_modules,
    lora_alpha, lora_dropout) are exact aliases. The adapter is named "default" (add_adapter puts more
    beside it)."""
    if isinstance(targets, LoRAConfig):
        if any(v is not None for v in (target_modules, lora_alpha, lora_dropout)):
            raise ConfigError("apply_lora: the settings come from the LoRAConfig given; set target_modules, lora_alpha "
                              "and lora_dropout there")
        config = targets
    elif targets is None and target_modules is None:
        raise ConfigError("apply_lora: name the layers to adapt: targets (or PEFT's target_modules)")
    else:
        config = LoRAConfig(list(PEFT_DEFAULTS["targets"]) if targets is None else targets, r, alpha, dropout,
                            modules_to_save or [], use_rslora, use_dora, rank_pattern or {}, alpha_pattern or {},
                            target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    if lora_modules(model):
        raise ConfigError(f"the model already carries LoRA layers ({len(lora_modules(model))}): remove_lora(model) "
                          "first, or add_adapter(model, name, config) for a second adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    _put_lora(model, config)
    _train_in_full(model, config)
    model.lora_adapters, model.active_adapter, model.lora_config = {"default": config}, "default", config
    return model


def _put_lora(model: nn.Module, config: LoRAConfig) -> None:
    """A fresh adapter of `config` on every layer it targets: plain layers are wrapped, LoRA layers get
    it as their active adapter (their current one must have been stored first). Every target is checked
    before any is changed."""
    holders, plan = owners(model), []
    for name in find_targets(model, config.targets):
        module = model.get_submodule(name)
        r, alpha = config.settings_for(name)
        embedding = isinstance(module, nn.Embedding) or getattr(module, "is_embedding", False)
        shape = (module.num_embeddings, module.embedding_dim) if embedding else (module.in_features, module.out_features)
        tied = [t for t in holders.get(id(module.weight), []) if t != name]
        try:
            check_lora_hyperparameters(r, alpha, config.dropout, min(shape))
            if embedding and config.use_dora:
                raise ConfigError("DoRA on an embedding layer is not supported: leave it out of the targets")
            if tied and config.ensure_weight_tying:  # PEFT then adapts the tied layer too, with the same A and B
                raise ConfigError(f"LoRA on a layer tied to {', '.join(tied)} with ensure_weight_tying is not "
                                  "supported here (without it, the update applies to this layer alone)")
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        plan.append((name, module, r, alpha))
    for name, module, r, alpha in plan:
        if isinstance(module, LoRALayer):
            module.new_adapter(r, alpha, config.dropout, config.use_rslora, config.use_dora)
        elif isinstance(module, nn.Embedding):
            replace_module(model, name, LoRAEmbedding(module, r, alpha, config.use_rslora).train(module.training))
        else:  # keep the model's train/eval mode: a new module starts in training mode, dropout on
            replace_module(model, name, LoRALinear(module, r, alpha, config.dropout, config.use_rslora,
                                                   config.use_dora).train(module.training))


def _train_in_full(model: nn.Module, config: LoRAConfig) -> None:
    """modules_to_save become trainable. A tied one gets its own copy, unless ensure_weight_tying."""
    holders = owners(model)
    for t in config.modules_to_save:
        found = find_saved(model, [t])
        if not found and t in CLASSIFIER_NAMES and getattr(model, "task_type", None) == "SEQ_CLS":
            continue  # another family's name for the classifier (PEFT lists both)
        if not found:
            raise ConfigError(f"modules_to_save entry {t!r} matches no module of {type(model).__name__}")
        for n, m in found:
            if isinstance(m, LoRALayer) or not all(p.is_floating_point() for p in m.parameters()):
                raise ConfigError(f"modules_to_save entry {t!r}: {n} is adapted by LoRA or quantized, not trainable")
            for key, p in list(m.named_parameters(recurse=False)):
                if len(holders[id(p)]) > 1 and not config.ensure_weight_tying:
                    m.untied = {**getattr(m, "untied", {}), key: p}  # the shared original, for remove_lora
                    setattr(m, key, nn.Parameter(p.detach().clone()))
            for p in m.parameters():
                p.requires_grad_(True)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    """The LoRA layers of the model that carry the active adapter."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.active]


def _all_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


# --- several named adapters --------------------------------------------------------------------------

def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> nn.Module:
    """A second (third, ...) adapter beside those on the model, freshly initialised, made active. LoRA
    tensors only: modules_to_save belong to one adapter at most here."""
    adapters = getattr(model, "lora_adapters", None) or {}
    _check_name(name, adapters)
    if not adapters:
        apply_lora(model, config)
        model.lora_adapters, model.active_adapter = {name: config}, name
        return model
    if config.modules_to_save or any(c.modules_to_save for c in adapters.values()):
        raise ConfigError("several adapters with modules_to_save are not supported: only LoRA tensors can be swapped")
    _check_unmerged(model)
    _stash(model)
    try:
        _put_lora(model, config)
    except ConfigError:
        _stash(model, keep=False)  # whatever the failed attempt put on, then the active adapter back
        _unstash(model, model.active_adapter)
        raise
    for _, m in lora_modules(model):
        for p in m.parameters(recurse=True):
            p.requires_grad_(p is not m.weight and p is not getattr(m, "bias", None))
    adapters[name] = config
    model.active_adapter, model.lora_config = name, config
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter the active one (its tensors the layers' own, trainable)."""
    adapters = getattr(model, "lora_adapters", {})
    if name not in adapters:
        raise ConfigError(f"no adapter named {name!r} on the model (it has {', '.join(adapters) or 'none'})")
    if name != model.active_adapter:
        _check_unmerged(model)
        _stash(model)
        _unstash(model, name)
        model.active_adapter, model.lora_config = name, adapters[name]
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop a named adapter that is not the active one."""
    if name == getattr(model, "active_adapter", None):
        raise ConfigError(f"adapter {name!r} is the active one: set_adapter another first")
    if name not in getattr(model, "lora_adapters", {}):
        raise ConfigError(f"no adapter named {name!r} on the model")
    for _, m in _all_lora_layers(model):
        m.stored.pop(name, None)
    del model.lora_adapters[name]


def _stash(model: nn.Module, keep: bool = True) -> None:
    """Every layer's active adapter into its store, under the active name (or dropped, without `keep`);
    the layers left empty."""
    for _, m in _all_lora_layers(model):
        if m.active and keep:
            m.stored[model.active_adapter] = {a: getattr(m, a) for a in m.slot}
        for a in m.slot:
            if isinstance(getattr(m, a), (nn.Module, nn.Parameter)):
                setattr(m, a, None)


def _unstash(model: nn.Module, name: str) -> None:
    """The named adapter's tensors back into the layers that have it, moved to the layer's device."""
    for _, m in _all_lora_layers(model):
        for a, value in m.stored.pop(name, {}).items():
            if isinstance(value, nn.Parameter) and value.device != m.weight.device:
                value = nn.Parameter(value.to(m.weight.device), requires_grad=value.requires_grad)
            elif isinstance(value, nn.Module):
                value = value.to(m.weight.device)
            setattr(m, a, value)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str) -> nn.Module:
    """A new adapter whose update is Σ w_i ΔW_i exactly, from LoRA adapters on the model (PEFT's
    combination_type="cat"): A = [A_1; A_2; ...] stacked along the rank, B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
    side by side, so B A = Σ w_i s_i B_i A_i; its rank is the sum of theirs and alpha equals it (s = 1).
    The new adapter is added, not made active. (PEFT's own "cat" copies use_rslora from the first
    adapter, so that its result is √r times the sum for rsLoRA adapters; here it is the sum.)"""
    known = getattr(model, "lora_adapters", {})
    if len(adapters) != len(weights) or not adapters or any(a not in known for a in adapters):
        raise ConfigError(f"add_weighted_adapter: adapters {adapters!r} (of {', '.join(known) or 'none'}) and weights "
                          f"{weights!r} must be as many, and name adapters on the model")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
    if any(known[a].use_dora or known[a].modules_to_save for a in adapters):
        raise ConfigError("add_weighted_adapter: the adapters must be plain LoRA (no DoRA, no modules_to_save)")
    _check_name(name, known)
    _check_unmerged(model)
    active = model.active_adapter
    _stash(model)
    parts: dict[str, list] = {}  # layer name -> [(A, w·s·B)] over the adapters that adapt it
    for n, m in _all_lora_layers(model):
        for a, w in zip(adapters, weights):
            if a in m.stored:
                slot = m.stored[a]
                A, B = (slot["lora_A"].weight, slot["lora_B"].weight) if "lora_A" in slot else \
                    (slot["lora_embedding_A"], slot["lora_embedding_B"])
                parts.setdefault(n, []).append((A.detach(), B.detach() * (w * slot["scaling"])))
    ranks = {n: sum(A.shape[0] for A, _ in p) for n, p in parts.items()}
    r = max(ranks.values())
    config = LoRAConfig(sorted(parts), r=r, alpha=r, rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(n): k for n, k in ranks.items() if k != r})
    _put_lora(model, config)
    with torch.no_grad():
        for n, p in parts.items():
            m = model.get_submodule(n)
            A, B = torch.cat([a for a, _ in p]), torch.cat([b for _, b in p], dim=1)
            (m.lora_A.weight if isinstance(m, LoRALinear) else m.lora_embedding_A).copy_(A)
            (m.lora_B.weight if isinstance(m, LoRALinear) else m.lora_embedding_B).copy_(B)
    model.lora_adapters[name], model.active_adapter = config, name
    _stash(model)
    _unstash(model, active)
    model.active_adapter = active
    return model


def _check_name(name: object, adapters: dict) -> None:
    """A new adapter's name: not taken, and usable as a subfolder's name (PEFT's layout)."""
    if not isinstance(name, str) or not name or name in adapters or "." in name or "/" in name or name != name.strip():
        raise ConfigError(f"adapter name {name!r}: expected a new name without '.' or '/' "
                          f"(the model has {', '.join(adapters) or 'none'})")


def _check_unmerged(model: nn.Module) -> None:
    if any(m.merged for _, m in _all_lora_layers(model)):
        raise ConfigError("the active adapter is merged into the base weights: unmerge_lora(model) first")


# --- the base model alone, merged, or back without LoRA -----------------------------------------------

@contextmanager
def adapter_disabled(model: nn.Module):
    """Run the base model alone inside the block (to compare with the adapted one)."""
    layers = [m for _, m in lora_modules(model)]
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable a merged adapter: unmerge_lora(model) first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA layer's update into its W0; refused where W0 is shared (a head tied to the embeddings)."""
    holders = owners(model)
    tied = [", ".join(holders[id(m.weight)]) for _, m in lora_modules(model) if len(holders[id(m.weight)]) > 1]
    if tied:
        raise ConfigError(f"a LoRA layer's weight is tied ({tied[0]}): merging it would change both")
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Swap every LoRA layer back for a plain nn.Linear / nn.Embedding, in place: merged first (the active
    adapter), or with merge=False the base model as it was (tied heads tied again)."""
    if merge:
        merge_lora(model)
    for name, m in _all_lora_layers(model):
        if getattr(m, "base_linear", None) is not None and not merge:
            raise ConfigError(f"{name}: removing LoRA from a quantized (int8, 4-bit or GGUF-block) base is not "
                              "supported; reload the base model")
        if not merge:
            m.unmerge()  # the base layer as it was, even after merge_lora
        if isinstance(m, LoRAEmbedding):
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device="meta")
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.bias = m.bias
        plain.weight = m.weight
        replace_module(model, name, plain)
    if not merge:
        for _, m in model.named_modules():
            for key, original in getattr(m, "untied", {}).items():
                setattr(m, key, original)
            if hasattr(m, "untied"):
                del m.untied
    for attribute in ("lora_config", "lora_adapters", "active_adapter"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model
