"""GPT-2 (Radford et al. 2019), with the Hub's tensor names.

One layout difference from the Hub is handled here and nowhere else: GPT-2 checkpoints store their
projections as `Conv1D` weights of shape (in, out), used as x @ W. We hold them as `nn.Linear`
(out, in), used as x @ W.T, so LoRA and int8 see ordinary linear layers; `checkpoint_to_model`
transposes on the way in and `model_to_checkpoint` on the way out. `c_attn` is one fused linear
producing q, k and v side by side (3 * n_embd outputs): LoRA on `c_attn` adapts all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, DataError
from .common import (
    CausalLM,
    KVCache,
    activation,
    attend,
    attention_mask,
    mask_form,
    position_ids,
    run_blocks,
)


@dataclass
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    model_type: str = "gpt2"


# The four published sizes, so that parameter reports work with no download at all.
PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}
PRESETS = {name: dict(model_type="gpt2", vocab_size=50257, n_positions=1024, **p) for name, p in PRESETS.items()}
PRESETS.update({f"openai-community/{n}": p for n, p in list(PRESETS.items())})

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.scale = (1 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0)
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, past: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attend(q, k, v, mask, past, self.attn_dropout if self.training else 0.0, self.scale)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, inner)
        self.c_proj = nn.Linear(inner, cfg.n_embd)
        self.act = activation(cfg.activation_function)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, mask, cache, past):
        x = x + self.attn(self.ln_1(x), mask, cache, past)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.n_positions = cfg.n_positions

    def forward(self, input_ids, attn_mask=None, pos=None, cache=None):
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        form = mask_form(attn_mask)  # once per batch, outside the blocks
        pos = position_ids(attn_mask, T, past, input_ids.device, form) if pos is None else pos
        if past + T > self.n_positions:
            raise DataError(f"a sequence of {past + T} tokens is longer than GPT-2's context of {self.n_positions}")
        mask = attention_mask(attn_mask, T, past, input_ids.device, form=form)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        x = run_blocks(self.h, x, mask, cache, past, checkpoint=self.gradient_checkpointing and self.training and cache is None)
        return self.ln_f(x)

    gradient_checkpointing = False


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its language-model head, tied to the token embeddings as in every GPT-2 checkpoint."""

    config_class, presets = GPT2Config, PRESETS
    backbone, embeddings, context = "transformer", "wte", "n_positions"
    fingerprint_fields = ("model_type", "vocab_size", "n_embd", "n_layer")
    blocks = "transformer.h"
    conv1d_layout = True  # the checkpoint's projections are Conv1D (in, out): PEFT's fan_in_fan_out

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"config.json: n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Hub name and layout -> ours. Checkpoints of the bare GPT2Model (the Hub's gpt2*) lack the
        `transformer.` prefix; `attn.bias`/`attn.masked_bias` are saved causal-mask buffers we skip."""
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(CONV1D):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        return name, tensor

    @classmethod
    def model_to_checkpoint(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        return name, (tensor.t() if name.endswith(CONV1D) else tensor)
