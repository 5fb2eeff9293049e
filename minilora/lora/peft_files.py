"""Adapters in the PEFT file format: a folder with adapter_config.json and adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and the full tensors of
`modules_to_save` under their own names (`base_model.model.classifier.weight`). Because minilora's
module names are the Hub's, these are our state-dict names with a prefix, less the adapter's name
(`<module>.adapters.<name>.lora_A.weight` in the model, as PEFT's own `<module>.lora_A.<name>.weight`
is in its): no table, no renaming. So an adapter saved here loads with `PeftModel.from_pretrained`,
and one saved by PEFT loads here.

Here: writing them (save_adapter, write_adapter_files, the tensors and adapter_config.json of one
adapter). Reading and loading them is peft_load.py, whose names are importable from here too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save

from ..errors import CheckpointError, ConfigError
from ..formats.atomic import check_replaceable, write_atomically
from ..names import find_saved
from .config import PEFT_NAMES, LoRAConfig, lora_state
from .convert import check_convertible, to_plain_lora
from .inject import lora_modules
from .peft_load import (  # noqa: F401 (the package, training, serving and tests take them from here)
    CONFIG_FILE,
    META_FILE,
    PREFIX,
    UNSUPPORTED,
    WEIGHTS_FILE,
    _base_fingerprint,
    _peft_name,
    adapter_classes,
    load_adapter,
    lora_config_from_peft,
    read_adapter,
    read_adapter_meta,
    refuse_a_run_folder,
    refuse_another_base,
)

ADAPTER_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, META_FILE, "adapter_model.bin", "README.md"})


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter (the active one by default) under PEFT's names: every LoRA A/B (DoRA's
    magnitudes, an embedding's A/B), and modules_to_save in full, under every name they have (a tied
    tensor under both, as PEFT)."""
    adapter, config = _adapter(model, adapter)
    state = model.state_dict(keep_vars=True)
    keys = {n: peft for n in state if (peft := _peft_name(n, adapter)) is not None}
    if not keys:
        raise CheckpointError("the model has no LoRA tensors to save (was apply_lora called?)")
    keep = []
    for target in config.modules_to_save:
        owners = [n for n, _ in find_saved(model, [target])]
        keep += [n for n in state if any(n.startswith(o + ".") for o in owners) and n not in keep]
    shared = {id(state[n]) for n in keep}
    aliases = [n for n in state if id(state[n]) in shared and n not in keep]
    out = {PREFIX + peft: state[n].detach().to("cpu").contiguous() for n, peft in keys.items()}
    out.update({PREFIX + n: state[n].detach().to("cpu").contiguous() for n in keep})
    return {**out, **{PREFIX + n: state[n].detach().to("cpu").clone() for n in aliases}}  # a file holds no alias


def _adapter(model: nn.Module, adapter: str | None = None) -> tuple[str, LoRAConfig]:
    """(name, settings) of the named adapter, or of the active one."""
    state = lora_state(model)
    if state is None or not lora_modules(model):
        raise CheckpointError("the model has no LoRA layers: call apply_lora (or load_adapter) first")
    name = adapter or state.active_adapter
    return name, state.adapters[name]


def adapter_config(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """adapter_config.json of one adapter (the active one by default), with the fields PEFT reads."""
    settings = {peft: getattr(_adapter(model, adapter)[1], ours) for ours, peft in PEFT_NAMES.items()}
    provenance = getattr(model, "provenance", None)
    return {
        "peft_type": "LORA",
        "task_type": getattr(model, "task_type", "CAUSAL_LM"),
        "base_model_name_or_path": provenance.source if provenance is not None else None,
        **settings,
        "modules_to_save": settings["modules_to_save"] or None,
        "fan_in_fan_out": bool(getattr(model, "conv1d_layout", False)),  # GPT-2's Conv1D, as PEFT records it
        "bias": "none",
        "inference_mode": True,
    }


def refuse_non_finite(tensors: dict[str, torch.Tensor]) -> None:
    """A CheckpointError naming the first tensor that holds NaN or inf: such an adapter is never saved
    (load_adapter would refuse it; an earlier good save stays as it was)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name.removeprefix(PREFIX)} holds NaN or infinite values: the adapter is not "
                                  "saved (a diverged run, or float16 LoRA weights whose update overflowed)")


def write_adapter_files(folder: Path, model: nn.Module, extra: dict[str, Any] | None = None,
                        adapter: str | None = None, converted: tuple[dict, dict] | None = None) -> None:
    """One adapter's three files (the active one's by default) into an existing folder (checkpoints add
    theirs beside them). converted: (tensors, adapter_config) to write instead of the model's own."""
    tensors, config = converted or (adapter_state_dict(model, adapter), adapter_config(model, adapter))
    refuse_non_finite(tensors)
    weights = save(tensors, metadata={"format": "pt"})
    (folder / WEIGHTS_FILE).write_bytes(weights)  # OSError names it
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    meta = {"base_model": _base_fingerprint(model), **(extra or {})}
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if getattr(model, "task_type", None) == "SEQ_CLS":  # the label names travel with a classifier's adapter
        names = {int(i): str(v) for i, v in (id2label or {}).items()} or {i: str(i) for i in range(model.config.num_labels)}
        meta["id2label"] = {str(i): v for i, v in sorted(names.items())}
        meta["label2id"] = {v: int(i) for i, v in meta["id2label"].items()}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict[str, Any] | None = None, *,
                 path_initial_model_for_weight_conversion: str | os.PathLike | None = None) -> Path:
    """Write the adapter folder atomically; returns its path. `extra` goes into minilora.json. A folder
    that holds an earlier adapter is replaced; one that holds anything else is refused.

    Several named adapters are saved in PEFT's layout: "default" in the folder itself, every other one
    in a subfolder of its name (which load_adapter(model, folder / name, adapter_name=name) reads).

    path_initial_model_for_weight_conversion (PEFT's name): the folder of a PiSSA/OLoRA adapter as
    save_adapter wrote it right after apply_lora, before training. The trained adapter is then saved as
    a plain LoRA of twice the rank on the original base, not on the residual one (convert.py): it loads
    on the base as published, with nothing rebuilt, and exports to GGUF. The model is not changed."""
    _adapter(model)  # refuse before touching the disk
    reserved = sorted(set(extra or {}) & {"base_model", "id2label", "label2id"})
    if reserved:
        raise ConfigError(f"extra: {reserved[0]!r} is minilora.json's own key")
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"extra: not JSON data ({e})") from None
    names = list(lora_state(model).adapters)
    check_replaceable(Path(folder), ADAPTER_FILES | set(names), "an adapter")
    if path_initial_model_for_weight_conversion is not None:
        initial = Path(os.path.expanduser(str(path_initial_model_for_weight_conversion)))
        converted = _converted(model, Path(folder), initial)
        return write_atomically(folder, lambda tmp: write_adapter_files(tmp, model, extra, converted=converted))
    if len(names) == 1:
        return write_atomically(folder, lambda tmp: write_adapter_files(tmp, model, extra))

    def write_each(tmp: Path) -> None:
        for name in names:
            where = tmp if name == "default" else tmp / name
            where.mkdir(exist_ok=True)
            write_adapter_files(where, model, extra, name)
    return write_atomically(folder, write_each)


def _converted(model: nn.Module, folder: Path, initial: Path) -> tuple[dict, dict]:
    """The model's one adapter as a plain LoRA on the original base, from its start saved in `initial`."""
    names = list(lora_state(model).adapters)
    if len(names) > 1:
        raise ConfigError(f"path_initial_model_for_weight_conversion converts a model's one adapter; this one has "
                          f"{', '.join(names)} (delete_adapter the others first)")
    config = adapter_config(model)
    check_convertible(config)
    if not (initial / CONFIG_FILE).is_file():
        raise CheckpointError(f"{initial}: path_initial_model_for_weight_conversion is "
                              + ("not an adapter folder (no " + CONFIG_FILE + ")" if initial.is_dir() else "no such folder")
                              + ": give the folder save_adapter wrote right after apply_lora, before training")
    if folder.resolve() == initial.resolve():
        raise ConfigError(f"{folder}: the converted adapter would replace the initial one it is made from: save it "
                          "to another folder")
    refuse_another_base(model, initial)
    initial_config, initial_tensors = read_adapter(initial)
    return to_plain_lora(adapter_state_dict(model), config, initial_tensors, initial_config, initial / CONFIG_FILE)
