"""LoRA on a model, by name: apply_lora, merge/unmerge/remove, and the base model alone.

This file knows nothing of model files: `apply_lora` swaps the targeted `nn.Linear` (a quantized base,
and named `nn.Embedding`) modules for the layers of layers.py, which keep the same `weight` and `bias`,
so every existing state-dict name stays; of a model it reads only the output heads it declares
("all-linear" leaves those alone). LoRA's state on the model is one LoRAState (config.py); several
named adapters (adapters.py) live side by side in each layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from ..errors import ConfigError
from ..names import CLASSIFIER_NAMES, find_saved, find_targets, owners, replace_module
from ..quant.base import QuantizedLinear
from .config import PEFT_DEFAULTS, LoRAConfig, LoRAState
from .embedding import LoRAEmbedding, LoRALayer
from .initialise import check_base, check_loftq_target, initialise, replaces_the_base
from .layers import LoRALinear, check_lora_hyperparameters
from .mixed import install, remove

LINEAR = (nn.Linear, QuantizedLinear, LoRALinear)  # what a target may be (a LoRA layer: for a second adapter)
EMBEDDING = (nn.Embedding, LoRAEmbedding)


def apply_lora(model: nn.Module, targets: list[str] | str | LoRAConfig | None = None, r: int = LoRAConfig.r,
               alpha: float = LoRAConfig.alpha, dropout: float = LoRAConfig.dropout,
               modules_to_save: list[str] | None = None, use_rslora: bool = LoRAConfig.use_rslora,
               use_dora: bool = False, rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None, *, init_lora_weights: bool | str = True,
               loftq_config: dict[str, int] | None = None, target_modules: list[str] | str | None = None,
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
                            init_lora_weights=init_lora_weights, loftq_config=loftq_config,
                            target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return put_first_adapter(model, config, "default")


def put_first_adapter(model: nn.Module, config: LoRAConfig, name: str) -> nn.Module:
    """apply_lora's work, for an adapter of any name: freeze the model, put the adapter on, record it."""
    if lora_modules(model):
        raise ConfigError(f"the model already carries LoRA layers ({len(lora_modules(model))}): remove_lora(model) "
                          "first, or add_adapter(model, name, config) for a second adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    put_lora(model, config, name)
    _train_in_full(model, config)
    model.lora_state = LoRAState({name: config}, [name])
    install(model)  # model(..., adapter_names=[...]): a mixed-adapter batch (mixed.py)
    return model


def put_lora(model: nn.Module, config: LoRAConfig, adapter: str) -> None:
    """A fresh adapter of `config`, named `adapter`, on every layer it targets, made the layer's active
    one: plain layers are wrapped, LoRA layers get it beside their others. Every target is checked
    before any is changed."""
    holders, plan = owners(model), []
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALayer))
    for name in find_targets(model, config.targets, LINEAR, EMBEDDING):
        if name.startswith(inside):  # a LoRA layer's own parts (its adapters' A and B, its base): never targets
            continue
        module = model.get_submodule(name)
        r, alpha = config.settings_for(name)
        embedding = isinstance(module, EMBEDDING)
        shape = (module.num_embeddings, module.embedding_dim) if embedding else (module.in_features, module.out_features)
        tied = [t for t in holders.get(id(module.weight), []) if t != name]
        try:
            check_lora_hyperparameters(r, alpha, config.dropout, min(shape))
            if embedding and config.use_dora:
                raise ConfigError("DoRA on an embedding layer is not supported: leave it out of the targets")
            if embedding and config.init_lora_weights == "loftq":
                raise ConfigError("init_lora_weights 'loftq' on an embedding layer is not supported (it quantizes "
                                  "linear layers): leave it out of the targets")
            if not embedding:
                check_base(config.init_lora_weights, isinstance(module, QuantizedLinear) or
                           isinstance(module, LoRALinear) and module.quantized is not None, config.use_dora)
            if not embedding and config.init_lora_weights == "loftq":
                check_loftq_target(module.in_features, config.loftq_config)
                if isinstance(module, LoRALinear):
                    raise ConfigError("init_lora_weights 'loftq' on a layer with LoRA adapters already: it would "
                                      "quantize their base too; put the LoftQ adapter on first")
            if not embedding and tied and replaces_the_base(config.init_lora_weights):
                raise ConfigError(f"init_lora_weights {config.init_lora_weights!r} would change the weight it shares "
                                  f"with {', '.join(tied)}: leave the tied layer out of the targets")
            if tied and config.ensure_weight_tying:  # PEFT then adapts the tied layer too, with the same A and B
                raise ConfigError(f"LoRA on a layer tied to {', '.join(tied)} with ensure_weight_tying is not "
                                  "supported here (without it, the update applies to this layer alone)")
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        plan.append((name, module, r, alpha))
    for name, module, r, alpha in plan:
        if isinstance(module, LoRALayer):
            module.add_adapter(adapter, r, alpha, config.dropout, config.use_rslora, config.use_dora)
            module.adapters[adapter].train(module.training)
        elif isinstance(module, nn.Embedding):
            replace_module(model, name, LoRAEmbedding(module, r, alpha, config.use_rslora, adapter).train(module.training))
        else:  # keep the model's train/eval mode: a new module starts in training mode, dropout on
            replace_module(model, name, LoRALinear(module, r, alpha, config.dropout, config.use_rslora,
                                                   config.use_dora, adapter_name=adapter).train(module.training))
        layer = model.get_submodule(name)
        if isinstance(layer, LoRALinear):
            initialise(layer, adapter, config.init_lora_weights, config.loftq_config)


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
    """The LoRA layers of the model that carry an active adapter."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer) and m.active]


def all_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    """Every LoRA layer of the model, whichever of its adapters are active."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


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
    for name, m in all_lora_layers(model):
        if isinstance(m, LoRALinear) and m.quantized is not None and not merge:
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
    model.__dict__.pop("lora_state", None)
    remove(model)
    return model
