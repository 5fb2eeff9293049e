"""GGUF, llama.cpp's file format: a header of typed key/values, a table of tensors, then aligned data.

Read here: a Llama-, Qwen2-, Qwen3-, Gemma 2- or Gemma 3-architecture file's config (from its metadata)
and its tensors under the Hub's names, quantized blocks (every ggml.py type: Q4_0 ... Q8_0 and the
K-quants) dequantized to fp32, or kept as raw blocks for a quantized base, with what llama.cpp's
converter changed undone: a Llama's q/k rows put back in the Hub's RoPE order, Gemma's norm weights
without the 1 folded in. The tokenizer in the metadata is rebuilt by tokenizer.py.
"""

from __future__ import annotations

import math
import os
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
              "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma norms four times a block: llama.cpp's ffn_norm is the norm before the MLP there, not after attention
GEMMA_NAMES = {**GGUF_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
GEMMAS = ("gemma2", "gemma3")

ARCHITECTURES = ("llama", "qwen2", "qwen3", *GEMMAS)  # the GGUF architectures read here
MODEL_TYPES = {"gemma3": "gemma3_text"}  # the file holds Gemma 3's text model alone


def hub_name(arch: str, gguf_name: str) -> str:
    """A tensor's Hub name: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    names = GEMMA_NAMES if arch in GEMMAS else GGUF_NAMES
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def gguf_config(file: GGUFFile) -> dict[str, Any]:
    """A config.json dict, under transformers' names, from GGUF metadata: LlamaConfig's fields for llama,
    Qwen2Config's and Qwen3Config's for qwen2 and qwen3, Gemma2Config's and Gemma3TextConfig's for gemma2
    and gemma3 (with what llama.cpp keeps in its code rather than in the file: see _gemma)."""
    meta, path = file.meta, file.path
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)} are)")
    def get(key: str, default: Any = ConfigError):
        if f"{arch}.{key}" in meta:
            value = meta[f"{arch}.{key}"]
            kind = float if key.endswith(("epsilon", "freq_base", "softcapping", "factor")) else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
                raise ConfigError(f"{path}: GGUF metadata {arch}.{key} is {value!r}, expected a positive {kind.__name__}")
            return value
        if default is ConfigError:
            raise ConfigError(f"{path}: GGUF metadata has no {arch}.{key}")
        return default
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    config = dict(model_type=MODEL_TYPES.get(arch, arch),
                  vocab_size=get("vocab_size", len(tokens) if isinstance(tokens, list) else None),
                  hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                  num_hidden_layers=get("block_count"), num_attention_heads=heads,
                  num_key_value_heads=get("attention.head_count_kv", heads),
                  head_dim=get("attention.key_length", get("rope.dimension_count", hidden // heads)),
                  max_position_embeddings=get("context_length", 2048),
                  rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=get("rope.freq_base", 10000.0),
                  tie_word_embeddings="output.weight" not in file.infos,
                  bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise ConfigError(f"{path}: GGUF metadata {arch}.rope.scaling.type is {scaling!r}; only linear scaling is read")
    if arch in GEMMAS:
        config.update(_gemma(arch, config, get))
    return config


def _gemma(arch: str, config: dict[str, Any], get) -> dict[str, Any]:
    """What a Gemma config holds that the file does not, as llama.cpp hard-codes it (llm_load_hparams in
    src/llama-model.cpp): Gemma 2 alternates local and global layers (the first local), with a 4096-token
    window and scores capped at 50, logits at 30 unless the file says otherwise; Gemma 3 has five local
    layers to one global and gives the local ones RoPE base 10,000 (the file's base is the global
    layers'), without caps. Queries are scaled by head_dim^-1/2, except in the 27B models (46 and 62
    layers), by (hidden / heads)^-1/2."""
    layers, gemma2 = config["num_hidden_layers"], arch == "gemma2"
    pattern = 2 if gemma2 else 6  # every pattern-th layer is global
    big = layers == (46 if gemma2 else 62)
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    out = dict(hidden_activation="gelu_pytorch_tanh", sliding_window=get("attention.sliding_window", 4096),
               layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)],
               query_pre_attn_scalar=scalar,
               attn_logit_softcapping=get("attn_logit_softcapping", 50.0 if gemma2 else None),
               final_logit_softcapping=get("final_logit_softcapping", 30.0 if gemma2 else None))
    if not gemma2:
        out["rope_local_base_freq"] = 10000.0
    return out


def gguf_tensors(file: GGUFFile, keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors under the Hub's names, dequantized to fp32, with q/k rows put back in the Hub's RoPE order.
    Those named in `keep` (Hub names) come as their raw blocks instead, (rows, bytes per row) uint8, rows
    reordered the same way (see kept_blocks)."""
    meta, path = file.meta, file.path
    arch = meta.get("general.architecture", "llama")
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for gguf_name, (shape, kind, offset) in file.infos.items():
            if kind not in BLOCKS:
                raise CheckpointError(f"{path}: tensor {gguf_name} has GGML type {kind}, which is not supported "
                                      f"({', '.join(NAMES.values())} are)")
            per_block, block_bytes = BLOCKS[kind]
            numel = math.prod(shape)
            if numel % per_block or shape[-1] % per_block:
                raise CheckpointError(f"{path}: tensor {gguf_name} of shape {shape} is not a whole number of "
                                      f"{per_block}-value blocks per row")
            start, nbytes = file.data_start + offset, numel // per_block * block_bytes
            if start + nbytes > size:
                raise CheckpointError(f"{path}: tensor {gguf_name} runs past the end of the file (truncated?)")
            parts = gguf_name.split(".")  # blk.N.attn_q.weight or token_embd.weight
            if not re.fullmatch(r"blk\.\d+\.\w+\.(weight|bias)|\w+\.(weight|bias)", gguf_name):
                raise CheckpointError(f"{path}: tensor {gguf_name!r} is not named as llama.cpp names a Llama's tensors "
                                      "(blk.N.attn_q.weight, token_embd.weight, ...)")
            name = hub_name(arch, gguf_name)
            # read, not memory-mapped: a mapped file's pages count in the process's resident memory until the
            # whole file is unmapped, which would add the file's size to the peak of loading it
            buf = bytearray(nbytes)
            f.seek(start)
            if f.readinto(buf) != nbytes:
                raise CheckpointError(f"{path}: tensor {gguf_name} could not be read whole (did the file change?)")
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            if name in keep:
                w = raw.view(shape[0], -1)
                _check_finite(w, kind, shape[-1], f"{path}: tensor {gguf_name}")
            else:
                w = _dequantized(raw, kind, shape)
            if arch in GEMMAS and gguf_name.endswith("norm.weight"):
                w = w - 1.0  # Gemma's norms scale by (1 + weight): llama.cpp's converter stores the sum
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


def _dequantized(raw: torch.Tensor, kind: int, shape: tuple[int, ...]) -> torch.Tensor:
    """dequantize(), about a million values at a time into the result: at once, the temporaries of a
    large embedding (Qwen2.5's 151,936 x 896 in Q5_0) take several times its fp32 size."""
    if kind not in QUANTIZED or len(shape) != 2 or math.prod(shape) <= 1 << 21:
        return dequantize(raw, kind, shape)
    rows, cols = shape
    out, blocks, step = torch.empty(shape), raw.view(rows, -1), max(1, (1 << 20) // cols)
    for r in range(0, rows, step):
        out[r:r + step] = dequantize(blocks[r:r + step].reshape(-1), kind, (-1, cols))
    return out


def _check_finite(rows: torch.Tensor, kind: int, width: int, where: str) -> None:
    """A CheckpointError if kept blocks hold a NaN or infinite value (as the float path refuses them),
    found by dequantizing about a million values at a time."""
    step = max(1, (1 << 20) // width)
    for r in range(0, rows.shape[0], step):
        if not bool(dequantize(rows[r:r + step].reshape(-1), kind, (-1,)).isfinite().all()):
            raise CheckpointError(f"{where} holds NaN or infinite values (in rows {r}..{r + step - 1})")


def kept_blocks(file: GGUFFile) -> dict[str, tuple[int, tuple[int, int]]]:
    """{Hub name: (GGML type, (out, in))} of the 2-D block weights that a quantized base can keep as they
    are: those of the transformer blocks, the token embedding and an untied output head."""
    arch = file.meta.get("general.architecture", "llama")
    kept = {}
    for gguf_name, (shape, kind, _) in file.infos.items():
        parts = gguf_name.split(".")
        block = parts[0] == "blk" and len(parts) == 4 and parts[-1] == "weight"
        if kind in QUANTIZED and len(shape) == 2 and (block or gguf_name in ("token_embd.weight", "output.weight")):
            kept[hub_name(arch, gguf_name)] = (kind, shape)
    return kept
