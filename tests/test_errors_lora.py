"""Bad LoRA settings, adapters and merges get the project's own error naming the module, key or folder
at fault, and leave the model and the files as they were (minilora/lora)."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import copy_model, lora_model, tiny_model_with_tokenizer
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora, merge_lora, remove_lora
from minilora.lora.peft_files import load_adapter, save_adapter

# ---------------------------------------------------------------------------------------------
# apply_lora: targets, rank, alpha, modules_to_save


def test_a_catastrophic_target_regex_is_refused_at_once(saved_tiny):
    """No hang: a regex that backtracks exponentially is refused before it runs."""
    with pytest.raises(ConfigError, match=r"LoRA target regex '\(\.\*\.\*\)\*x' repeats a repetition"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), "(.*.*)*x")
    assert apply_lora(load_model(saved_tiny["llama-gqa"][1]), r".*\.(q|v)_proj")  # a flat regex is fine


def test_a_target_regex_matching_no_module_says_a_regex_matches_the_whole_name(saved_tiny):
    with pytest.raises(ConfigError, match=r"LoRA target regex 'q_proj' matches no linear module \(a regex must match "
                                          r"the whole name, as '\.\*q_proj'"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), "q_proj")


def test_a_lora_rank_above_the_layer_size_is_refused_naming_the_layer(saved_tiny):
    with pytest.raises(ConfigError, match=r"q_proj: LoRA rank r=1000000000000 is above min\(d, k\) = 32 of this layer"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=10 ** 12)


def test_a_non_finite_lora_alpha_is_refused(saved_tiny):
    with pytest.raises(ConfigError, match=r"LoRA alpha must be a positive finite number, got alpha=inf"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], alpha=float("inf"))


def test_lora_on_a_model_already_carrying_lora_is_refused(saved_tiny):
    model = load_model(saved_tiny["llama-gqa"][1])
    with pytest.raises(ConfigError, match="the model already carries LoRA layers"):
        apply_lora(apply_lora(model, "all-linear", r=2), "all-linear", r=2)


@pytest.mark.parametrize("load_in_8bit, entry", [
    pytest.param(False, "q_proj", id="adapted-by-lora"),
    pytest.param(True, "o_proj", id="quantized"),
])
def test_a_modules_to_save_entry_adapted_by_lora_or_quantized_is_refused(saved_tiny, load_in_8bit, entry):
    with pytest.raises(ConfigError, match=rf"modules_to_save entry '{entry}': .*{entry} is adapted by LoRA or quantized"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1], load_in_8bit=load_in_8bit), ["q_proj"], r=2,
                   modules_to_save=[entry])


# ---------------------------------------------------------------------------------------------
# Merging and removing

def test_merging_a_lora_layer_whose_weight_is_tied_is_refused(saved_tiny):
    gpt2 = apply_lora(load_model(saved_tiny["gpt2"][1]), ["lm_head"], r=2)  # GPT-2's head is the token embedding
    with pytest.raises(ConfigError, match=r"a LoRA layer's weight is tied \(transformer\.wte, lm_head\): merging it"):
        merge_lora(gpt2)


def test_removing_a_merged_adapter_without_merging_gives_back_the_base_weight(saved_tiny):
    model = load_model(saved_tiny["llama-gqa"][1])
    base = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(model, ["q_proj"], r=2)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)
    merge_lora(model)
    remove_lora(model, merge=False)  # the base layer as it was, although the adapter had been merged
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, base, atol=1e-6)


def model_and_adapter(saved_tiny, tmp_path):
    """The tiny Llama's folder (a tokenizer and a notes.txt of the user's beside its weights) and an adapter for it."""
    model_dir = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (model_dir / "notes.txt").write_text("mine")
    save_adapter(apply_lora(load_model(model_dir), ["q_proj"], r=2), tmp_path / "adapter")
    return model_dir, tmp_path / "adapter"


@pytest.mark.parametrize("into", [pytest.param("adapter", id="into-the-adapter"),
                                  pytest.param("model", id="into-the-base-models-folder")])
def test_merge_never_replaces_a_folder_holding_other_work(saved_tiny, tmp_path, capsys, into):
    from minilora.cli import main
    model_dir, adapter = model_and_adapter(saved_tiny, tmp_path)
    before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (model_dir, adapter)}
    out = adapter if into == "adapter" else model_dir
    assert main(["merge", str(model_dir), str(adapter), str(out)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (model_dir, adapter)} == before


def test_merge_writes_a_new_folder_and_replaces_its_own_output_when_asked(saved_tiny, tmp_path):
    from minilora.cli import main
    model_dir, adapter = model_and_adapter(saved_tiny, tmp_path)
    assert main(["merge", str(model_dir), str(adapter), str(tmp_path / "merged")]) == 0
    assert main(["merge", str(model_dir), str(adapter), str(tmp_path / "merged"), "--overwrite"]) == 0


def test_a_merged_classifier_keeps_the_adapters_label_names(saved_tiny, tmp_path):
    from minilora.cli import main
    bert = copy_model(saved_tiny, tmp_path, "bert")
    shutil.copy(tiny_model_with_tokenizer(saved_tiny, tmp_path) / "tokenizer.json", bert / "tokenizer.json")
    classifier = apply_lora(load_model(bert, id2label={0: "spam", 1: "ham", 2: "eggs"}), ["query"], r=2,
                            modules_to_save=["classifier"])
    save_adapter(classifier, tmp_path / "cls")
    assert main(["merge", str(bert), str(tmp_path / "cls"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"] == {"0": "spam", "1": "ham", "2": "eggs"}


# ---------------------------------------------------------------------------------------------
# Saving an adapter

def test_save_adapter_never_replaces_a_folder_holding_other_work(saved_tiny, tmp_path):
    model_dir, _ = model_and_adapter(saved_tiny, tmp_path)
    with pytest.raises(CheckpointError, match=r"tiny holds other files \(config\.json, .*notes\.txt.*saving an adapter"):
        save_adapter(apply_lora(load_model(model_dir), ["q_proj"], r=2), model_dir)
    assert (model_dir / "notes.txt").read_text() == "mine" and (model_dir / "model.safetensors").exists()


def test_save_adapter_into_a_folder_that_cannot_be_created_is_named(saved_tiny, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"file: cannot create this folder"):
        save_adapter(lora_model(saved_tiny), tmp_path / "file" / "adapter")


def test_extra_metadata_may_not_replace_minilora_json_own_keys(saved_tiny, tmp_path):
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2)
    with pytest.raises(ConfigError, match=r"extra: 'base_model' is minilora\.json's own key"):
        save_adapter(model, tmp_path / "a", extra={"base_model": "mine"})


def test_extra_metadata_that_is_not_json_data_is_refused(saved_tiny, tmp_path):
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2)
    with pytest.raises(ConfigError, match=r"extra: not JSON data"):
        save_adapter(model, tmp_path / "a", extra={"when": object()})


# ---------------------------------------------------------------------------------------------
# Loading an adapter

@pytest.mark.parametrize("damage, message", [
    pytest.param("rslora", r"use_rslora must be true or false, got 'false'", id="use-rslora-text"),
    pytest.param("norm", r"keys that match no module: base_model\.model\.model\.norm\.weight", id="key-matching-no-module"),
    pytest.param("meta_base", r"minilora\.json: base_model is 'llama', expected an object of config values",
                 id="base-model-not-an-object"),
    pytest.param("meta_labels", r"minilora\.json: id2label is \['a', 'b'\], expected an object of class id -> name",
                 id="id2label-a-list"),
    pytest.param("bin_list", r"adapter_model\.bin: expected a dict of named tensors, found list", id="bin-holding-a-list"),
    pytest.param("modules_to_save", r"modules_to_save must be a list of module names, got 'lm_head'",
                 id="modules-to-save-text"),
])
def test_odd_adapter_folders_are_refused_leaving_the_model_unchanged(saved_tiny, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file
    folder = saved_tiny["llama-gqa"][1]
    adapter = save_adapter(apply_lora(load_model(folder), ["q_proj"], r=2), tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if damage in ("rslora", "modules_to_save"):
        config.update({"use_rslora": "false"} if damage == "rslora" else {"modules_to_save": "lm_head"})
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    elif damage == "norm":  # a tensor for a module that neither has LoRA nor is in modules_to_save
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        tensors["base_model.model.model.norm.weight"] = torch.zeros(32)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    elif damage.startswith("meta"):
        meta = json.loads((adapter / "minilora.json").read_text())
        meta.update({"base_model": "llama"} if damage == "meta_base" else {"id2label": ["a", "b"]})
        (adapter / "minilora.json").write_text(json.dumps(meta))
    else:
        (adapter / "adapter_model.safetensors").unlink()
        torch.save([torch.zeros(2)], adapter / "adapter_model.bin")
    model = load_model(folder)
    before = model.model.norm.weight.detach().clone()
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, adapter)
    assert torch.equal(model.model.norm.weight, before)


def test_an_adapter_tensor_holding_infinity_is_refused_by_name(saved_tiny, tmp_path):
    import re

    from safetensors.torch import load_file, save_file
    save_adapter(apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors: tensor {re.escape(key)} holds NaN or infinite"):
        load_adapter(load_model(saved_tiny["llama-gqa"][1]), tmp_path / "a")


def test_load_adapter_never_mixes_scalings(saved_tiny, tmp_path):
    """Same shapes, other alpha: loading it onto LoRA layers of alpha 8 would scale its B·A wrongly."""
    folder = saved_tiny["llama-gqa"][1]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4, alpha=32), tmp_path / "a")
    model = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8)
    with pytest.raises(CheckpointError, match=r"a: the adapter's LoRA settings for \S+ \(r=4, alpha=32, .*\) differ from those "
                                              r"of the LoRA layer already there \(r=4, alpha=8"):
        load_adapter(model, tmp_path / "a")
    loaded = load_adapter(load_model(folder), tmp_path / "a")  # onto the base model: its own settings
    assert {m.scaling for m in loaded.modules() if hasattr(m, "scaling")} == {32 / 4}


def test_a_regex_in_an_adapter_file_is_never_run(saved_tiny, tmp_path):
    """PEFT writes target_modules as a regex when given one; a crafted one backtracks for ages on module
    names. The adapter's tensor keys name every adapted module: LoRA goes exactly there, the regex unrun."""
    folder = saved_tiny["llama-gqa"][1]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_modules"] = "(.*)*Z"  # exponential backtracking on a 30-character module name
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    code = textwrap.dedent(f"""
        from minilora.lora.peft_files import load_adapter
        from minilora.lora.inject import lora_modules
        from minilora.loading.weights import load_model
        model = load_adapter(load_model({str(folder)!r}), {str(tmp_path / "a")!r})
        print(sorted(n for n, _ in lora_modules(model)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([f"model.layers.{i}.self_attn.q_proj" for i in range(2)])
