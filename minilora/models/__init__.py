"""The model registry: config.json's `model_type` -> the class that implements it.

A new family is one file in this folder plus one line here. Every class has:
  config_class                                  a dataclass whose fields are config.json keys
  checkpoint_to_model(name, tensor)             Hub name/layout -> ours (None to skip a tensor)
  model_to_checkpoint(name, tensor)             and back, for saving merged weights
  tied_weights                                  {alias: source} of parameters shared by tying
  forward(input_ids, attention_mask, ...)       logits
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from .common import KVCache, config_from_dict
from .gpt2 import GPT2LMHeadModel
from .gptj import GPTJForCausalLM
from .llama import LlamaForCausalLM

MODEL_TYPES: dict[str, type[nn.Module]] = {
    "gpt2": GPT2LMHeadModel,
    "gptj": GPTJForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class(config: dict[str, Any], source: str = "config.json") -> type[nn.Module]:
    kind = config.get("model_type")
    if kind is None:
        raise ConfigError(f"{source}: no model_type field, so the architecture is unknown")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {kind!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[kind]


def build_model(config: dict[str, Any], source: str = "config.json") -> nn.Module:
    """Construct the model for a config.json dict (on the current default device, e.g. `meta`)."""
    cls = model_class(config, source)
    return cls(config_from_dict(cls.config_class, config, source))


__all__ = ["MODEL_TYPES", "KVCache", "build_model", "model_class"]
