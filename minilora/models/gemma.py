"""The Gemma family: Gemma 2 and Gemma 3's text model, with the Hub's tensor names.

The blocks are Llama's (llama.py: RoPE in the "rotate half" layout, grouped-query attention, a gated
MLP) with these differences: the token embeddings are multiplied by sqrt(hidden_size), rounded to the
weights' dtype as transformers does; RMSNorm scales by (1 + weight), in fp32 before the cast; each
block norms four times, before and after attention and before and after the MLP; the MLP is GeGLU,
down(gelu_tanh(gate(x)) * up(x)); attention scores are scaled by query_pre_attn_scalar^-1/2, not
head_dim^-1/2; local layers attend within a sliding window, global layers to the whole context
(layer_types; by default Gemma 2 alternates local and global, Gemma 3 has five local layers to one
global); the output head is tied to the embeddings by default.
Gemma 2 soft-caps the attention scores and the final logits: cap * tanh(x / cap) (Gemma 2 report,
section 2). Gemma 3 drops the attention cap for q/k norms (RMSNorm over each head's head_dim, before
RoPE; a Gemma 3 config's attn_logit_softcapping is ignored, as transformers ignores it) and
gives its local layers their own RoPE base (rope_local_base_freq), its global layers the RoPE scaling
(linear, in the bigger models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .common import (CausalLM, activation, attend, attention_mask, config_from_dict, mask_form, position_ids,
                     run_blocks)
from .llama import LAYER_TYPES, check_rope, rope_angles, rope_frequencies, rotate_half


@dataclass
class Gemma2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 4  # the defaults are transformers'
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 keeps rope_theta and the scaling here
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096  # a local layer's query sees itself and sliding_window - 1 keys before
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: bool | None = None
    tie_word_embeddings: bool = True
    model_type: str = "gemma2"
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0

    qk_norm = False  # Gemma 3 norms q and k per head
    caps_attention = True  # attn_logit_softcapping is applied

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.use_bidirectional_attention:
            raise ConfigError("use_bidirectional_attention is true (an embedding model, as EmbeddingGemma is): "
                              "only the causal language model is supported")
        kinds = self.layer_types
        if kinds is not None and (len(kinds) != self.num_hidden_layers or set(kinds) - set(LAYER_TYPES)):
            raise ConfigError(f"layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                              f"{self.num_hidden_layers} layers, got {kinds!r}")
        if self.sliding_window is None and "sliding_attention" in self.kinds:  # transformers crashes
            raise ConfigError("sliding_window is null, but layers are sliding_attention: there is no window to apply")
        for field, rope in self.ropes.values():
            check_rope(rope.get("rope_theta"), rope, self.head_dim, field)

    def default_kinds(self) -> list[str]:
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def kinds(self) -> list[str]:
        """Each layer's type: sliding_attention (local) or full_attention (global)."""
        return self.layer_types or self.default_kinds()

    @property
    def windows(self) -> list[int | None]:
        return [self.sliding_window if kind == "sliding_attention" else None for kind in self.kinds]

    @property
    def ropes(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """{layer type: (the config field it comes from, its RoPE parameters: rope_theta, rope_type and
        the type's numbers)}, read as transformers reads them: rope_scaling or rope_parameters, and
        rope_theta where they leave it out. Gemma 2's layers share one."""
        field = "rope_scaling" if self.rope_scaling else "rope_parameters"
        rope = {"rope_theta": self.rope_theta or 10000.0, **(self.rope_scaling or self.rope_parameters or {})}
        return {kind: (field, rope) for kind in LAYER_TYPES}


@dataclass
class Gemma3TextConfig(Gemma2Config):
    head_dim: int = 256
    max_position_embeddings: int = 131072
    rope_local_base_freq: float = 10000.0  # the local layers' RoPE base (rope_theta is the global layers')
    sliding_window_pattern: int = 6  # by default every sliding_window_pattern-th layer is global
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    model_type: str = "gemma3_text"

    qk_norm = True
    caps_attention = False  # transformers' Gemma 3 reads attn_logit_softcapping but never applies it

    def default_kinds(self) -> list[str]:
        pattern = self.sliding_window_pattern
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def ropes(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """rope_parameters holds one table per layer type; older files give the global layers rope_theta
        (default 1e6) and rope_scaling, the local ones rope_local_base_freq and no scaling."""
        params, out = self.rope_parameters or {}, {}
        thetas = {"full_attention": self.rope_theta or 1e6, "sliding_attention": self.rope_local_base_freq}
        for kind, theta in thetas.items():
            rope = params.get(kind) or {"rope_type": "default"}
            if not isinstance(rope, dict):
                raise ConfigError(f"rope_parameters.{kind} must be a table, got {rope!r}")
            field = f"rope_parameters.{kind}"
            if kind == "full_attention" and self.rope_scaling:
                rope, field = {**rope, **self.rope_scaling}, "rope_scaling"
            out[kind] = (field, {"rope_theta": theta, **rope})
        return out


class GemmaRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), all in fp32 and cast at the end (Llama casts before
    the weight): a zero weight is the plain norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """softmax(cap * tanh(q k^T scale / cap)) v over (B, heads, T, head_dim), written out because SDPA
    cannot cap the scores; k/v may have fewer (grouped-query) heads."""
    if k.shape[1] != q.shape[1]:  # each k/v head serves q.heads / k.heads query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, nh, T, past + T)
    scores = cap * torch.tanh(scores / cap)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class GemmaAttention(nn.Module):
    def __init__(self, cfg: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping if cfg.caps_attention else None
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, mask, cache, past):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.softcap is None:
            y = attend(q, k, v, mask, past, scale=self.scale)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma2Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.kind, self.window = cfg.kinds[layer_idx], cfg.windows[layer_idx]

    def forward(self, x, ropes, masks, cache, past):  # ropes: {kind: (cos, sin)}, masks: {window: mask}
        cos, sin = ropes[self.kind]
        h = self.self_attn(self.input_layernorm(x), cos, sin, masks[self.window], cache, past)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    gradient_checkpointing = False

    def forward(self, input_ids, attn_mask=None, pos=None, cache=None):
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        form = mask_form(attn_mask)  # once per batch, outside the blocks
        pos = position_ids(attn_mask, T, past, input_ids.device, form) if pos is None else pos
        windows = {b.window for b in self.layers}
        masks = {w: attention_mask(attn_mask, T, past, input_ids.device, w, form) for w in windows}
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.cfg.hidden_size ** 0.5).to(x.dtype)  # in bf16, sqrt(3072) = 55.5: as trained
        ropes = {kind: rope_angles(pos, rope_frequencies(self.cfg.head_dim, rope["rope_theta"], rope), x.dtype)
                 for kind, (_, rope) in self.cfg.ropes.items() if kind in self.cfg.kinds}
        x = run_blocks(self.layers, x, ropes, masks, cache, past,
                       checkpoint=self.gradient_checkpointing and self.training and cache is None)
        return self.norm(x)


class Gemma2ForCausalLM(CausalLM):
    config_class = Gemma2Config
    backbone, embeddings, context = "model", "embed_tokens", "max_position_embeddings"
    fingerprint_fields = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    blocks = "model.layers"

    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @property
    def final_logit_softcap(self) -> float | None:
        return self.config.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))
        cap = self.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model: model_type gemma3_text, or gemma3 with the text model's config nested under
    text_config (the multimodal checkpoints' layout, whose vision tower is refused)."""

    config_class = Gemma3TextConfig
    # the multimodal checkpoints' names for the text model, transformers 5's and older ones'
    PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                "language_model.lm_head.": "lm_head."}

    @classmethod
    def read_config(cls, config: dict[str, Any], source: str = "config.json") -> Gemma3TextConfig:
        if config.get("model_type") == "gemma3":
            if config.get("vision_config") is not None:
                raise ConfigError(f"{source}: vision_config is set: a Gemma 3 with a vision tower; only its text "
                                  "model (gemma3_text) is supported")
            if not isinstance(config.get("text_config"), dict):
                raise ConfigError(f"{source}: model_type gemma3 needs its text model's config as text_config, "
                                  f"got {config.get('text_config')!r}")
            config = {**config["text_config"], "model_type": "gemma3"}
        return config_from_dict(cls.config_class, config, source)

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        for old, new in cls.PREFIXES.items():
            if name.startswith(old):
                return new + name[len(old):], tensor
        return name, tensor
