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
from .bert import (BertForEmbedding, BertForSequenceClassification, DistilBertForEmbedding,
                   DistilBertForSequenceClassification)
from .gpt2 import GPT2LMHeadModel
from .gptj import GPTJForCausalLM
from .llama import LlamaForCausalLM

# Decoders have one task (causal LM); encoders one class per task.
MODEL_TYPES: dict[str, type[nn.Module] | dict[str, type[nn.Module]]] = {
    "gpt2": GPT2LMHeadModel,
    "gptj": GPTJForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "bert": {"classification": BertForSequenceClassification, "embedding": BertForEmbedding},
    "distilbert": {"classification": DistilBertForSequenceClassification, "embedding": DistilBertForEmbedding},
}


def model_class(config: dict[str, Any], source: str = "config.json", task: str | None = None) -> type[nn.Module]:
    """The class for config.json's model_type and a task: "causal-lm" (decoders), or "classification" /
    "embedding" (encoders; by default "classification" if the checkpoint is a classifier)."""
    kind = config.get("model_type")
    if kind is None:
        raise ConfigError(f"{source}: no model_type field, so the architecture is unknown")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {kind!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    entry = MODEL_TYPES[kind]
    if not isinstance(entry, dict):
        if task not in (None, "causal-lm"):
            raise ConfigError(f"{source}: {kind} is a causal language model; task {task!r} is not available")
        return entry
    if task is None:
        is_classifier = any("SequenceClassification" in a for a in config.get("architectures") or [])
        task = "classification" if is_classifier else "embedding"
    if task not in entry:
        raise ConfigError(f"{source}: task {task!r} is not available for {kind}; use one of {', '.join(entry)}")
    return entry[task]


def build_model(config: dict[str, Any], source: str = "config.json", task: str | None = None) -> nn.Module:
    """Construct the model for a config.json dict (on the current default device, e.g. `meta`)."""
    cls = model_class(config, source, task)
    return cls(config_from_dict(cls.config_class, config, source))


__all__ = ["MODEL_TYPES", "KVCache", "build_model", "model_class"]
