"""The model registry: config.json's `model_type` -> the class that implements it.

Supported: GPT-2 (gpt2), GPT-J (gptj), Llama 2/3 and SmolLM (llama), Mistral (mistral), Qwen2 (qwen2),
Qwen3 dense (qwen3), Gemma 2 (gemma2), Gemma 3's text model (gemma3_text, and gemma3 without a vision
tower), BERT (bert) and DistilBERT (distilbert). Refused by name: the mixture-of-experts variants
(UNSUPPORTED).

A new family is one file in this folder plus one line here. Every class keeps the contract written
down in common.PretrainedModel (config class, checkpoint name mapping, output heads, tied weights,
the fingerprint that decides whether an adapter fits) and takes (input_ids, attention_mask) to logits,
or to hidden states for the embedding models.

May import: the ground floor only (minilora.errors, minilora.fields, minilora.kernels). Models know
nothing of LoRA, quantization or file formats: the loader puts tensors in place by their names.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .bert import (
    BertForEmbedding,
    BertForSequenceClassification,
    DistilBertForEmbedding,
    DistilBertForSequenceClassification,
)
from .common import KVCache, PretrainedModel
from .gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from .gpt2 import GPT2LMHeadModel
from .gptj import GPTJForCausalLM
from .llama import LlamaForCausalLM

# Decoders have one task (causal LM); encoders one class per task.
MODEL_TYPES: dict[str, type[PretrainedModel] | dict[str, type[PretrainedModel]]] = {
    "gpt2": GPT2LMHeadModel,
    "gptj": GPTJForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "bert": {"classification": BertForSequenceClassification, "embedding": BertForEmbedding},
    "distilbert": {"classification": DistilBertForSequenceClassification, "embedding": DistilBertForEmbedding},
}

# model_types near a supported one that are not it, and why
UNSUPPORTED = {"qwen3_moe": "Qwen3's mixture-of-experts model; only the dense qwen3 is supported",
               "qwen2_moe": "Qwen2's mixture-of-experts model; only the dense qwen2 is supported"}

# Published configs built into the families (GPT-2's four sizes, GPT-J-6B): reports work offline.
PRESETS: dict[str, dict[str, Any]] = {name: config for entry in MODEL_TYPES.values()
                                      for cls in (entry.values() if isinstance(entry, dict) else [entry])
                                      for name, config in cls.presets.items()}


def model_class(config: dict[str, Any], source: str = "config.json", task: str | None = None) -> type[PretrainedModel]:
    """The class for config.json's model_type and a task: "causal-lm" (decoders), or "classification" /
    "embedding" (encoders; by default "classification" if the checkpoint is a classifier)."""
    kind = config.get("model_type")
    if kind is None:
        raise ConfigError(f"{source}: no model_type field, so the architecture is unknown")
    if isinstance(kind, str) and kind in UNSUPPORTED:
        raise ConfigError(f"{source}: model_type {kind!r} is not supported: {UNSUPPORTED[kind]}")
    if not isinstance(kind, str) or kind not in MODEL_TYPES:
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


def build_model(config: dict[str, Any], source: str = "config.json", task: str | None = None) -> PretrainedModel:
    """Construct the model for a config.json dict (on the current default device, e.g. `meta`)."""
    cls = model_class(config, source, task)
    return cls(cls.read_config(config, source))


__all__ = ["MODEL_TYPES", "PRESETS", "KVCache", "PretrainedModel", "build_model", "model_class"]
