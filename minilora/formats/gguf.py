"""GGUF, llama.cpp's file format: a header of typed key/values, a table of tensors, then aligned data.

Read here: a Llama- or Qwen2-architecture file's config (from its metadata) and its tensors under the Hub's
names, quantized blocks (every ggml.py type: Q4_0 ... Q8_0 and the K-quants) dequantized to fp32, or
kept as raw blocks for a quantized base, and the q/k rows put back in the Hub's RoPE order. The tokenizer in the metadata is rebuilt by tokenizer.py.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .ggml_blocks import BLOCKS, NAMES, QUANTIZED, dequantize

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


MAX_NESTING = 4  # arrays of arrays: llama.cpp's files use one level at most


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
        self.room(n, "a string")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def room(self, n: int, what: str) -> None:
        """Each element takes at least a byte: a count beyond the bytes left is a truncated or corrupt file."""
        if n > len(self.buf) - self.pos:
            raise CheckpointError(f"{self.path}: GGUF header is truncated or corrupt at byte {self.pos} "
                                  f"({what} of {n} elements, {len(self.buf) - self.pos} bytes left)")

    def value(self, kind: int, depth: int = 0):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if depth >= MAX_NESTING:
                raise CheckpointError(f"{self.path}: GGUF metadata nests arrays deeper than {MAX_NESTING} at byte {self.pos}")
            self.room(n, "an array")
            return [self.value(item, depth + 1) for _ in range(n)]
        if kind not in _SCALARS:
            raise CheckpointError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")
        return self.scalar(_SCALARS[kind])


@dataclass
class GGUFFile:
    path: Path
    meta: dict[str, Any]                                   # the header's key/values
    infos: dict[str, tuple[tuple[int, ...], int, int]]     # name -> (torch shape, ggml type, offset in the data)
    data_start: int                                        # byte where the tensor data starts
    types: dict[str, tuple[int, int | None]] | None = None  # key -> (value type, array item type), for copying


def read_gguf(path: Path) -> GGUFFile:
    """The header of a GGUF file (version 2 or 3); the tensor data is read later, one tensor at a time."""
    if not Path(path).is_file() or Path(path).stat().st_size < 24:
        raise CheckpointError(f"{path}: not a GGUF file (" + ("a folder" if Path(path).is_dir() else "too short") + ")")
    with open(path, "rb") as f:
        buf = memoryview(np.memmap(f, dtype=np.uint8, mode="r"))
    r = _Reader(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    r.pos = 4
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    meta, types = {}, {}
    for _ in range(n_kv):
        key = r.string()
        if key in meta:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} appears twice")
        kind = r.scalar("<I")
        item = r.scalar("<I") if kind == 9 else None
        if item is not None:
            r.pos -= 4  # value() reads the item type again
        meta[key], types[key] = r.value(kind), (kind, item)
    infos = {}
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows at most 4)")
        dims = [r.scalar("<Q") for _ in range(n_dims)]
        kind, offset = r.scalar("<I"), r.scalar("<Q")
        if name in infos:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        infos[name] = (tuple(reversed(dims)), kind, offset)  # GGUF lists the fastest dimension first
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0:
        raise CheckpointError(f"{path}: general.alignment is {align!r}, expected a positive integer")
    # each tensor's bytes must end before the next one's begin (a type or shape changed in a corrupt
    # header would otherwise read another tensor's bytes as its own)
    spans = sorted((offset, offset + _nbytes(shape, kind), name) for name, (shape, kind, offset) in infos.items()
                   if kind in BLOCKS)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if end > start:
            raise CheckpointError(f"{path}: tensor {name}'s data overlaps tensor {other}'s (corrupt header?)")
    return GGUFFile(Path(path), meta, infos, (r.pos + align - 1) // align * align, types)


def _nbytes(shape: tuple[int, ...], kind: int) -> int:
    per_block, block_bytes = BLOCKS[kind]
    return -(-math.prod(shape) // per_block) * block_bytes


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


ARCHITECTURES = ("llama", "qwen2")  # the GGUF architectures read here (Qwen2: q/k/v biases, no row permutation)


def gguf_config(file: GGUFFile) -> dict[str, Any]:
    """A Llama (or Qwen2) config.json dict from GGUF metadata."""
    meta, path = file.meta, file.path
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)} are)")
    def get(key: str, default: Any = ConfigError):
        if f"{arch}.{key}" in meta:
            value = meta[f"{arch}.{key}"]
            kind = float if key.endswith(("epsilon", "freq_base")) else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
                raise ConfigError(f"{path}: GGUF metadata {arch}.{key} is {value!r}, expected a positive {kind.__name__}")
            return value
        if default is ConfigError:
            raise ConfigError(f"{path}: GGUF metadata has no {arch}.{key}")
        return default
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    return dict(model_type=arch, vocab_size=get("vocab_size", len(tokens) if isinstance(tokens, list) else None),
                hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                num_hidden_layers=get("block_count"), num_attention_heads=heads,
                num_key_value_heads=get("attention.head_count_kv", heads),
                head_dim=get("rope.dimension_count", hidden // heads),
                max_position_embeddings=get("context_length", 2048),
                rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=get("rope.freq_base", 10000.0),
                tie_word_embeddings="output.weight" not in file.infos,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def gguf_tensors(file: GGUFFile, keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors under the Hub's names, dequantized to fp32, with q/k rows put back in the Hub's RoPE order.
    Those named in `keep` (Hub names) come as their raw blocks instead, (rows, bytes per row) uint8, rows
    reordered the same way (see kept_blocks)."""
    meta, path = file.meta, file.path
    arch = meta.get("general.architecture", "llama")
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for gguf_name, (shape, kind, offset) in file.infos.items():
        if kind not in BLOCKS:
            raise CheckpointError(f"{path}: tensor {gguf_name} has GGML type {kind}, which is not supported "
                                  f"({', '.join(NAMES.values())} are)")
        per_block, block_bytes = BLOCKS[kind]
        numel = math.prod(shape)
        if numel % per_block or shape[-1] % per_block:
            raise CheckpointError(f"{path}: tensor {gguf_name} of shape {shape} is not a whole number of "
                                  f"{per_block}-value blocks per row")
        start = file.data_start + offset
        raw = data[start:start + numel // per_block * block_bytes]
        if raw.size != numel // per_block * block_bytes:
            raise CheckpointError(f"{path}: tensor {gguf_name} runs past the end of the file (truncated?)")
        parts = gguf_name.split(".")  # blk.N.attn_q.weight or token_embd.weight
        if not re.fullmatch(r"blk\.\d+\.\w+\.(weight|bias)|\w+\.(weight|bias)", gguf_name):
            raise CheckpointError(f"{path}: tensor {gguf_name!r} is not named as llama.cpp names a Llama's tensors "
                                  "(blk.N.attn_q.weight, token_embd.weight, ...)")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{parts[3]}"
        else:
            name = f"{GGUF_NAMES.get(parts[0], parts[0])}.{parts[1]}"
        raw = torch.from_numpy(np.array(raw))  # a copy of this tensor's bytes: the file stays unmapped
        if name in keep:
            w = raw.view(shape[0], -1)
            _check_finite(w, kind, shape[-1], f"{path}: tensor {gguf_name}")
        else:
            w = dequantize(raw, kind, shape)
        if arch == "llama" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k") and w.dim() == 2:
            # llama.cpp interleaves each head's rotary halves; undo it to get the Hub's rotate-half rows
            # (on whole rows, so raw blocks move the same way).
            n = heads if parts[2] == "attn_q" else kv_heads
            rows, cols = w.shape
            if rows % (2 * n):
                raise CheckpointError(f"{path}: tensor {gguf_name} has {rows} rows, not a whole number of "
                                      f"{n} heads of even size")
            w = w.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
        yield name, w


def _check_finite(rows: torch.Tensor, kind: int, width: int, where: str) -> None:
    """A CheckpointError if kept blocks hold a NaN or infinite value (as the float path refuses them),
    found by dequantizing about a million values at a time."""
    step = max(1, (1 << 20) // width)
    for r in range(0, rows.shape[0], step):
        if not bool(dequantize(rows[r:r + step].reshape(-1), kind, (-1,)).isfinite().all()):
            raise CheckpointError(f"{where} holds NaN or infinite values (in rows {r}..{r + step - 1})")


def kept_blocks(file: GGUFFile) -> dict[str, tuple[int, tuple[int, int]]]:
    """{Hub name: (GGML type, (out, in))} of the 2-D block weights that a quantized base can keep as they
    are: those of the transformer blocks and the token embedding (an untied output head is read in float)."""
    kept = {}
    for gguf_name, (shape, kind, _) in file.infos.items():
        parts = gguf_name.split(".")
        if kind in QUANTIZED and len(shape) == 2 and parts[0] == "blk" and parts[-1] == "weight" and len(parts) == 4:
            kept[f"model.layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.weight"] = (kind, shape)
        elif kind in QUANTIZED and gguf_name == "token_embd.weight":
            kept[f"{GGUF_NAMES['token_embd']}.weight"] = (kind, shape)
    return kept
