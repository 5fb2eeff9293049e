"""GPT-J (Wang & Komatsuzaki 2021), with the Hub's tensor names.

What sets it apart: attention and MLP run in parallel on the same layer-normed input and are added
to the residual together; q/k/v/out projections have no bias; rotary embeddings cover only the first
`rotary_dim` dims of each head, in GPT-J's interleaved layout (pairs (x0, x1), (x2, x3), ... are
rotated, not the two halves as in Llama); the output head is untied and has a bias.
"""

from __future__ import annotations

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


@dataclass
class GPTJConfig:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    rotary_dim: int | None = 64
    n_positions: int = 2048
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    model_type: str = "gptj"


PRESETS = {"EleutherAI/gpt-j-6b": dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16,
                                       rotary_dim=64, n_positions=2048)}


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J rotates adjacent pairs."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class GPTJAttention(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.rotary_dim = cfg.rotary_dim or self.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.attn_dropout = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.layer_idx = layer_idx

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((rot * cos + rotate_every_two(rot) * sin, rest), dim=-1)

    def forward(self, x, cos, sin, mask, cache, past):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attend(q, k, v, mask, past, self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPTJMLP(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.fc_in = nn.Linear(cfg.n_embd, inner)
        self.fc_out = nn.Linear(inner, cfg.n_embd)
        self.act = activation(cfg.activation_function)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class GPTJBlock(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPTJAttention(cfg, layer_idx)
        self.mlp = GPTJMLP(cfg)

    def forward(self, x, cos, sin, mask, cache, past):
        h = self.ln_1(x)  # one norm feeds attention and MLP, which run side by side
        return x + self.attn(h, cos, sin, mask, cache, past) + self.mlp(h)


class GPTJModel(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(GPTJBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    gradient_checkpointing = False

    def forward(self, input_ids, attn_mask=None, pos=None, cache=None):
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        form = mask_form(attn_mask)  # once per batch, outside the blocks
        pos = position_ids(attn_mask, T, past, input_ids.device, form) if pos is None else pos
        mask = attention_mask(attn_mask, T, past, input_ids.device, form=form)
        x = self.drop(self.wte(input_ids))
        d = self.cfg.rotary_dim or self.cfg.n_embd // self.cfg.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=input_ids.device).float() / d))
        # each angle is used by one pair of adjacent dims: repeat_interleave, not cat. (B, 1, T, d)
        angles = (pos[..., None].float() * inv_freq).repeat_interleave(2, dim=-1)[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x = run_blocks(self.h, x, cos, sin, mask, cache, past, checkpoint=self.gradient_checkpointing and self.training and cache is None)
        return self.ln_f(x)


class GPTJForCausalLM(CausalLM):
    config_class, presets = GPTJConfig, PRESETS
    backbone, embeddings, context = "transformer", "wte", "n_positions"
    fingerprint_fields = ("model_type", "vocab_size", "n_embd", "n_layer")
    blocks = "transformer.h"

    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"config.json: n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.config = cfg
        self.transformer = GPTJModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.tie_weights()

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # saved causal-mask buffers
            return None
        return name, tensor
