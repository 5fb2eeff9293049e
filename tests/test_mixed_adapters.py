"""Mixed-adapter batches (lora/mixed.py), against peft 0.21's forward with adapter_names= on the tiny
random Llama: each row equals its adapter alone (and peft's mixed batch), "__base__" rows the base
model; one adapter's rows go through A and B in one call; generation too; bad names get named errors."""

import copy

import pytest
import torch
from minilora.errors import ConfigError
from minilora.generate import generate_ids
from minilora.loading.weights import load_model
from minilora.lora.adapters import add_adapter, set_adapter
from minilora.lora.config import LoRAConfig
from minilora.lora.inject import adapter_disabled, apply_lora, merge_lora
from minilora.lora.layers import DoRAAdapter, LoRAAdapter
from minilora.lora.peft_files import load_adapter

IDS = torch.tensor([[5, 9, 13, 2, 40, 7], [3, 3, 8, 21, 60, 11], [7, 1, 4, 4, 9, 30], [0, 0, 12, 44, 2, 8]])
MASK = torch.tensor([[1] * 6, [1] * 6, [1] * 6, [0, 0, 1, 1, 1, 1]])
NAMES = ["default", "other", "__base__", "other"]


def alone(model, name, ids=IDS, mask=MASK):
    """Every row through one adapter (or none), as a plain batch."""
    with torch.no_grad():
        if name == "__base__":
            with adapter_disabled(model):
                return model(ids, attention_mask=mask)
        set_adapter(model, name)
        out = model(ids, attention_mask=mask)
        set_adapter(model, "default")
        return out


def test_each_row_is_its_adapter_alone_and_peft_s_mixed_batch(saved_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny["llama-gqa"]
    theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(folder), tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    theirs.eval()
    with torch.no_grad():
        mixed = ours(IDS, attention_mask=MASK, adapter_names=NAMES)
        peft_mixed = theirs(input_ids=IDS, attention_mask=MASK, adapter_names=NAMES).logits
    keep = MASK.bool()
    for row, name in enumerate(NAMES):
        expected = alone(ours, name)[row]
        assert (mixed[row] - expected)[keep[row]].abs().max() < 1e-5, (row, name)
    assert (mixed - peft_mixed)[keep].abs().max() < 1e-5
    assert (alone(ours, "default") - alone(ours, "other"))[keep].abs().max() > 0.05  # the adapters differ
    with torch.no_grad():  # the routing ends with the call: the next batch is the active adapter's again
        assert torch.equal(ours(IDS, attention_mask=MASK), alone(ours, "default"))


def two_adapters(saved_tiny, **other):
    _, folder = saved_tiny["llama-gqa"]
    torch.manual_seed(0)
    model = apply_lora(load_model(folder), ["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8, init_lora_weights=False)
    add_adapter(model, "other", LoRAConfig(["q_proj", "o_proj"], r=2, alpha=4, init_lora_weights=False, **other))
    set_adapter(model, "default")
    return model.eval()


def test_dora_and_embedding_adapters_mix_and_each_adapter_runs_once_per_layer(saved_tiny, monkeypatch):
    model = two_adapters(saved_tiny, use_dora=True)
    calls = []

    def counted(forward):
        return lambda self, layer, x, base: calls.append(x.shape[0]) or forward(self, layer, x, base)
    for kind in (LoRAAdapter, DoRAAdapter):
        monkeypatch.setattr(kind, "forward", counted(kind.forward))
    names = ["other", "default", "other", "other"]
    with torch.no_grad():
        mixed = model(IDS, attention_mask=MASK, adapter_names=names)
    # q_proj holds both adapters, v_proj default's, o_proj other's: 2 layers x (1 + 1 + 1 + 1) calls,
    # each with all the rows of its adapter (3 for "other", 1 for "default"), never one per row
    assert sorted(calls) == sorted([1, 3, 1, 3] * 2)
    monkeypatch.undo()
    keep = MASK.bool()
    for row, name in enumerate(names):
        assert (mixed[row] - alone(model, name)[row])[keep[row]].abs().max() < 1e-5, (row, name)


def test_generation_with_mixed_adapters_equals_each_alone(saved_tiny):
    model = two_adapters(saved_tiny)
    prompts = [[5, 9, 13], [3, 8, 21, 60, 11], [7, 4], [12, 44, 2, 8]]
    names = ["default", "__base__", "other", "default"]
    mixed = generate_ids(model, prompts, [1], 0, max_new_tokens=8, adapter_names=names)
    for prompt, name, got in zip(prompts, names, mixed):
        if name == "__base__":
            with adapter_disabled(model):
                expected = generate_ids(model, [prompt], [1], 0, max_new_tokens=8)
        else:
            set_adapter(model, name)
            expected = generate_ids(model, [prompt], [1], 0, max_new_tokens=8)
            set_adapter(model, "default")
        assert got == expected[0], name
    assert len({tuple(m) for m in mixed}) > 1


def test_bad_adapter_names_are_named(saved_tiny):
    model = two_adapters(saved_tiny)
    with pytest.raises(ConfigError, match=r"adapter_names: no adapter 'thrid' on the model; it has default, other "
                                          r"\(and '__base__' for the base model alone\)"):
        model(IDS, adapter_names=["default", "thrid", "other", "other"])
    with pytest.raises(ConfigError, match=r"adapter_names gives 3 names, the batch has 4 rows: one name per row"):
        model(IDS, adapter_names=["default", "other", "other"])
    with pytest.raises(ConfigError, match=r"adapter_names must be a list of adapter names, one per row, got 'other'"):
        model(IDS, adapter_names="other")
    with pytest.raises(ConfigError, match=r"adapter_names must name one adapter per prompt \(2\)"):
        generate_ids(model, [[5, 9], [3]], [1], 0, max_new_tokens=2, adapter_names=["other"])
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()  # a refused call leaves no routing behind
    merge_lora(model)
    with pytest.raises(ConfigError, match=r"adapter_names on a merged model.*unmerge_lora\(model\) first"):
        model(IDS, adapter_names=NAMES)
