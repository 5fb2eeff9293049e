"""PEFT adapter folders read and put on a model: read_adapter, read_adapter_meta, adapter_classes,
load_adapter (every key must match a tensor of the model, with its shape), and the refusals every
reader asks first (a training run's folder, an adapter for another base). Also the format's own
names, which the writer (peft_files.py) shares: the files, the key prefix, PEFT's tensor names <-> the
model's, and the PEFT options refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..formats.atomic import recover
from ..formats.paths import read_json
from ..formats.safetensors import check_tensor, pickle_tensors, safetensors_tensors
from ..names import find_saved
from ..quant.base import QuantizedLinear
from .adapters import add_adapter, delete_adapter, set_adapter
from .config import PEFT_NAMES, LoRAConfig, lora_state
from .initialise import LATER, changes_the_base, factors, keep_the_residual, loftq_base
from .inject import all_lora_layers, lora_modules, remove_lora
from .layers import LoRALinear

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
META_FILE = "minilora.json"  # what PEFT has no field for: the base model's shape, labels, the best step

# PEFT options with no counterpart here: an adapter using one is refused, never loaded half-understood.
UNSUPPORTED = {"lora_bias": "a trained bias on lora_B", "trainable_token_indices": "trainable rows of the embeddings",
               "layers_to_transform": "LoRA on some layers only", "layer_replication": "replicated layers",
               "use_qalora": "QALoRA", "alora_invocation_tokens": "activated LoRA"}


_PARTS = r"(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)"


def _peft_name(name: str, adapter: str) -> str | None:
    """A model state-dict name of `adapter`'s own tensors -> PEFT's saved name (None for anything else):
    model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight -> model.layers.0.self_attn.q_proj.lora_A.weight"""
    match = re.fullmatch(rf"(.+)\.adapters\.{re.escape(adapter)}\.{_PARTS}(\.weight)?", name)
    return None if match is None else f"{match[1]}.{match[2]}{match[3] or ''}"


def _model_name(peft: str, adapter: str) -> str:
    """PEFT's saved (or live) name of a LoRA tensor -> this model's name of it in `adapter`."""
    name = re.sub(rf"\.{_PARTS}\.default\b", r".\1", peft)  # PEFT's live names carry the adapter's name
    if name.endswith(".lora_magnitude_vector.weight"):  # ... and its magnitude module's ".weight"
        name = name.removesuffix(".weight")
    return re.sub(rf"\.{_PARTS}\b", rf".adapters.{adapter}.\1", name, count=1)


def lora_config_from_peft(config: dict[str, Any], file: Path, keys: list[str] = ()) -> LoRAConfig:
    """The LoRA settings of a PEFT adapter_config.json. A target regex in the file is neither checked nor
    run (one can be made to backtrack for minutes): the adapter's tensor `keys` name every adapted
    module, and those names become the targets."""
    for required in ("target_modules", "r", "lora_alpha"):
        if config.get(required) is None:
            raise CheckpointError(f"{file}: missing field {required!r}"
                                  + (" (it is null)" if required in config else ""))
    settings = {ours: config[peft] for ours, peft in PEFT_NAMES.items() if config.get(peft) is not None}
    if str(settings.get("init_lora_weights")).lower() in LATER:  # CorDA, EVA, ...: the tensors are all it takes
        settings["init_lora_weights"] = True                      # (with the base they were saved beside)
    if isinstance(settings["targets"], str) and settings["targets"] not in ("all-linear", "all_linear"):
        names = sorted({re.split(r"\.lora_(?:embedding_)?A\b", k.removeprefix(PREFIX))[0] for k in keys
                        if ".lora_A." in k or k.endswith(".lora_embedding_A")})
        settings["targets"] = names or ["(none: the adapter has no lora_A tensors)"]
    try:
        return LoRAConfig(**settings)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Enough of the base model to refuse an adapter meant for another one, beyond shape checks (the
    model's own fingerprint; {} for a model outside the registry)."""
    return model.fingerprint() if hasattr(model, "fingerprint") else {}


def refuse_a_run_folder(folder: Path) -> None:
    """A training run's folder (metrics.jsonl, adapter/, checkpoints) where an adapter is asked for: a
    CheckpointError that names its adapter, its best one and its checkpoints (every reader and push say so)."""
    if (folder / CONFIG_FILE).is_file() or not (folder / "metrics.jsonl").is_file():
        return
    named = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    checkpoints = [n for n in named if n.startswith("checkpoint-")]
    raise CheckpointError(f"{folder}: a training run's folder, not an adapter: "
                          + (f"its adapter is {folder / 'adapter'}" if "adapter" in named else
                             "it has no adapter/ yet (the run did not finish)")
                          + (f" (the best one: {folder / 'best'})" if "best" in named else "")
                          + (f"; checkpoints: {', '.join(checkpoints)}" if checkpoints else ""))


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter's tensors (safetensors, or PEFT's older adapter_model.bin)."""
    folder = Path(os.path.expanduser(str(folder)))
    recover(folder)  # a writer killed between its two renames left the previous version aside
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    refuse_a_run_folder(folder)
    named = sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    if not (folder / CONFIG_FILE).is_file() and named:  # PEFT's layout with no "default" adapter
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} here, but named adapters in {', '.join(named)}: load "
                              f"each with load_adapter(model, {str(folder / named[0])!r}, adapter_name={named[0]!r})")
    config = read_json(folder / CONFIG_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{folder / CONFIG_FILE}: {key} = {config[key]!r} ({what}) is not supported here")
    if (folder / WEIGHTS_FILE).is_file():
        tensors = dict(safetensors_tensors(folder / WEIGHTS_FILE))
    elif (folder / "adapter_model.bin").is_file():
        tensors = dict(pickle_tensors(folder / "adapter_model.bin"))
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE}")
    return config, tensors


def read_adapter_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """minilora.json of an adapter folder, or {} for one saved by PEFT. Its base_model is an object of
    config values, its id2label (a classifier's) maps class ids to names."""
    file = Path(os.path.expanduser(str(folder))) / META_FILE
    meta = read_json(file) if file.is_file() else {}
    if not isinstance(meta.get("base_model", {}), dict):
        raise CheckpointError(f"{file}: base_model is {meta['base_model']!r}, expected an object of config values")
    labels = meta.get("id2label")
    if labels is not None and not (isinstance(labels, dict) and all(str(k).isdecimal() and isinstance(v, str)
                                                                     for k, v in labels.items())):
        raise CheckpointError(f"{file}: id2label is {labels!r}, expected an object of class id -> name")
    return meta


def adapter_classes(folder: str | os.PathLike) -> dict[str, Any]:
    """What a classifier adapter says of its classes, as load_model's arguments (`load_model(base,
    task="classification", **adapter_classes(folder))`): the label names of minilora.json, else of a
    config.json saved beside the adapter (as a transformers Trainer may), else only the number of rows
    of the saved classifier (PEFT writes no names; the base model's are kept if as many). {} for an
    adapter without a classifier."""
    meta = read_adapter_meta(folder)
    if meta.get("id2label"):
        return {"id2label": {int(i): name for i, name in meta["id2label"].items()}}
    _, tensors = read_adapter(folder)
    rows = [t.shape[0] for k, t in tensors.items() if k.removeprefix(PREFIX) in ("classifier.weight", "score.weight")]
    beside = Path(os.path.expanduser(str(folder))) / "config.json"
    labels = read_json(beside).get("id2label") if beside.is_file() else None
    if isinstance(labels, dict) and labels and rows and len(labels) == rows[0]:
        if sorted(str(k) for k in labels) != sorted(str(i) for i in range(len(labels))):
            raise CheckpointError(f"{beside}: id2label is {labels!r}, expected the class ids 0, 1, ... -> names")
        return {"id2label": {int(i): str(name) for i, name in labels.items()}}
    return {"num_labels": rows[0]} if rows else {}


def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Put an adapter on `model` (applying LoRA as its config says, if the model has none yet) and load
    its tensors. Every adapter key must match a tensor of the model with the same shape.

    adapter_name: a name for it beside the adapters already on the model (PEFT's
    load_adapter(folder, adapter_name)); the active adapter stays the active one (set_adapter switches)."""
    config, tensors = read_adapter(folder)
    where = Path(folder) / (WEIGHTS_FILE if (Path(folder) / WEIGHTS_FILE).is_file() else "adapter_model.bin")
    refuse_another_base(model, folder)
    settings = lora_config_from_peft(config, Path(folder) / CONFIG_FILE, list(tensors))
    state = lora_state(model)
    previous = list(state.active) if state is not None else None
    added = state is None or adapter_name is not None and adapter_name not in state.adapters
    target = adapter_name or ("default" if state is None else state.active_adapter)
    how = settings.init_lora_weights
    if added and isinstance(how, str) and how.startswith("pissa_niter_"):
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE}: init_lora_weights {how!r} is randomized, so the "
                              "residual base it was trained on cannot be rebuilt from this base; load it onto the "
                              "model it was trained in, or train with \"pissa\" (an exact SVD)")
    if added and how == "loftq" and any(isinstance(m, QuantizedLinear) or isinstance(m, LoRALinear) and m.quantized
                                        is not None for m in model.modules()):
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE}: a LoftQ adapter trains beside the quantized base Q that "
                              "LoftQ makes from the float weights; load the base in floating point (no load_in_8bit, "
                              "load_in_4bit or keep_quantized) and Q is rebuilt from it, as it was made")
    try:
        if added:  # the adapter's tensors replace any start; PiSSA/OLoRA's residual base comes after they fit
            add_adapter(model, target, dataclasses.replace(settings, init_lora_weights=True, loftq_config={}))
            lora_state(model).adapters[target] = settings
        else:  # into an adapter already on the model (the named one, active or not): same settings only
            _check_same_settings(model, target, settings, folder)
        _load_tensors(model, tensors, settings, where, target)
    except (ConfigError, CheckpointError) as e:
        if added and previous is None:  # leave the model as it was
            if lora_modules(model):
                remove_lora(model, merge=False)
        elif added:
            set_adapter(model, previous)
            delete_adapter(model, target)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE} does not fit this model: {e}") from None
    if added and changes_the_base(how):  # the base the adapter was trained beside: W - s·B0 A0, as PEFT rebuilds it
        for _, layer in all_lora_layers(model):
            if isinstance(layer, LoRALinear) and target in layer.adapters:
                a = layer.adapters[target]
                keep_the_residual(layer, target, *factors(layer.weight, a.r, a.scaling, how))
    if added and how == "loftq":  # LoftQ is deterministic: the same W gives the same Q (the start is not needed)
        for _, layer in all_lora_layers(model):
            if isinstance(layer, LoRALinear) and target in layer.adapters:
                loftq_base(layer, target, settings.loftq_config)
    if previous is not None:
        set_adapter(model, previous)
    return model


def refuse_another_base(model: nn.Module, folder: str | os.PathLike) -> None:
    """A CheckpointError when minilora.json says the adapter was trained on another kind of model than
    `model` (its model type, sizes): what every reader of an adapter with a base asks first."""
    expected = read_adapter_meta(folder).get("base_model") or {}
    actual = _base_fingerprint(model)
    wrong = [f"{k}: adapter {v!r} vs model {actual[k]!r}" for k, v in expected.items() if k in actual and actual[k] != v]
    if wrong:
        raise CheckpointError(f"{folder}: adapter was trained on another base model ({'; '.join(wrong)})")


def _check_same_settings(model: nn.Module, adapter: str, settings: LoRAConfig, folder) -> None:
    names = ("r", "alpha", "use_rslora", "dropout", "use_dora")
    for n, m in all_lora_layers(model):
        if adapter not in m.adapters:
            continue
        have = m.adapters[adapter].settings()
        want = (*settings.settings_for(n), settings.use_rslora, settings.dropout if isinstance(m, LoRALinear) else 0.0,
                settings.use_dora)
        if have != want:
            raise CheckpointError(f"{folder}: the adapter's LoRA settings for {n} ({', '.join(f'{k}={v!r}' for k, v in zip(names, want))}) "
                                  f"differ from those of the LoRA layer already there ({', '.join(f'{k}={v!r}' for k, v in zip(names, have))}); "
                                  "load it onto the base model without LoRA (remove_lora(model, merge=False), or a fresh "
                                  "load_model), or beside it with load_adapter(model, folder, adapter_name=...)")


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], settings: LoRAConfig, where: Path,
                  adapter: str) -> None:
    """Copy an adapter file's tensors into `adapter` on the model, once every key has matched a tensor of
    the same shape (and every tensor of the adapter has a key)."""
    state = model.state_dict(keep_vars=True)
    lora_layers = {n for n, m in all_lora_layers(model) if adapter in m.adapters}
    saved = {id(p) for _, m in find_saved(model, lora_state(model).adapters[adapter].modules_to_save)
             for p in m.parameters()}
    saved_tensors = {n for n, t in state.items() if id(t) in saved}  # a tied tensor under each of its names
    unmatched, mismatched, matched = [], [], {}
    for key, tensor in tensors.items():
        name = _model_name(key.removeprefix(PREFIX), adapter)
        layer = name.removesuffix(".base_layer.weight")
        table = layer != name and layer in lora_layers  # PEFT saves a LoRA embedding's table beside it
        if table:
            name = layer + ".weight"
        if name not in state or not (_peft_name(name, adapter) or name in saved_tensors or table):
            unmatched.append(key)  # nothing but the adapter's LoRA tensors and those of modules_to_save
        elif tuple(state[name].shape) != tuple(tensor.shape):
            mismatched.append(f"{key}: adapter {tuple(tensor.shape)} vs model {tuple(state[name].shape)}")
        else:
            check_tensor(str(where), key, tensor, state[name].is_floating_point())
            matched[name] = tensor
    missing = [_peft_name(n, adapter) for n in state if _peft_name(n, adapter) and n not in matched]
    if unmatched or mismatched or missing:
        parts = [f"{where} does not fit this model:"]
        if unmatched:
            parts.append(f"keys that match no module: {', '.join(unmatched[:4])}" + (" ..." if len(unmatched) > 4 else ""))
        if mismatched:
            parts.append(f"wrong shapes (another base model or rank?): {', '.join(mismatched[:4])}")
        if missing:
            parts.append(f"LoRA tensors the adapter lacks: {', '.join(missing[:4])}")
        raise CheckpointError(" ".join(parts))
    with torch.no_grad():  # only once everything fits: a bad adapter leaves the model as it was
        for name, tensor in matched.items():
            state[name].copy_(tensor)
