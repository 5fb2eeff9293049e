"""A model from a checkpoint (a Hub repo id, a local folder or a GGUF file), and back to a checkpoint.

The model is built on the `meta` device, which allocates nothing, and each tensor from disk (read one
at a time by files.py or gguf.py) is converted and put in its place: a tensor kept as stored is a view
of a copy-on-write memory map of the file, any other is read, converted and dropped. Peak memory while
loading is therefore about one model plus one tensor, not two models.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import hardware
from ..errors import CheckpointError, ConfigError
from ..formats.atomic import check_replaceable, write_atomically
from ..formats.gguf import gguf_config, gguf_tensors, kept_blocks, read_gguf
from ..formats.paths import TOKENIZER_FILES, read_json, resolve
from ..formats.safetensors import Tensors, check_tensor, checkpoint_tensors
from ..hardware import release_freed_memory
from ..models import PRESETS, PretrainedModel, build_model
from ..models.common import Provenance
from ..quant.base import LoadPlan, QuantizedLinear, Quantizer
from ..quant.ggml import GGMLKeeper
from ..quant.int8 import Int8Quantizer
from ..quant.nf4 import NF4Quantizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(value: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """A floating dtype given as torch's or by name ("bf16", "float32", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ConfigError(f"{where}: unknown dtype {value!r}; use one of {', '.join(DTYPES)} (or a floating torch.dtype)")


def check_device(value: str | torch.device, where: str = "device") -> torch.device:
    """A device torch knows and this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{where}: {value!r} is not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{where}: {value!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "meta":
        raise ConfigError(f"{where}: 'meta' holds no data; weights are loaded onto a real device (cpu, cuda)")
    if device.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"{where}: {value!r} is not usable here ({str(e).splitlines()[0]})") from None
    return device


def load_config(source: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """config.json as a dict, fetching nothing but that file for a Hub id; built-in presets when offline."""
    if str(source) in PRESETS and not Path(str(source)).exists():
        try:
            return read_json(resolve(source, revision, files=["config.json"]) / "config.json")
        except CheckpointError:
            return dict(PRESETS[str(source)])
    path = resolve(source, revision, files=["config.json"])
    if path.suffix == ".gguf":
        return gguf_config(read_gguf(path))
    if path.is_file():
        raise CheckpointError(f"{path}: expected a folder with config.json, or a .gguf file")
    return read_json(path / "config.json")


def load_weights(model: PretrainedModel, tensors: Tensors, source: str, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu",
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """Stream (name, tensor) pairs into a model built on `meta`, key for key. Floating tensors are cast
    to `dtype` (None keeps the checkpoint's: the dtype of its first floating tensor). Raises
    CheckpointError naming missing, unexpected and mis-shaped keys. `transform` may replace a tensor (a
    quantizer's, quant/base.LoadPlan). Returns the names of the task-head tensors made fresh because the
    checkpoint lacked them."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.tied_weights
    for alias in tied:
        expected.pop(alias, None)
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for name, tensor in tensors:
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype  # "the checkpoint's own": its first floating tensor's, for every tensor alike
        converted = model.checkpoint_to_model(name, tensor)
        if converted is None:
            continue
        name, tensor = converted
        if name in tied:  # the head saved next to the embedding it is tied to
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if name.endswith(".weight") and isinstance(owner, QuantizedLinear) and owner.quantized_on_load:  # NF4
            want = (*want[:-1], want[-1] * owner.packed_elements)
        if tuple(tensor.shape) != want:
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {want}")
            continue
        check_tensor(source, name, tensor, expected[name].is_floating_point())
        if transform is not None:  # sees the checkpoint's own tensor (int8 quantizes from full precision)
            tensor = transform(name, tensor)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        set_tensor(model, name, tensor.to(device))  # GPT-2's Conv1D weights stay transposed views, uncopied
        if transform is not None:
            del tensor
            release_freed_memory()
        seen.add(name)
    missing, fresh = [], []
    for name in (n for n in expected if n not in seen):
        head = model.init_head(name, expected[name].shape, device)  # a head a bare encoder has not got
        if head is None:
            missing.append(name)
        else:
            set_tensor(model, name, head.to(dtype) if dtype is not None else head)
            fresh.append(name)
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(source, type(model).__name__, missing, unexpected, mismatched))
    model.tie_weights()
    return fresh


def mismatch_message(source: str, model_name: str, missing: list[str], unexpected: list[str],
                     mismatched: list[str]) -> str:
    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    parts = [f"{source} does not match {model_name}:"]
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if mismatched:
        parts.append(f"wrong shapes: {few(mismatched)}")
    if len(missing) > 2 and len(unexpected) > 2:
        parts.append("(is it a checkpoint of another architecture?)")
    return " ".join(parts)


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the parameter or buffer `name` (which may live on `meta`)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        owner._buffers[attr] = tensor


def load_model(source: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: torch.device | str = "cpu", revision: str | None = None, load_in_8bit: bool = False,
               int8_skip: tuple[str, ...] | None = None, int8_threshold: float = 6.0, task: str | None = None,
               num_labels: int | None = None, id2label: dict[int, str] | None = None,
               load_in_4bit: bool = False, keep_quantized: bool = False, shard: bool = False) -> PretrainedModel:
    """Load a model by Hub repo id, local folder or .gguf file, with its pretrained weights, in eval mode.

    dtype: floating tensors are cast to it (None keeps the checkpoint's own dtypes).
    load_in_8bit: every linear layer but the model's output heads (or the names in int8_skip) becomes an
    Int8Linear, each weight quantized as it is read, so the full-precision model never exists in memory.
    load_in_4bit: the same with NF4 and double quantization (nf4.NF4Linear, QLoRA's 4-bit base).
    keep_quantized: for a .gguf file, its quantized linear weights stay in their own blocks (Q4_K, Q8_0,
    ...; ggml.GGMLLinear) as the frozen base, instead of being dequantized to float.
    task: "causal-lm", or for encoders "classification" (with num_labels / id2label) or "embedding".
    shard: for FSDP (training/fsdp.py), from a safetensors folder: nothing is read now; every tensor is a
    placeholder of its shape and dtype that holds no memory (one element, expanded), and each rank later
    reads only its slices (slice_reader). A .gguf or pytorch_model.bin loads whole, as without it.
    """
    dtype, device = torch_dtype(dtype), check_device(device)
    if load_in_8bit and load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit: choose one")
    path = resolve(source, revision)
    hardware.warn_if_slow(dtype, device, str(source))
    if keep_quantized and (path.suffix != ".gguf" or load_in_8bit or load_in_4bit):
        raise ConfigError(f"keep_quantized keeps a .gguf file's own blocks: {path} is not one" if path.suffix != ".gguf"
                          else "keep_quantized, load_in_8bit and load_in_4bit: choose one")
    if path.suffix == ".gguf":
        file = read_gguf(path)
        config, tensors, where = gguf_config(file), None, str(path)
    elif path.is_dir():
        mapped = dtype if not (load_in_8bit or load_in_4bit) and torch.device(device).type == "cpu" else None
        config, tensors, where = read_json(path / "config.json"), checkpoint_tensors(path, mapped), str(path)
    else:
        raise CheckpointError(f"{path}: expected a folder with config.json and *.safetensors, or a .gguf file")
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label or num_labels not in (None, len(id2label)):
            raise ConfigError(f"id2label must name the classes ({id2label!r}), and num_labels={num_labels} agree with it")
        config = {**config, "id2label": {str(i): name for i, name in id2label.items()}, "num_labels": len(id2label)}
    elif num_labels is not None and len(config.get("id2label") or {}) != num_labels:  # else keep the names
        config = {**config, "num_labels": num_labels, "id2label": None}
    with torch.device("meta"), _no_random_init():
        model = build_model(config, f"{where}/config.json" if path.is_dir() else where, task)
    quantizer, quantization = _quantizer(load_in_8bit, load_in_4bit, keep_quantized, file if path.suffix == ".gguf"
                                         else None, int8_threshold, dtype)
    plan = quantizer.prepare(model, int8_skip, device) if quantizer is not None else LoadPlan()
    if path.suffix == ".gguf":  # the raw blocks of the layers a quantized base keeps, the rest in float
        tensors = gguf_tensors(file, plan.raw)
    if shard and path.is_dir() and not (path / "pytorch_model.bin").is_file():
        fresh = _placeholders(model, dtype, device)
    else:
        fresh = load_weights(model, tensors, where, dtype, device, plan.transform)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: these tensors were never filled: {', '.join(left[:5])}")
    model.provenance = Provenance(str(source), path, "gguf" if path.suffix == ".gguf" else "safetensors",
                                  quantization, config, tuple(fresh))
    return model.eval()


def _placeholders(model: PretrainedModel, dtype: torch.dtype | None, device: torch.device) -> list[str]:
    """load_model(shard=True): every tensor a stand-in that holds one element (expanded to its shape, in
    its final dtype: apply_lora reads the device and dtype), ties kept; nothing is fresh."""
    made: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is not None and id(t) not in made:
                    kind = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    stand_in = torch.zeros((), dtype=kind, device=device).expand(t.shape)
                    made[id(t)] = nn.Parameter(stand_in, requires_grad=False) if store is m._parameters else stand_in
                if t is not None:
                    store[key] = made[id(t)]
    model.tie_weights()
    return []


def slice_reader(model: PretrainedModel) -> Callable[[str, tuple[int, ...], int, int | None], torch.Tensor] | None:
    """For a model loaded with shard=True: read(name, shape, r0, r1), rows r0..r1 (r1 None: all) of the
    model's tensor `name` (of the model's `shape`, in its layout: GPT-2's Conv1D columns, transposed) as
    the checkpoint stores it, read with safetensors' get_slice, one tensor at a time; None where the
    model was not loaded from a safetensors folder (it loaded whole)."""
    from safetensors import safe_open
    folder = model.provenance.path if model.provenance is not None else None
    if folder is None or not Path(folder).is_dir() or (Path(folder) / "pytorch_model.bin").is_file():
        return None
    index = Path(folder) / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    where: dict[str, tuple[Path, str, bool]] = {}
    for file in files:
        with safe_open(str(Path(folder) / file), "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                converted = model.checkpoint_to_model(key, torch.empty(shape, device="meta"))
                if converted is not None:  # the layout as the model's: the same, or transposed (Conv1D)
                    where[converted[0]] = (Path(folder) / file, key, not converted[1].is_contiguous())

    def read(name: str, shape: tuple[int, ...], r0: int = 0, r1: int | None = None) -> torch.Tensor:
        if name not in where:
            raise CheckpointError(mismatch_message(str(folder), type(model).__name__, [name], [], []))
        file, key, transposed = where[name]
        with safe_open(str(file), "pt") as f:
            rows = f.get_slice(key)
            stored = tuple(rows.get_shape())
            if (stored[::-1] if transposed else stored) != tuple(shape):
                raise CheckpointError(mismatch_message(str(folder), type(model).__name__, [], [], [
                    f"{name}: checkpoint {stored} vs model {tuple(shape)}"]))
            r1 = shape[0] if r1 is None else r1
            return rows[:, r0:r1].t() if transposed else rows[r0:r1] if stored else rows[:]
    return read


def _quantizer(load_in_8bit: bool, load_in_4bit: bool, keep_quantized: bool, gguf, threshold: float,
               dtype: torch.dtype | None) -> tuple[Quantizer | None, str | None]:
    """The quantizer load_model's flags ask for (they were checked to name one at most), and its name."""
    if load_in_8bit:
        return Int8Quantizer(threshold, dtype or torch.float32), "int8"
    if load_in_4bit:
        return NF4Quantizer(), "nf4"
    if keep_quantized:
        return GGMLKeeper(kept_blocks(gguf)), "gguf-blocks"
    return None, None


@contextlib.contextmanager
def _no_random_init():
    """Skip the modules' random initialisation while building on `meta`: the checkpoint overwrites every
    tensor, and on `meta` nn.init.normal_ alone costs 1.6 s the first time (it imports torch._dynamo)."""
    names = [n for n in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_")
             if hasattr(nn.init, n)]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def save_model(model: PretrainedModel, folder: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Save floating-point weights as model.safetensors under the checkpoint's own names and layout
    (GPT-2's Conv1D transposed back, tied heads left out), with config.json and the tokenizer,
    atomically. The folder loads here and in transformers.

    A quantized model (loaded in 8-bit) is refused, not dequantized: its weights are no longer the
    checkpoint's, and transformers could not read them. Load the base in floating point to save it.
    A folder that exists and is not empty is refused too, unless `overwrite` (it is replaced whole)."""
    if any("lora_" in n for n in model.state_dict()):
        raise CheckpointError("the model still has LoRA layers: merge them first (remove_lora(model))")
    if not overwrite:
        check_replaceable(Path(folder), frozenset(), "a model")
    quantized = [(n, p.dtype) for n, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise CheckpointError(f"cannot save a quantized model as a checkpoint ({quantized[0][0]} is {quantized[0][1]}, "
                              f"{len(quantized)} such weights): load the model without load_in_8bit/load_in_4bit and save that")
    tensors, state = {}, model.state_dict(keep_vars=True)
    # A head untied by training it alone (modules_to_save, as PEFT does) is saved, and no longer tied.
    untied = [alias for alias, source in model.tied_weights.items() if state[alias] is not state[source]]
    for name, tensor in state.items():
        if name not in model.tied_weights or name in untied:
            name, tensor = model.model_to_checkpoint(name, tensor)
            tensors[name] = tensor.detach().to("cpu").contiguous()
    config = dict(model.provenance.config if model.provenance is not None else {})
    if untied:
        config["tie_word_embeddings"] = False
    config.setdefault("architectures", [type(model).__name__])
    source = model.provenance.path if model.provenance is not None else None

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # safetensors' own writer: a full disk or a read-only folder comes as its error
            raise OSError(None, str(e).splitlines()[0] if str(e) else type(e).__name__,
                          str(tmp / "model.safetensors")) from None
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = False
        if source is not None and Path(source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    (tmp / name).write_bytes((Path(source) / name).read_bytes())
                    copied = True
        if not copied and tokenizer is not None:
            tokenizer.save(tmp)
    return write_atomically(folder, write)
