"""The Llama family: Llama 2/3, SmolLM/SmolLM2, Qwen2, Qwen3 (dense) and Mistral, with the Hub's tensor names.

What the family shares: pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, Su et al. 2021)
in the "rotate half" layout of the Hub's checkpoints, grouped-query attention (n_kv_heads <= n_heads),
and a SwiGLU MLP down(silu(gate(x)) * up(x)). What differs is read from config.json:
Qwen2 puts a bias on q/k/v, Qwen3 instead RMS-normalises each head of q and k (q_norm, k_norm over
head_dim, before RoPE) and sets head_dim apart from hidden_size / heads, Mistral and the Qwens may limit
attention to a sliding window (the Qwens in some layers only), Llama 3 rescales RoPE frequencies,
SmolLM2 and the small Qwen3s tie the output head to the embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError
from .common import (
    CausalLM,
    activation,
    attend,
    attention_mask,
    mask_form,
    position_ids,
    run_blocks,
)

# rope scaling types and the numbers each needs
ROPE_SCALING = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
LAYER_TYPES = ("full_attention", "sliding_attention")
QWENS = ("qwen2", "qwen3")  # the families whose windows follow use_sliding_window and max_window_layers


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 keeps rope_theta and the scaling here
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it
    use_sliding_window: bool = False  # the Qwens only: their sliding_window is ignored unless this is set
    max_window_layers: int = 28  # the Qwens: layers from this index on are windowed (transformers' default)
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer (the Qwens)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        # Qwen3's head_dim is its own setting, 128 where config.json leaves it out (as in transformers)
        self.head_dim = self.head_dim or (128 if self.model_type == "qwen3" else
                                          self.hidden_size // self.num_attention_heads)
        rope, field = dict(self.rope_parameters or {}), "rope_scaling" if self.rope_scaling else "rope_parameters"
        if self.rope_theta is None:
            self.rope_theta = rope.get("rope_theta", 10000.0)
        if self.rope_scaling is None and rope.get("rope_type", "default") != "default":
            self.rope_scaling = rope
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        check_rope(self.rope_theta, self.rope_scaling, self.head_dim, field)
        if self.max_window_layers < 0:
            raise ConfigError(f"max_window_layers must be an integer >= 0, got {self.max_window_layers}")
        kinds = self.layer_types
        if kinds is not None and (len(kinds) != self.num_hidden_layers or set(kinds) - set(LAYER_TYPES)):
            raise ConfigError(f"layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                              f"{self.num_hidden_layers} layers, got {kinds!r}")
        no_window = not (self.use_sliding_window and self.sliding_window)
        if self.model_type in QWENS and no_window and "sliding_attention" in (kinds or []):  # transformers crashes
            raise ConfigError("layer_types has sliding_attention layers, but use_sliding_window is false or "
                              "sliding_window is null, so there is no window to apply")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def windows(self) -> list[int | None]:
        """Each layer's attention window (None: the full causal context), as transformers 5 decides it:
        Mistral windows every layer and ignores layer_types; a Qwen windows only with use_sliding_window,
        and then the layers layer_types calls sliding_attention, by default those from max_window_layers
        on; Llama has no window."""
        n = self.num_hidden_layers
        if self.model_type == "mistral":
            return [self.sliding_window] * n
        if self.model_type not in QWENS:
            return [None] * n
        window = self.sliding_window if self.use_sliding_window else None
        kinds = self.layer_types or ["sliding_attention" if i >= self.max_window_layers else "full_attention"
                                     for i in range(n)]
        return [window if kind == "sliding_attention" else None for kind in kinds]


def check_rope(theta: float | None, scaling: dict | None, head_dim: int, field: str = "rope_scaling") -> None:
    """A ConfigError naming `field` unless RoPE can be computed: a known scaling type with its numbers,
    a positive theta and an even head_dim."""
    scaling = scaling if isinstance(scaling, dict) else {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING:
        raise ConfigError(f"rope scaling type {kind!r} is not supported in {field} ({', '.join(ROPE_SCALING)} are)")
    bad = [k for k in ROPE_SCALING[kind] if isinstance(scaling.get(k), bool)
           or not isinstance(scaling.get(k), (int, float)) or not scaling[k] > 0]
    if bad or not (isinstance(theta, (int, float)) and theta > 0) or head_dim % 2:
        raise ConfigError(f"{field} {kind!r} needs {', '.join(bad)} as positive numbers" if bad else
                          f"rope needs a positive rope_theta and an even head_dim, got {theta!r} and {head_dim}")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/d) for i < d/2, with linear or Llama 3's long-context rescaling when
    configured (check_rope has seen the numbers)."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, head_dim) of positions (B, T): computed in fp32, then cast, as the
    reference implementation does."""
    freqs = pos[..., None].float() * inv_freq.to(pos.device)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:  # Qwen3: each head's q and k RMS-normalised over head_dim
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
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
        y = attend(q, k, v, mask, past)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        self.window = cfg.windows[layer_idx]

    def forward(self, x, cos, sin, masks, cache, past):  # masks: {window: mask}, see LlamaModel.forward
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks[self.window], cache, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    gradient_checkpointing = False

    def forward(self, input_ids, attn_mask=None, pos=None, cache=None):
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        form = mask_form(attn_mask)  # once per batch, outside the blocks
        pos = position_ids(attn_mask, T, past, input_ids.device, form) if pos is None else pos
        # One mask per distinct window, each layer takes its own: at most two (full and windowed).
        windows = {layer.window for layer in self.layers}
        masks = {w: attention_mask(attn_mask, T, past, input_ids.device, w, form) for w in windows}
        x = self.embed_tokens(input_ids)
        cos, sin = rope_angles(pos, rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling),
                               x.dtype)
        x = run_blocks(self.layers, x, cos, sin, masks, cache, past, checkpoint=self.gradient_checkpointing and self.training and cache is None)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig
    backbone, embeddings, context = "model", "embed_tokens", "max_position_embeddings"
    fingerprint_fields = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    blocks = "model.layers"

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if name.endswith(".rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; we compute it
            return None
        return name, tensor
