"""Sampling follows its definitions; generation stops on EOS even when EOS is also the pad token."""

import torch
from minilora.generate import generate_ids, sample_next
from minilora.loading.weights import load_model


def test_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, temperature=1.0, generator=g), minlength=4).float() / 20000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.015)
    hot = torch.bincount(sample_next(logits, temperature=0.5, generator=g), minlength=4).float() / 20000
    assert torch.allclose(hot, (logits[0] / 0.5).softmax(-1), atol=0.015)


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(5000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: the nucleus for 0.8 is {0, 1}
    assert p[0] < 0.8 < p[0] + p[1]
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert sample_next(logits[:3], 0.0).tolist() == [0, 0, 0]


def test_seeded_sampling_is_reproducible(saved_tiny):
    model = load_model(saved_tiny["llama-gqa"][1])
    a = generate_ids(model, [[5, 6, 7]], [], 0, 10, temperature=1.0, seed=1)
    assert a == generate_ids(model, [[5, 6, 7]], [], 0, 10, temperature=1.0, seed=1)
    assert a != generate_ids(model, [[5, 6, 7]], [], 0, 10, temperature=1.0, seed=2)


def test_stops_on_eos_even_when_eos_is_the_pad_token(saved_tiny):
    model = load_model(saved_tiny["gpt2"][1])
    free = generate_ids(model, [[5, 6, 7], [9, 10]], [], 0, 8)
    # make a token that row 0 generates (not first) the EOS, and use it as the pad id too
    i = next(i for i in range(1, 8) if free[0][i] not in free[0][:i])
    eos = free[0][i]
    out = generate_ids(model, [[5, 6, 7], [9, 10]], [eos], eos, 8)
    assert out[0] == free[0][:i]
    cut = free[1].index(eos) if eos in free[1] else 8
    assert out[1] == free[1][:cut]  # the other row is not disturbed by row 0 finishing


def test_stop_strings(smollm2):
    from minilora.generate import generate
    model, tok = smollm2
    full = generate(model, tok, "The capital of France is", max_new_tokens=20)
    assert "." in full
    assert generate(model, tok, "The capital of France is", max_new_tokens=20, stop=["."]) == full.split(".")[0]
