"""Sliding-window attention against transformers (the oracle), fp32, max abs error <= 1e-5.

transformers 5 windows a Qwen2 layer only when use_sliding_window is set, and then only the layers that
layer_types calls "sliding_attention" (by default those from max_window_layers on); a windowed query
sees itself and the sliding_window - 1 keys before it. Mistral windows every layer and ignores
layer_types. The sequences here are longer than the window, so a wrong rule shows in the logits.
"""

import json

import pytest
import torch
import transformers
from minilora.errors import ConfigError
from minilora.generate import generate_ids
from minilora.loading.weights import load_model
from minilora.models import KVCache

TOL = 1e-5
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    # config.json as older Hub checkpoints write it: no layer_types, so max_window_layers decides
    "from-max-window-layers": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "window-off": dict(use_sliding_window=False, sliding_window=4, max_window_layers=1),
    "layer-types": dict(use_sliding_window=True, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def saved(tmp_path, model_type="qwen2", keep_layer_types=False, seed=0, **config):
    """A transformers model with random weights, saved to tmp_path; config.json keeps layer_types only if
    the config gave them (transformers writes the ones it derived from max_window_layers too)."""
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[model_type]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**SMALL, **config, attn_implementation="eager"))
    with torch.no_grad():  # random, not-small values everywhere, biases and norms included
        for p in hf.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if "layer_types" not in config and not keep_layer_types:
        cfg.pop("layer_types", None)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return hf.eval(), tmp_path


def ids(rows=3, length=12, seed=0):
    return torch.randint(0, SMALL["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))


def test_the_rule_is_transformers_rule(tmp_path):
    """What the config decides, per layer, is what transformers' layer_types say (None: full attention)."""
    cases = [*CONFIGS.values(), dict(use_sliding_window=True, sliding_window=4, max_window_layers=5),
             dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),  # every layer slides
             dict(use_sliding_window=True, sliding_window=None, max_window_layers=1)]
    for i, config in enumerate(cases):
        hf, folder = saved(tmp_path / str(i), keep_layer_types=True, **config)
        windows = [hf.config.sliding_window if t == "sliding_attention" else None for t in hf.config.layer_types]
        assert load_model(folder).config.windows == windows, config
    assert load_model(saved(tmp_path / "a", **CONFIGS["from-max-window-layers"])[1]).config.windows == [None, 4, 4]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_equal_transformers(tmp_path, kind):
    hf, folder = saved(tmp_path, **CONFIGS[kind])
    ours = load_model(folder)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 9:] = 0  # right padding
    with torch.no_grad():
        assert (ours(x) - hf(input_ids=x).logits).abs().max().item() <= TOL
        real = mask.bool()
        got, expected = ours(x, attention_mask=mask), hf(input_ids=x, attention_mask=mask).logits
        assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_the_window_changes_the_logits(tmp_path):
    """The same weights with and without the window differ, so the tests above would see a window ignored."""
    on, _ = saved(tmp_path / "on", **CONFIGS["from-max-window-layers"])
    off, _ = saved(tmp_path / "off", **CONFIGS["window-off"])
    with torch.no_grad():
        assert (on(input_ids=ids()).logits - off(input_ids=ids()).logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_left_padding_under_a_sliding_window_gives_the_unpadded_logits(tmp_path, kind):
    hf, folder = saved(tmp_path, **CONFIGS[kind])
    ours = load_model(folder)
    x = ids(seed=1)
    padded = torch.cat([torch.zeros(3, 5, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(3, 5, dtype=torch.long), torch.ones_like(x)], dim=1)
    mask[2, 3:5] = 1  # a row with a shorter pad, so its window covers two more real tokens
    padded[2, 3:5] = torch.tensor([7, 8])
    with torch.no_grad():
        got = ours(padded, attention_mask=mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = hf(input_ids=padded, attention_mask=mask, position_ids=pos).logits
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() <= TOL
        assert (got[:2, 5:] - hf(input_ids=x[:2]).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_kv_cache_decoding_equals_the_full_forward(tmp_path, kind):
    hf, folder = saved(tmp_path, **CONFIGS[kind])
    ours = load_model(folder)
    x = ids(rows=2, length=12, seed=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = ours(x, attention_mask=mask)
        cache = KVCache()
        steps = [ours(x[:, :5], attention_mask=mask[:, :5], cache=cache)]  # a prefill, then one token at a time
        steps += [ours(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(5, 12)]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = hf(input_ids=x, attention_mask=mask, position_ids=pos).logits
    incremental, real = torch.cat(steps, dim=1), mask.bool()
    assert (full[real] - expected[real]).abs().max().item() <= TOL
    assert (incremental[real] - full[real]).abs().max().item() <= TOL
    # greedy generation past the window: the cache, a batch with left padding, and transformers agree
    prompts = [x[0, :6].tolist(), x[0, :3].tolist()]
    with_cache = generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=10, use_cache=True)
    assert with_cache == generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=10, use_cache=False)
    for p, o in zip(prompts, with_cache):
        expected = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert expected[0, len(p):].tolist() == o


def test_gradient_checkpointing_passes_each_layer_its_mask(tmp_path):
    _, folder = saved(tmp_path, **CONFIGS["from-max-window-layers"])
    ours = load_model(folder).train()
    x = ids()
    grads = []
    for checkpointing in (False, True):
        ours.model.gradient_checkpointing = checkpointing
        ours.zero_grad(set_to_none=True)
        ours(x).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_mistral_windows_every_layer_and_ignores_layer_types(tmp_path):
    """transformers' Mistral warns about layer_types and applies sliding_window to every layer anyway."""
    hf, folder = saved(tmp_path, "mistral", sliding_window=4, layer_types=["full_attention"] * 3)
    assert json.loads((folder / "config.json").read_text())["layer_types"] == ["full_attention"] * 3
    ours = load_model(folder)
    assert ours.config.windows == [4, 4, 4]
    with torch.no_grad():
        assert (ours(ids()) - hf(input_ids=ids()).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("change, message", [
    (dict(max_window_layers=-1), r"max_window_layers must be an integer >= 0, got -1"),
    (dict(max_window_layers=1.5), r"max_window_layers must be an integer, got 1.5"),
    (dict(layer_types=["full_attention"] * 2), (r"layer_types must list one of full_attention, sliding_attention "
                                                r"for each of the 3 layers, got \['full_attention', 'full_attention'\]")),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     r"layer_types must list one of .* got \[.*'chunked_attention'"),
    (dict(layer_types="sliding_attention"), r"layer_types must be a list or null, got 'sliding_attention'"),
    (dict(layer_types=[0, 1, 1]), r"layer_types must be a list of strings, got \[0, 1, 1\]"),
    (dict(layer_types=["sliding_attention"] * 3, use_sliding_window=False),
     r"layer_types has sliding_attention layers, but use_sliding_window is false"),
    (dict(use_sliding_window="yes"), r"use_sliding_window must be true or false, got 'yes'"),
])
def test_bad_window_values_are_named(tmp_path, change, message):
    _, folder = saved(tmp_path, **CONFIGS["from-max-window-layers"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=rf"config\.json: {message}"):
        load_model(folder)


def test_mistral_layer_types_are_checked_as_transformers_checks_them(tmp_path):
    _, folder = saved(tmp_path, "mistral", sliding_window=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_types": ["full_attention"]}))
    with pytest.raises(ConfigError, match=r"config\.json: layer_types must list one of .* each of the 3 layers"):
        load_model(folder)
