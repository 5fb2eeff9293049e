"""Adapters in PEFT's format, with peft itself as the oracle, both ways; merging into a full model that
transformers loads."""

import copy
import json

import pytest
import torch
from minilora.errors import CheckpointError
from minilora.loading.weights import load_model, save_model
from minilora.lora.inject import apply_lora, remove_lora
from minilora.lora.peft_files import load_adapter, save_adapter

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])

CASES = {"gpt2": (["c_attn"], []), "llama-gqa": (["q_proj", "v_proj"], ["lm_head"])}


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def close(a, b, mask=MASK):
    return (a - b)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(CASES))
def test_adapter_saved_here_loads_in_peft(saved_tiny, tmp_path, kind):
    from peft import PeftModel
    hf, folder = saved_tiny[kind]
    targets, to_save = CASES[kind]
    ours = apply_lora(load_model(folder), targets, r=4, alpha=8, modules_to_save=to_save)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        expected = ours(IDS, attention_mask=MASK)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=IDS, attention_mask=MASK).logits
    assert close(got, expected)


@pytest.mark.parametrize("kind", list(CASES))
def test_adapter_saved_by_peft_loads_here(saved_tiny, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny[kind]
    targets, to_save = CASES[kind]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               modules_to_save=to_save or None, lora_dropout=0.1))
    randomize_lora(peft_model, seed=1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model(input_ids=IDS, attention_mask=MASK).logits
    ours = load_adapter(load_model(folder), tmp_path / "peft")
    with torch.no_grad():
        assert close(ours(IDS, attention_mask=MASK), expected)


def test_adapter_files_are_small_and_named_as_peft_names_them(saved_tiny, tmp_path):
    from safetensors import safe_open
    _, folder = saved_tiny["llama-gqa"]
    model = apply_lora(load_model(folder), ["q_proj", "v_proj"], r=4, alpha=8, modules_to_save=["lm_head"])
    save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys  # modules_to_save travel with the adapter
    assert len(keys) == 2 * 2 * 2 + 1
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["modules_to_save"] == ["lm_head"]


def test_saving_refuses_a_model_without_lora(saved_tiny, tmp_path):
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(CheckpointError, match="no LoRA layers"):
        save_adapter(load_model(folder), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_for_another_base_model_is_refused(saved_tiny, tmp_path):
    _, llama = saved_tiny["llama-gqa"]
    _, qwen = saved_tiny["qwen2"]
    save_adapter(apply_lora(load_model(llama), ["q_proj", "v_proj"], r=4), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"trained on another base model \(model_type: adapter 'llama' vs model 'qwen2'"):
        load_adapter(load_model(qwen), tmp_path / "a")
    # without the fingerprint (as from PEFT), the shapes still catch a different base
    (tmp_path / "a" / "minilora.json").unlink()
    _, gpt2 = saved_tiny["gpt2"]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(load_model(gpt2), tmp_path / "a")


def test_adapter_of_another_rank_names_the_shapes(saved_tiny, tmp_path):
    _, folder = saved_tiny["llama-gqa"]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4), tmp_path / "a")
    model = apply_lora(load_model(folder), ["q_proj"], r=8)
    before = model.model.layers[0].self_attn.q_proj.lora_A.weight.clone()
    with pytest.raises(CheckpointError, match=r"the adapter's LoRA settings for model.layers.0.self_attn.q_proj "
                                              r"\(r=4, alpha=16, use_rslora=False, dropout=0.0, use_dora=False\) "
                                              r"differ from those of the LoRA layer already there \(r=8, alpha=16"):
        load_adapter(model, tmp_path / "a")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, before)  # untouched


def test_unmatched_adapter_key_fails(saved_tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    _, folder = saved_tiny["llama-gqa"]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4), tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {k.replace("self_attn", "attention"): v for k, v in load_file(str(file)).items()}
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match="keys that match no module: base_model.model.model.layers.0.attention"):
        load_adapter(load_model(folder), tmp_path / "a")


def test_corrupt_adapter_file(saved_tiny, tmp_path):
    _, folder = saved_tiny["llama-gqa"]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4), tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(load_model(folder), tmp_path / "a")


@pytest.mark.parametrize("kind", ["gpt2", "llama-tied"])
def test_merged_model_equals_adapter_model_and_loads_in_transformers(saved_tiny, tmp_path, kind):
    import transformers
    _, folder = saved_tiny[kind]
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=8)
    randomize_lora(model)
    with torch.no_grad():
        expected = model(IDS, attention_mask=MASK)
    remove_lora(model, merge=True)
    with torch.no_grad():
        assert close(model(IDS, attention_mask=MASK), expected)
    save_model(model, tmp_path / "merged")
    again = load_model(tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert close(again(IDS, attention_mask=MASK), expected)
        assert close(hf(input_ids=IDS, attention_mask=MASK).logits, expected)


def test_merge_cli_on_real_smollm2_gguf(smollm2_path, tmp_path, saved_tiny):
    """minilora merge on the GGUF model: the merged folder (config, safetensors, tokenizer) loads in
    transformers and gives the adapted logits."""
    import transformers
    from minilora.cli import main
    from minilora.loading.tokenizer import load_tokenizer
    model = apply_lora(load_model(smollm2_path), ["q_proj", "v_proj"], r=2, alpha=4)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    tok = load_tokenizer(smollm2_path)
    ids = torch.tensor([tok.encode("Quote by Mark Twain:")])
    with torch.no_grad():
        expected = model(ids)
    assert main(["merge", str(smollm2_path), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4  # 30 layers of fp32 rounding
    assert load_tokenizer(tmp_path / "merged").encode("Quote by Mark Twain:") == ids[0].tolist()


def test_a_second_all_linear_adapter_goes_beside_the_first_not_into_its_parts(saved_tiny):
    """all-linear (or any regex) on a model that already has LoRA layers selects the model's own linear
    layers again, never the LoRA layers' parts (each adapter's A and B are linear layers too): the second
    adapter sits beside the first, in the same modules, as PEFT's add_adapter puts it."""
    from minilora.lora.adapters import add_adapter
    from minilora.lora.config import LoRAConfig, lora_state
    from minilora.lora.inject import lora_modules
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), "all-linear", r=4)
    first = [n for n, _ in lora_modules(model)]
    add_adapter(model, "second", lora_state(model).adapters["default"])
    assert [n for n, _ in lora_modules(model)] == first
    assert all(set(m.adapters) == {"default", "second"} for _, m in lora_modules(model))
    assert not [n for n in model.state_dict() if n.count(".adapters.") > 1]
    add_adapter(model, "third", LoRAConfig(targets=r".*(q|v)_proj", r=2))
    assert not [n for n in model.state_dict() if n.count(".adapters.") > 1]
