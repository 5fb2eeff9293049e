"""What every model family shares: the model contract (PretrainedModel), config parsing, the attention
mask, position ids, the KV cache, the block loop with gradient checkpointing.

Each is a few lines; they live here so the family files hold only what makes a family different.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..errors import ConfigError
from ..fields import from_table
from ..kernels import SHORT_ATTENTION, ShortAttention

C = TypeVar("C")


def config_from_dict(cls: type[C], d: dict[str, Any], source: str = "config.json") -> C:
    """Build a config dataclass from config.json's keys: unknown keys are ignored, missing required ones
    named, and every value checked against its field's type and range (fields.from_table)."""
    return from_table(cls, d, source, unknown_keys_allowed=True, ranges=True)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, source: str = "config.json"):
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_kv_heads, T, head_dim) pair per layer."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (generation drops finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


def mask_form(attention_mask: torch.Tensor | None) -> str | None:
    """What kind of attention mask a batch has: None (no mask, or every token real: plain causal attention),
    "padding" (1 for real tokens, 0 for padding) or "packed" (a packed row's example numbers 1, 1, 2, 2, 2,
    ...). Decided once per batch, with one look at the values, by the model before its blocks run, so that
    nothing inside a block branches on the mask's values (a compiled block has no graph break there)."""
    if attention_mask is None:
        return None
    packed, plain = torch.stack([(attention_mask > 1).any(), (attention_mask == 1).all()]).tolist()
    return "packed" if packed else None if plain else "padding"


def position_ids(attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device,
                 form: str | None = "unknown") -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row gets the same positions as unpadded; in a
    packed row (a mask numbering its examples 1, 1, 2, 2, 2, ...) they restart at each example.
    `form` is mask_form(attention_mask), found here if not given."""
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=device)[None]
    if form == "packed" or form == "unknown" and mask_form(attention_mask) == "packed":
        t = torch.arange(attention_mask.shape[1], device=device).expand_as(attention_mask)
        start = torch.ones_like(attention_mask, dtype=torch.bool)
        start[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
        return (t - torch.where(start, t, 0).cummax(-1).values)[:, past:past + q_len]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + q_len]


def attention_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device,
                   sliding_window: int | None = None, form: str | None = "unknown") -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, q_len, past + q_len), True where a query may attend to a key.

    Returns None when plain causal attention is exact (no padding, no cache, no window), so SDPA can
    take its `is_causal` fast path. attention_mask is (B, past + q_len) with 1 for real tokens, or a
    packed row's example numbers (1, 1, 2, 2, 2, ...): then a token sees only its own example.
    `form` is mask_form(attention_mask), found here if not given.
    """
    form = mask_form(attention_mask) if form == "unknown" else form
    if (attention_mask is None or form is None) and sliding_window is None:
        return None
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
        if form == "packed":  # the query's example number must be the key's
            allowed = allowed & (attention_mask[:, None, past:kv_len, None] == attention_mask[:, None, None, :kv_len])
    # A query that may see no key (a left-pad position) would come out NaN: let it see every key.
    # Its output is never used, as the pad position itself is masked everywhere else.
    return allowed | ~allowed.any(-1, keepdim=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, past: int,
           dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """SDPA over (B, heads, T, head_dim); k/v may have fewer (grouped-query) heads."""
    is_causal = mask is None and past == 0 and q.shape[2] > 1
    if torch.is_autocast_enabled(q.device.type):  # as autocast would cast them for SDPA (rotary q, k are fp32)
        q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and dropout == 0.0 and q.shape[2] * k.shape[2] <= SHORT_ATTENTION):
        if k.shape[1] != q.shape[1]:  # grouped-query: each k/v head serves q.heads / k.heads query heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        if mask is None:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        bias = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
        return ShortAttention.apply(q, k, v, bias, scale if scale is not None else q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpoint: bool = False) -> torch.Tensor:
    """x through every block; with `checkpoint`, each block is recomputed in the backward pass instead of
    keeping its activations. use_reentrant=False lets gradients reach LoRA weights inside a block even
    when its input (a frozen embedding's output) does not require grad."""
    for block in blocks:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, size: int) -> None:
    """Grow the token embeddings (and an untied output head) to `size` rows, e.g. after adding a pad
    token. Old rows are kept as they are; new rows start at the mean of the old ones."""
    emb = model.input_embeddings
    old = emb.weight
    n = old.shape[0]
    if size < n:
        raise ConfigError(f"cannot shrink the embeddings from {n} to {size} rows")

    def grown(t: torch.Tensor, fill: torch.Tensor) -> nn.Parameter:
        new = torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
        new[:n], new[n:] = t, fill
        return nn.Parameter(new, requires_grad=t.requires_grad)
    emb.weight, emb.num_embeddings = grown(old, old.mean(0)), size
    head = getattr(model, "lm_head", None)
    if head is not None:
        if model.tied_weights:
            model.tie_weights()
        else:
            head.weight = grown(head.weight, head.weight.mean(0))
            if head.bias is not None:
                head.bias = grown(head.bias, torch.zeros((), dtype=head.bias.dtype))
        head.out_features = size
    model.config.vocab_size = size


@dataclass
class Provenance:
    """Where a model's weights came from, recorded once by the loader (loading/weights.load_model) and
    read by whatever writes the model out again: a merged checkpoint, a GGUF file, an adapter's config."""
    source: str                       # what was asked for: a Hub id, a folder or a .gguf file
    path: Path                        # the folder or file it resolved to
    format: str                       # "safetensors" (a folder) or "gguf"
    quantization: str | None          # None (floating point), "int8", "nf4" or "gguf-blocks"
    config: dict[str, Any]            # config.json as read (or made from GGUF metadata)
    fresh_tensors: tuple[str, ...] = ()  # task-head tensors the checkpoint lacked, initialised fresh


class PretrainedModel(nn.Module):
    """The contract between a model family and the rest of minilora: what the loader, LoRA, quantization
    and adapters rely on besides `config` (whose fields are config.json's keys). A new family subclasses
    this (usually through CausalLM), sets the class attributes, and takes one line in the registry
    (models/__init__.py); tests/test_models.py checks every registered class against it.

    config_class         a dataclass whose fields are config.json's keys (read_config builds it)
    presets              {name: config.json dict} of published sizes, for reports with no download
    task_type            PEFT's task_type for an adapter of this model: CAUSAL_LM, SEQ_CLS, ...
    output_heads         names of the layers that produce the output: "all-linear" LoRA leaves them
                         alone (as PEFT does) and 8-bit loading keeps them in floating point
    task_head            names of the modules of a task head (a classifier's layers): kept in floating
                         point too, and init_head may make them fresh over a bare encoder
    fingerprint_fields   config fields an adapter's base model must share with this one to fit it
    conv1d_layout        the checkpoint stores its linear weights as (in, out): PEFT's fan_in_fan_out
    blocks               the name of the ModuleList of its transformer blocks (compile.py compiles each);
                         a block's forward takes tensors and settings decided before the blocks run
                         (the masks: mask_form), never branching on a tensor's values

    An instance has `config` (a config_class), `input_embeddings` and `max_length`; the loader records
    where its weights came from in `provenance` (a Provenance; None for a model built from a config).
    """

    config_class: type
    presets: dict[str, dict[str, Any]] = {}
    task_type = "CAUSAL_LM"
    output_heads: tuple[str, ...] = ()
    task_head: tuple[str, ...] = ()
    fingerprint_fields: tuple[str, ...] = ("model_type", "vocab_size")
    conv1d_layout = False
    blocks: str
    provenance: Provenance | None = None

    @classmethod
    def read_config(cls, config: dict[str, Any], source: str = "config.json") -> Any:
        """config.json's dict -> a config_class; a family whose file nests the config it reads (a
        multimodal checkpoint's text_config) takes that part here."""
        return config_from_dict(cls.config_class, config, source)

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor's name and layout -> this model's (None: not a tensor of the model)."""
        return name, tensor

    @classmethod
    def model_to_checkpoint(cls, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """And back, for saving: the inverse of checkpoint_to_model."""
        return name, tensor

    @property
    def tied_weights(self) -> dict[str, str]:
        """{alias: source} of the parameters shared by tying; a checkpoint holds only the source."""
        return {}

    def tie_weights(self) -> None:
        """Make every alias of tied_weights the same tensor as its source (after loading)."""

    def init_head(self, name: str, shape: torch.Size, device: torch.device | str) -> torch.Tensor | None:
        """A fresh tensor for `name` when the checkpoint lacks it and it belongs to the task head, which
        may start untrained (a classifier over a bare encoder); None where a missing tensor is an error."""
        return None

    def transformer_blocks(self) -> nn.ModuleList:
        """The model's transformer blocks, in order (the ModuleList named by `blocks`)."""
        return self.get_submodule(self.blocks)

    def compile_blocks(self, **options: Any) -> "PretrainedModel":
        """torch.compile on each transformer block, in place (compile.py); what `compile = true` calls."""
        from .compile import compile_blocks
        return compile_blocks(self, **options)

    def fingerprint(self) -> dict[str, Any]:
        """The config values that decide whether an adapter fits this model."""
        return {k: getattr(self.config, k) for k in self.fingerprint_fields}

    @property
    def input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        raise NotImplementedError


class CausalLM(PretrainedModel):
    """What the decoder families share around their backbone: the LM head, tying it to the token
    embeddings, and the hidden states the fused head loss reads. A family sets `backbone` (the attribute
    holding its blocks, named as in the checkpoint), `embeddings` (the token embedding inside it) and
    `context` (the config field giving the context length)."""

    backbone: str
    embeddings: str
    context: str
    output_heads = ("lm_head",)
    # c in logits = c * tanh(head(h) / c) (Gemma 2), None where the logits are the head's output: the
    # fused head loss of training (objectives/causal_lm.py) applies the bare head, so it asks first
    final_logit_softcap: float | None = None

    @property
    def tied_weights(self) -> dict[str, str]:
        tied = self.config.tie_word_embeddings
        return {"lm_head.weight": f"{self.backbone}.{self.embeddings}.weight"} if tied else {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings.weight

    @property
    def input_embeddings(self) -> nn.Embedding:
        return getattr(getattr(self, self.backbone), self.embeddings)

    @property
    def max_length(self) -> int:
        return getattr(self.config, self.context)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The last block's normed output (B, T, d): what the head turns into logits."""
        return getattr(self, self.backbone)(input_ids, attention_mask, position_ids, cache)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); attention_mask (B, past + T) has 1 for real tokens."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))
