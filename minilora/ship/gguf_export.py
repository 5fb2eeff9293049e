"""GGUF export, for llama.cpp and Ollama: a LoRA adapter as llama.cpp's adapter file, and the merged
model as a complete GGUF file (F32, F16, Q8_0 or Q4_0), for llama.cpp's llama architecture (Llama
without rope scaling, SmolLM2, Mistral), its qwen2 and qwen3 architectures (no sliding window there: as
llama.cpp's own converter writes Mistral, a model with one is exported with a warning), and gemma2 and
gemma3, whose local/global pattern, local RoPE base and query scale llama.cpp hard-codes (a model
that differs is refused by the field).

The file is written by formats/gguf_write.py: to a temporary file of its own beside the target and
renamed, under a lock on the target's name, so an existing file is replaced whole or not at all, and
a second export to the same name fails at once, by name.

What llama.cpp expects, and where it differs from the Hub's layout:
  - tensor names: blk.N.attn_q.weight for model.layers.N.self_attn.q_proj.weight (gguf.GGUF_NAMES);
  - for llama, q and k rows in llama.cpp's RoPE order: each head's two rotary halves interleaved (the
    inverse of what gguf.py undoes on reading); an adapter's B rows move with them, A is untouched
    (qwen2, qwen3 and the gemmas keep the Hub's order);
  - for a Gemma, norm weights w stored as 1 + w (the scale Gemma's RMSNorm applies), and the four norms
    of a block under their own names (post_attention_norm, ffn_norm before the MLP, post_ffw_norm);
  - an adapter: general.type = "adapter", adapter.type = "lora", adapter.lora.alpha, and per target
    "<base tensor>.lora_a" (r x k) and ".lora_b" (d x r); llama.cpp scales B·A by alpha / r, r read
    from each lora_a, so a module whose own scale differs (rank_pattern, alpha_pattern, rsLoRA) has it
    folded into its B.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..formats.ggml_blocks import F16, F32, Q4_0, Q8_0
from ..formats.gguf import GEMMA_NAMES, GEMMAS, GGUF_NAMES, read_gguf
from ..formats.gguf_write import ARRAY, FLOAT32, INT32, STRING, UINT32, Meta, Tensor, encode, write_gguf
from ..lora.config import lora_state
from ..lora.initialise import changes_the_base, replaces_the_base
from ..lora.inject import lora_modules
from ..lora.layers import LoRALinear, is_adapter_tensor

TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
FILE_TYPES = {F32: 0, F16: 1, Q4_0: 2, Q8_0: 7}  # llama.cpp's general.file_type (llama_ftype)
HUB_NAMES = {hub: gguf for gguf, hub in GGUF_NAMES.items()}
HUB_GEMMA_NAMES = {hub: gguf for gguf, hub in GEMMA_NAMES.items()}


# ---------------------------------------------------------------------------------------------
# The Llama architecture's names and metadata

# model_type -> llama.cpp's architecture name
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
          "gemma3_text": "gemma3", "gemma3": "gemma3"}


def architecture(model: nn.Module) -> tuple[str, Any]:
    """(llama.cpp's architecture name, the config) for a model it can carry, or a ConfigError saying why not."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHES:
        raise ConfigError(f"GGUF export writes llama.cpp's llama, qwen2, qwen3, gemma2 and gemma3 architectures "
                          f"(Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3); this model is "
                          f"{kind or type(model).__name__}")
    arch = ARCHES[kind]
    if arch in ("gemma2", "gemma3"):
        _refuse_what_gemma_hard_codes(arch, config)
    else:
        _refuse_rope_scaling(config)
    limits = [("mlp_bias", "MLP biases")]
    if arch != "qwen2":  # biases on q/k/v are Qwen2's own
        limits.append(("attention_bias", "attention biases"))
    for field, why in limits:
        if getattr(config, field, None):
            raise ConfigError(f"GGUF export: this model has {why} ({field}), which llama.cpp's {arch} architecture "
                              "does not carry")
    if arch in ("llama", "qwen2", "qwen3"):
        window = [w for w in config.windows if w is not None]
        if window:  # as llama.cpp's own converter writes Mistral: the same model up to the window's length
            warnings.warn(f"llama.cpp's {arch} architecture has no sliding window: the GGUF file attends to the whole "
                          f"context, which is the same model for sequences of up to {min(window)} tokens", stacklevel=3)
    return arch, config


def _refuse_rope_scaling(config: Any) -> None:
    rope = dict(getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) == "default" or rope.get("factor") == 1.0:
        rope = {}  # the default (or a factor of 1) is no scaling
    if rope:
        raise ConfigError(f"GGUF export: this model has rope scaling ({rope}), which is not written here")


def _refuse_what_gemma_hard_codes(arch: str, config: Any) -> None:
    """llama.cpp keeps part of a Gemma in its code, not in the file (formats/gguf._gemma reads it back the
    same way): the local/global layer pattern, Gemma 3's local RoPE base 10,000, the query scale. A
    model that differs would run as another model there: refused, naming the field."""
    n, pattern = config.num_hidden_layers, 2 if arch == "gemma2" else 6
    expected = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if list(config.kinds) != expected:
        raise ConfigError(f"GGUF export: layer_types {list(config.kinds)} is not the pattern llama.cpp's {arch} "
                          f"assumes (every {pattern}th layer global, the rest sliding)")
    big = n == (46 if arch == "gemma2" else 62)
    scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        raise ConfigError(f"GGUF export: query_pre_attn_scalar = {config.query_pre_attn_scalar}, but llama.cpp's "
                          f"{arch} scales queries by {scalar}^-1/2 for this size")
    local = config.ropes["sliding_attention"][1]
    if arch == "gemma3" and (float(local["rope_theta"]) != 10000.0 or local.get("rope_type", "default") != "default"):
        raise ConfigError(f"GGUF export: the local layers' RoPE is {local}, but llama.cpp's gemma3 gives them base "
                          "10000 without scaling (rope_local_base_freq)")
    rope = config.ropes["full_attention"][1]
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise ConfigError(f"GGUF export: this model has rope scaling ({rope}), which is not written here")
    caps = ("attn_logit_softcapping", "final_logit_softcapping")
    if arch == "gemma2" and any(getattr(config, c) is None for c in caps):
        raise ConfigError(f"GGUF export: {' and '.join(c for c in caps if getattr(config, c) is None)} is null, but "
                          "llama.cpp's gemma2 always soft-caps (50 and 30 unless the file says otherwise)")
    if arch == "gemma3" and config.final_logit_softcapping is not None:
        raise ConfigError(f"GGUF export: final_logit_softcapping = {config.final_logit_softcapping}, but llama.cpp's "
                          "gemma3 does not soft-cap its logits")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"GGUF export: hidden_activation {config.hidden_activation!r}; llama.cpp's {arch} runs "
                          "gelu_pytorch_tanh")


def gguf_name(hub: str, arch: str = "llama") -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (llama.cpp's name; a Gemma's four
    norms a block have names of their own)."""
    names = HUB_GEMMA_NAMES if arch in GEMMAS else HUB_NAMES
    parts = hub.split(".")
    if hub.startswith("model.layers."):
        module = ".".join(parts[3:-1])
        if module not in names:
            raise ConfigError(f"{hub}: llama.cpp has no tensor for {module}")
        return f"blk.{parts[2]}.{names[module]}.{parts[-1]}"
    module = ".".join(parts[:-1])
    if module not in names:
        raise ConfigError(f"{hub}: llama.cpp has no tensor for {module}")
    return f"{names[module]}.{parts[-1]}"


def to_llamacpp(hub: str, w: torch.Tensor, arch: str, config: Any) -> torch.Tensor:
    """A Hub tensor as llama.cpp's converter writes it: a llama's q/k rows reordered (to_llamacpp_rows),
    a Gemma's norm weights with the 1 of its (1 + w) scale folded in."""
    if arch in GEMMAS and hub.endswith("norm.weight"):
        return w + 1.0
    return to_llamacpp_rows(hub, w, config) if arch == "llama" else w


def to_llamacpp_rows(hub: str, rows: torch.Tensor, config: Any) -> torch.Tensor:
    """q and k rows (or an adapter's B rows for them) in llama.cpp's RoPE order for the llama architecture:
    each head's rotary halves interleaved (gguf.gguf_tensors undoes this on reading). Qwen2 keeps the
    Hub's order (llama.cpp runs it with NeoX-style RoPE), as do Qwen3 and the Gemmas."""
    if ARCHES.get(config.model_type) != "llama":
        return rows
    n = config.num_attention_heads if ".q_proj." in hub else config.num_key_value_heads if ".k_proj." in hub else None
    if n is None:
        return rows
    d = rows.shape[0]
    return rows.reshape(n, 2, d // n // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _model_meta(arch: str, config: Any, name: str) -> Meta:
    return [("general.architecture", STRING, arch, None), ("general.name", STRING, name, None),
            (f"{arch}.context_length", UINT32, config.max_position_embeddings, None),
            (f"{arch}.embedding_length", UINT32, config.hidden_size, None),
            (f"{arch}.block_count", UINT32, config.num_hidden_layers, None),
            (f"{arch}.feed_forward_length", UINT32, config.intermediate_size, None),
            (f"{arch}.attention.head_count", UINT32, config.num_attention_heads, None),
            (f"{arch}.attention.head_count_kv", UINT32, config.num_key_value_heads, None),
            (f"{arch}.rope.dimension_count", UINT32, config.head_dim, None),
            (f"{arch}.attention.key_length", UINT32, config.head_dim, None),  # llama.cpp needs these where
            (f"{arch}.attention.value_length", UINT32, config.head_dim, None),  # head_dim != hidden / heads
            (f"{arch}.rope.freq_base", FLOAT32, float(_global_theta(arch, config)), None),
            (f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32, float(config.rms_norm_eps), None),
            (f"{arch}.vocab_size", UINT32, config.vocab_size, None), *_family_meta(arch, config)]


def _global_theta(arch: str, config: Any) -> float:
    """The RoPE base of the file: the global layers' for a Gemma (llama.cpp hard-codes the local one's)."""
    return config.ropes["full_attention"][1]["rope_theta"] if arch in GEMMAS else config.rope_theta


def _family_meta(arch: str, config: Any) -> Meta:
    """A Gemma's window, caps and linear RoPE scaling (the rest llama.cpp hard-codes: _refuse_what_gemma_hard_codes)."""
    if arch not in GEMMAS:
        return []
    meta: Meta = [(f"{arch}.attention.sliding_window", UINT32, config.sliding_window, None)]
    if arch == "gemma2":  # Gemma 3 is not capped in llama.cpp (nor, for its scores, in transformers)
        meta += [(f"{arch}.{field}", FLOAT32, float(getattr(config, field)), None)
                 for field in ("attn_logit_softcapping", "final_logit_softcapping")]
    scaling = config.ropes["full_attention"][1]
    if scaling.get("rope_type", "default") == "linear" and scaling.get("factor", 1.0) != 1.0:
        meta += [(f"{arch}.rope.scaling.type", STRING, "linear", None),
                 (f"{arch}.rope.scaling.factor", FLOAT32, float(scaling["factor"]), None)]
    return meta


def _pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization, for the ones known to match it: GPT-2's byte
    level alone ("gpt-2"), or digits split one by one first (SmolLM2's, "smollm"). Others: None."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits") if p.get("type") == "Digits" else p.get("use_regex", True))
             for p in parts]
    return {(("ByteLevel", True),): "gpt-2", (("Digits", True), ("ByteLevel", True)): "smollm"}.get(tuple(kinds))


def _tokenizer_meta(tokenizer, rows: int) -> Meta:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary: tokens by id (padded with unused
    [PAD<i>] tokens to the embedding's `rows`, as llama.cpp checks), merges, types (3 = control for
    special tokens, 1 = normal, 5 = unused), the special ids and the chat template."""
    import json
    spec = json.loads(tokenizer.tk.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError("GGUF export: the tokenizer is not byte-level BPE (GPT-2's kind); llama.cpp's vocabulary is "
                          "written from that only here. Export from the model's own .gguf file, or convert with "
                          "llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer(spec)
    if pre is None:
        raise ConfigError("GGUF export: this tokenizer's pre-tokenization (tokenizer.json's pre_tokenizer) is not one "
                          "written here (GPT-2's, SmolLM2's); llama.cpp would split text differently. Export from the "
                          "model's own .gguf file, or convert with llama.cpp's convert_hf_to_gguf.py")
    size = tokenizer.vocab_size
    if size > rows:
        raise ConfigError(f"GGUF export: the tokenizer has {size} tokens but the embeddings {rows} rows")
    tokens = [tokenizer.tk.id_to_token(i) or f"[PAD{i}]" for i in range(size)] + [f"[PAD{i}]" for i in range(size, rows)]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [3 if i in special else 1 if tokenizer.tk.id_to_token(i) else 5 for i in range(size)] + [5] * (rows - size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: Meta = [("tokenizer.ggml.model", STRING, "gpt2", None), ("tokenizer.ggml.pre", STRING, pre, None),
                  ("tokenizer.ggml.tokens", ARRAY, tokens, STRING), ("tokenizer.ggml.token_type", ARRAY, types, INT32),
                  ("tokenizer.ggml.merges", ARRAY, merges, STRING)]
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("padding", tokenizer.pad_token_id if tokenizer.has_pad_token else None)):
        if value is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", UINT32, value, None))
    if tokenizer.chat_template:
        meta.append(("tokenizer.chat_template", STRING, tokenizer.chat_template, None))
    return meta


# ---------------------------------------------------------------------------------------------
# The merged model, and the adapter

def export_merged(model: nn.Module, path: str | os.PathLike, kind: str = "f16", tokenizer=None) -> Path:
    """The model with its active adapter merged in, as a complete GGUF file of `kind` (f32, f16, q8_0,
    q4_0: 2-D weights whose rows are whole 32-value blocks in that type, the rest F32/F16). Each merged
    weight is computed in fp32 as it is written (LoRALinear.merged_weight); the model is not changed.
    The metadata (tokenizer and chat template included) is the source GGUF file's when the model came
    from one; otherwise it is written from the config and `tokenizer` (without one, llama.cpp cannot
    run the file)."""
    if kind not in TYPES:
        raise ConfigError(f"GGUF type {kind!r}: expected one of {', '.join(TYPES)}")
    arch, config = architecture(model)
    want = TYPES[kind]
    owner = {f"{name}.weight": m for name, m in model.named_modules() if hasattr(m, "merged_weight")}
    for name, m in owner.items():
        if isinstance(m, LoRALinear) and m.quantized is not None:
            raise ConfigError(f"{name}: a quantized base (int8, 4-bit or GGUF blocks) is not merged into; load the "
                              "base in floating point to export it merged (minilora export does)")
    tied = {id(model.lm_head.weight)} & {id(model.input_embeddings.weight)}
    tensors: list[Tensor] = []
    for hub, t in model.state_dict(keep_vars=True).items():
        if is_adapter_tensor(hub) or (hub == "lm_head.weight" and tied):
            continue  # LoRA's own tensors; a tied head: llama.cpp ties a missing output.weight to token_embd
        if not t.is_floating_point():
            raise ConfigError(f"{hub} is {t.dtype}: load the base in floating point to export it merged")
        t_kind = want if t.dim() == 2 and t.shape[-1] % 32 == 0 else F32 if t.dim() == 1 or want == F32 else F16
        weight = (lambda m=owner[hub]: m.merged_weight()) if hub in owner else (lambda t=t: t.detach().float())
        tensors.append((gguf_name(hub, arch), tuple(t.shape), t_kind,
                        lambda w=weight, h=hub, k=t_kind: encode(to_llamacpp(h, w(), arch, config), k)))
    source = model.provenance.path if model.provenance is not None else None
    if source is not None and Path(source).suffix == ".gguf":
        file = read_gguf(Path(source))
        skip = ("general.file_type", "general.quantization_version", "general.alignment")
        meta = [(k, *file.types[k][:1], v, file.types[k][1]) for k, v in file.meta.items() if k not in skip]
    else:
        meta = _model_meta(arch, config, _model_name(model))
        if tokenizer is not None:
            meta += _tokenizer_meta(tokenizer, config.vocab_size)
    meta.append(("general.file_type", UINT32, FILE_TYPES[want], None))
    if want in (Q8_0, Q4_0):
        meta.append(("general.quantization_version", UINT32, 2, None))
    return write_gguf(path, meta, tensors)


def _model_name(model: nn.Module) -> str:
    """What general.name says: the source's file or folder name."""
    return Path(model.provenance.source).name if model.provenance is not None else "minilora"


def export_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """The model's active LoRA adapter as a llama.cpp adapter file (`llama-cli -m base.gguf --lora
    file.gguf`; Ollama's ADAPTER line). Refused, by name, for what that format cannot carry: DoRA,
    LoRA on embeddings, and modules trained in full (modules_to_save)."""
    arch, config = architecture(model)
    state = lora_state(model)
    saved = list(state.config.modules_to_save) if state is not None else []
    if saved:
        raise ConfigError(f"modules_to_save ({', '.join(saved)}): llama.cpp's adapter format carries only LoRA's "
                          "A and B; export the merged model instead (--merged)")
    how = state.config.init_lora_weights if state is not None else True
    if changes_the_base(how):
        raise ConfigError(f"init_lora_weights {how!r}: the adapter is relative to the residual base it made, not "
                          "to the base file llama.cpp loads; export the merged model instead (--merged)")
    if replaces_the_base(how):
        raise ConfigError(f"init_lora_weights {how!r}: the adapter trains beside the quantized base Q that LoftQ made, "
                          "not the base file llama.cpp loads (and a quantized base is not merged into); use it here, with "
                          "its base rebuilt from the float weights (minilora generate --adapter)")
    layers = lora_modules(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapter to export")
    alpha = None
    tensors: list[Tensor] = []
    for name, m in layers:
        if not isinstance(m, LoRALinear):
            raise ConfigError(f"{name}: LoRA on an embedding is not in llama.cpp's adapter format")
        if m.use_dora:
            raise ConfigError(f"{name}: DoRA cannot be expressed in llama.cpp's adapter format (B·A only); "
                              "export the merged model instead (--merged)")
        if name == "lm_head" and model.lm_head.weight is model.input_embeddings.weight:
            raise ConfigError("lm_head: LoRA on a head tied to the embeddings has no output.weight to apply to in "
                              "llama.cpp; export the merged model instead (--merged)")
        a, b = m.lora_A.weight.detach().float().cpu(), m.lora_B.weight.detach().float().cpu()
        r = a.shape[0]
        alpha = m.scaling * r if alpha is None else alpha  # llama.cpp: scale = alpha / r for every tensor
        b = b * (m.scaling * r / alpha)  # 1.0 where this module's scale is the first one's
        base = gguf_name(f"{name}.weight", arch)
        b = to_llamacpp_rows(f"{name}.weight", b, config)
        tensors += [(f"{base}.lora_a", tuple(a.shape), F32, lambda t=a: t.contiguous()),
                    (f"{base}.lora_b", tuple(b.shape), F32, lambda t=b: t.contiguous())]
    meta: Meta = [("general.architecture", STRING, arch, None), ("general.type", STRING, "adapter", None),
                  ("general.name", STRING, _model_name(model) + " LoRA", None),
                  ("adapter.type", STRING, "lora", None), ("adapter.lora.alpha", FLOAT32, float(alpha), None)]
    return write_gguf(path, meta, tensors)
