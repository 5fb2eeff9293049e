"""Find a checkpoint (a Hub repo id, a local folder or a GGUF file), read its config, stream its tensors in.

The model is built on the `meta` device, which allocates nothing, and each tensor from disk (our own
safetensors reader, one tensor at a time) is converted and put in its place: a tensor kept as stored
is a view of a copy-on-write memory map of the file, any other is read, converted and dropped. Peak
memory while loading is therefore about one model plus one tensor, not two models.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError
from .models import build_model
from .models.gpt2 import PRESETS as GPT2_PRESETS
from .models.gptj import PRESETS as GPTJ_PRESETS

# What a model needs from a Hub repo: never the .bin/.h5/.msgpack duplicates of the same weights.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
             "merges.txt", "vocab.txt"]
PRESETS: dict[str, dict[str, Any]] = {**GPT2_PRESETS, **GPTJ_PRESETS}

Tensors = Iterator[tuple[str, torch.Tensor]]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith((".gguf", ".safetensors")) \
        or source.count("/") > 1 or os.sep in source and os.sep != "/"


def resolve(source: str | os.PathLike, revision: str | None = None, files: list[str] | None = None) -> Path:
    """A local folder or file as is; a Hub repo id downloaded (or found in the cache) with huggingface-hub.

    `revision` pins a Hub branch, tag or commit. HF_HUB_OFFLINE=1 makes huggingface-hub use its cache only.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    source = str(source)
    if _looks_local(source):
        raise CheckpointError(f"{source}: no such file or folder")
    from huggingface_hub import snapshot_download  # imported here: local use never touches the network code
    try:
        return Path(snapshot_download(repo_id=source, revision=revision, allow_patterns=files or HUB_FILES))
    except Exception as e:  # network down, repo missing, gated, bad id: all mean "not available"
        raise CheckpointError(f"{source}: not a local path, and the Hugging Face Hub could not provide it "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              "Pass a local folder with config.json and *.safetensors instead.") from None


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_config(source: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """config.json as a dict, fetching nothing but that file for a Hub id; built-in presets when offline."""
    if str(source) in PRESETS and not Path(str(source)).exists():
        try:
            return read_json(resolve(source, revision, files=["config.json"]) / "config.json")
        except CheckpointError:
            return dict(PRESETS[str(source)])
    path = resolve(source, revision, files=["config.json"])
    if path.suffix == ".gguf":
        meta, infos, _ = read_gguf(path)
        return gguf_config(meta, infos, path)
    if path.is_file():
        raise CheckpointError(f"{path}: expected a folder with config.json, or a .gguf file")
    return read_json(path / "config.json")


def checkpoint_tensors(folder: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """Every tensor of a Hub-style checkpoint folder, read one at a time: sharded or single safetensors,
    or (with torch's weights_only loader, which refuses arbitrary pickled objects) pytorch_model.bin.
    Safetensors tensors already of `map_dtype` are memory-mapped rather than read (see below)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        yield from _pickle_tensors(folder / "pytorch_model.bin")
        return
    else:
        raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for file in files:
        yield from safetensors_tensors(file, map_dtype)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_tensors(file: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """The tensors of one .safetensors file, one at a time.

    The format: 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    data. A tensor the model keeps as it is (its dtype is `map_dtype`) is a view of a private
    (copy-on-write) memory map of the file: no copy, the page cache's pages become the model's, as
    transformers does. Any other tensor is read into its own fresh buffer, so that memory is gone as
    soon as the model no longer needs it (a quantized or cast load drops each tensor after converting
    it) and nothing of the file stays resident: peak memory is the model plus one tensor."""
    if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    size = file.stat().st_size
    corrupt = f"{file}: not a readable safetensors file, truncated or corrupt"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{corrupt} (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{corrupt} (the header is not JSON)") from None
        header.pop("__metadata__", None)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if map_dtype is not None else None
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which is not supported")
            numel = int(np.prod(shape)) if shape else 1
            if end - begin != numel * dtype.itemsize or 8 + n + end > size:
                raise CheckpointError(f"{corrupt} (tensor {name} runs past the end of the file or has the wrong size)")
            if mapped is not None and dtype == map_dtype and numel and (8 + n + begin) % dtype.itemsize == 0:
                yield name, torch.frombuffer(mapped, dtype=dtype, count=numel, offset=8 + n + begin).reshape(shape)
                continue
            f.seek(8 + n + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield name, (torch.frombuffer(buffer, dtype=dtype) if numel else torch.empty(0, dtype=dtype)).reshape(shape)


def _pickle_tensors(file: Path) -> Tensors:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: refused; loading it needs more than weights_only=True allows, "
                              f"or it is corrupt ({type(e).__name__}). Convert it to safetensors.") from None
    yield from state.items()


def load_weights(model: nn.Module, tensors: Tensors, source: str, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu",
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """Stream (name, tensor) pairs into a model built on `meta`, key for key. Floating tensors are cast
    to `dtype` (None keeps the checkpoint's). Raises CheckpointError naming missing, unexpected and
    mis-shaped keys. `transform` may replace a tensor (int8 quantization hooks in here)."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.tied_weights
    for alias in tied:
        expected.pop(alias, None)
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for name, tensor in tensors:
        converted = model.checkpoint_to_model(name, tensor)
        if converted is None:
            continue
        name, tensor = converted
        if name in tied:  # the head saved next to the embedding it is tied to
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
            continue
        if transform is not None:  # sees the checkpoint's own tensor (int8 quantizes from full precision)
            tensor = transform(name, tensor)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        set_tensor(model, name, tensor.to(device))  # GPT-2's Conv1D weights stay transposed views, uncopied
        if transform is not None:
            del tensor
            release_freed_memory()
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    fresh = [n for n in missing if n.startswith(getattr(model, "head_keys", ()))]
    for name in fresh:  # a head the checkpoint (a bare encoder) has not got: it starts untrained
        head = model.init_head(name, expected[name].shape, device)
        set_tensor(model, name, head.to(dtype) if dtype is not None else head)
    missing = [n for n in missing if n not in fresh]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(source, type(model).__name__, missing, unexpected, mismatched))
    model.tie_weights()
    return model


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise, and a quantizing load
    that frees one large tensor per step would see its resident size creep up by their sum)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


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
               num_labels: int | None = None, id2label: dict[int, str] | None = None) -> nn.Module:
    """Load a model by Hub repo id, local folder or .gguf file, with its pretrained weights, in eval mode.

    dtype: floating tensors are cast to it (None keeps the checkpoint's own dtypes).
    load_in_8bit: every linear layer but the output head (int8_skip) becomes an Int8Linear, each
    weight quantized as it is read, so the full-precision model never exists in memory.
    task: "causal-lm", or for encoders "classification" (with num_labels / id2label) or "embedding".
    """
    path = resolve(source, revision)
    if dtype in (torch.bfloat16, torch.float16):
        from .quant import matmul_is_fast
        if not matmul_is_fast(dtype, torch.device(device).type):
            warnings.warn(f"{source}: loading in {dtype} on a {torch.device(device).type} whose {dtype} matrix "
                          "products are much slower than fp32 (no kernel for them: no AVX-512/AMX); use float32",
                          stacklevel=2)
    if path.suffix == ".gguf":
        meta, infos, data_start = read_gguf(path)
        config, tensors = gguf_config(meta, infos, path), gguf_tensors(path, meta, infos, data_start)
        where = str(path)
    elif path.is_dir():
        mapped = dtype if not load_in_8bit and torch.device(device).type == "cpu" else None
        config, tensors, where = read_json(path / "config.json"), checkpoint_tensors(path, mapped), str(path)
    else:
        raise CheckpointError(f"{path}: expected a folder with config.json and *.safetensors, or a .gguf file")
    if id2label is not None:
        config = {**config, "id2label": {str(i): name for i, name in id2label.items()}, "num_labels": len(id2label)}
    elif num_labels is not None:
        config = {**config, "num_labels": num_labels, "id2label": None}
    with torch.device("meta"), _no_random_init():
        model = build_model(config, f"{where}/config.json" if path.is_dir() else where, task)
    transform = None
    if load_in_8bit:
        from .quant import DEFAULT_SKIP, prepare_int8
        transform = prepare_int8(model, int8_skip if int8_skip is not None else DEFAULT_SKIP, int8_threshold,
                                 dtype or torch.float32, device)
    load_weights(model, tensors, where, dtype, device, transform)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: these tensors were never filled: {', '.join(left[:5])}")
    model.name_or_path = str(source)
    model.config_dict = config  # config.json as read, for saving a merged copy
    model.source_path = path
    return model.eval()


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "generation_config.json")


def save_model(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Save weights as model.safetensors under the checkpoint's own names and layout (GPT-2's Conv1D
    transposed back, tied heads left out), with config.json and the tokenizer, atomically. The folder
    loads here and in transformers."""
    from safetensors.torch import save_file
    from .adapter import write_atomically
    if any("lora_" in n for n in model.state_dict()):
        raise CheckpointError("the model still has LoRA layers: merge them first (remove_lora(model))")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name not in model.tied_weights:
            name, tensor = model.model_to_checkpoint(name, tensor)
            tensors[name] = tensor.detach().to("cpu").contiguous()
    config = dict(getattr(model, "config_dict", None) or {})
    config.setdefault("architectures", [type(model).__name__])
    source = getattr(model, "source_path", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
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


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format): a header of typed key/values, a table of tensors, then aligned data.
# Only what a Llama-architecture file needs is read; quantized blocks are dequantized to fp32.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 3, 8, 30
# (elements per block, bytes per block)
_BLOCKS = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_BF16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q4_1: (32, 20),
           GGML_Q8_0: (32, 34)}


class _Reader:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise CheckpointError(f"{self.path}: GGUF header is truncated at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.scalar("<I"), self.scalar("<Q")
            return [self.value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise CheckpointError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")
        return self.scalar(_SCALARS[kind])


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int, int]], int]:
    """(metadata, {name: (torch shape, ggml type, offset)}, byte where tensor data starts)."""
    with open(path, "rb") as f:
        buf = memoryview(np.memmap(f, dtype=np.uint8, mode="r"))
    r = _Reader(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    r.pos = 4
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = {}
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        kind, offset = r.scalar("<I"), r.scalar("<Q")
        infos[name] = (tuple(reversed(dims)), kind, offset)  # GGUF lists the fastest dimension first
    align = meta.get("general.alignment", 32)
    return meta, infos, (r.pos + align - 1) // align * align


def dequantize(raw: np.ndarray, kind: int, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if kind == GGML_F32:
        out = raw.view(np.float32).copy()
    elif kind == GGML_F16:
        out = raw.view(np.float16).astype(np.float32)
    elif kind == GGML_BF16:
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().reshape(shape)
    else:
        blocks = raw.reshape(-1, _BLOCKS[kind][1])
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1) scale per 32 values
        if kind == GGML_Q8_0:
            out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
        else:
            qs = blocks[:, 4:] if kind == GGML_Q4_1 else blocks[:, 2:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles first
            if kind == GGML_Q4_0:
                out = d * (q - 8)
            else:
                out = d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def gguf_config(meta: dict[str, Any], infos: dict, path: Path) -> dict[str, Any]:
    """A Llama config.json dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")
    def get(key: str, default: Any = ConfigError):
        if f"llama.{key}" in meta:
            return meta[f"llama.{key}"]
        if default is ConfigError:
            raise ConfigError(f"{path}: GGUF metadata has no llama.{key}")
        return default
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    return dict(model_type="llama", vocab_size=get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None),
                hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"), num_attention_heads=heads,
                num_key_value_heads=get("attention.head_count_kv", heads),
                head_dim=get("rope.dimension_count", hidden // heads),
                max_position_embeddings=get("context_length", 2048),
                rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=get("rope.freq_base", 10000.0),
                tie_word_embeddings="output.weight" not in infos,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def gguf_tensors(path: Path, meta: dict[str, Any], infos: dict, data_start: int) -> Tensors:
    """Tensors under the Hub's names, dequantized to fp32, with q/k rows put back in the Hub's RoPE order."""
    heads = meta["llama.attention.head_count"]
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for gguf_name, (shape, kind, offset) in infos.items():
        if kind not in _BLOCKS:
            raise CheckpointError(f"{path}: tensor {gguf_name} has GGML type {kind}, which is not supported "
                                  "(F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)")
        per_block, block_bytes = _BLOCKS[kind]
        numel = int(np.prod(shape))
        start = data_start + offset
        raw = data[start:start + numel // per_block * block_bytes]
        if raw.size != numel // per_block * block_bytes:
            raise CheckpointError(f"{path}: tensor {gguf_name} runs past the end of the file (truncated?)")
        w = dequantize(raw, kind, shape, gguf_name)
        parts = gguf_name.split(".")  # blk.N.attn_q.weight or token_embd.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{parts[3]}"
            if parts[2] in ("attn_q", "attn_k") and w.dim() == 2:
                # llama.cpp interleaves each head's rotary halves; undo it to get the Hub's rotate-half rows.
                n = heads if parts[2] == "attn_q" else kv_heads
                rows, cols = w.shape
                w = w.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
        else:
            name = f"{GGUF_NAMES.get(parts[0], parts[0])}.{parts[1]}"
        yield name, w
