"""A trained PiSSA/OLoRA adapter saved as a plain LoRA of rank 2r on the original base
(save_adapter(..., path_initial_model_for_weight_conversion=...)), against peft 0.21's own conversion on
the tiny random Llama: the same tensors and config fields, and the same outputs either way (ours in peft
and in minilora, peft's in minilora) on the untouched base; the converted adapter merges and exports to
GGUF; bad initial folders get named errors and leave what was saved as it was."""

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import assert_gguf_lora_applies
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_model
from minilora.lora.adapters import add_adapter
from minilora.lora.config import LoRAConfig
from minilora.lora.inject import apply_lora, merge_lora
from minilora.lora.peft_files import load_adapter, save_adapter
from safetensors.torch import load_file, save_file
from test_lora_init import IDS, nudge, peft_lora

TOL = 1e-4
FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora")
PATTERNS = {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"v_proj": 3}}


def trained_pissa(folder, tmp_path, init="pissa", targets="all-linear", **settings):
    """Our model with a PiSSA/OLoRA adapter, its start saved in tmp_path/init, then nudged as training would."""
    model = apply_lora(load_model(folder), targets, r=4, alpha=8, init_lora_weights=init, **settings)
    save_adapter(model, tmp_path / "init")
    nudge(model)
    return model


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def config_of(folder):
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("init,settings", [("pissa", {}), ("olora", {}), ("pissa", {"use_rslora": True}),
                                           ("pissa", PATTERNS)], ids=["pissa", "olora", "rslora", "patterns"])
def test_the_converted_adapter_is_peft_s_and_gives_the_trained_model_on_the_original_base(saved_tiny, tmp_path,
                                                                                         init, settings):
    from peft import PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    ours = trained_pissa(folder, tmp_path, init, **settings)
    before, start = {k: v.clone() for k, v in ours.state_dict().items()}, files(tmp_path / "init")
    with torch.no_grad():
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # the model is not changed
    assert files(tmp_path / "init") == start  # nor the initial folder (PEFT's rewrites its config)
    in_peft = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "plain").eval()
    here = load_adapter(load_model(folder), tmp_path / "plain")
    with torch.no_grad():
        assert (in_peft(IDS).logits - trained).abs().max() < TOL
        assert (here(IDS) - trained).abs().max() < TOL
        assert (hf(IDS).logits - trained).abs().max() > 1e-2  # the adapter does change the base

    theirs = peft_lora(hf, init_lora_weights=init, **settings)
    theirs.save_pretrained(tmp_path / "peft_init")
    nudge(theirs)
    save_adapter(ours, tmp_path / "from_peft_init", path_initial_model_for_weight_conversion=tmp_path / "peft_init")
    theirs.save_pretrained(tmp_path / "peft_plain", path_initial_model_for_weight_conversion=tmp_path / "peft_init")
    mine, peft_made = load_file(tmp_path / "plain" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft_plain" / "adapter_model.safetensors")
    assert set(mine) == set(peft_made) and len(mine) == 2 * 14
    for key, t in peft_made.items():
        assert t.shape == mine[key].shape and t.shape[0 if ".lora_A." in key else 1] in (4, 8)
        assert (mine[key] - t).abs().max() < 1e-5, key
    assert {k: config_of(tmp_path / "plain")[k] for k in FIELDS} == {k: config_of(tmp_path / "peft_plain")[k]
                                                                     for k in FIELDS}
    assert config_of(tmp_path / "plain")["r"] == 8 and config_of(tmp_path / "plain")["init_lora_weights"] is True
    from_peft_init = load_file(tmp_path / "from_peft_init" / "adapter_model.safetensors")
    assert all((from_peft_init[k] - mine[k]).abs().max() < 1e-5 for k in mine)  # PEFT's initial folder reads too
    with torch.no_grad():
        expected = theirs(IDS).logits
        assert (load_adapter(load_model(folder), tmp_path / "peft_plain")(IDS) - expected).abs().max() < TOL


def test_rslora_with_patterns_converts_here_where_peft_refuses(saved_tiny, tmp_path):
    """PEFT doubles alpha_pattern under rsLoRA too (a scale off by √2), so it refuses; here alpha_pattern
    grows by √2 as lora_alpha does, and peft itself loads the result with the trained outputs."""
    from peft import PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    ours = trained_pissa(folder, tmp_path, use_rslora=True, **PATTERNS)
    with torch.no_grad():
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = config_of(tmp_path / "plain")
    assert (config["r"], config["rank_pattern"]) == (8, {"o_proj": 4})
    assert config["lora_alpha"] == 8 * math.sqrt(2) and config["alpha_pattern"] == {"v_proj": 3 * math.sqrt(2)}
    with torch.no_grad():
        assert (PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "plain")(IDS).logits - trained).abs().max() < TOL
        assert (load_adapter(load_model(folder), tmp_path / "plain")(IDS) - trained).abs().max() < TOL
    theirs = peft_lora(hf, init_lora_weights="pissa", use_rslora=True, **PATTERNS)
    theirs.save_pretrained(tmp_path / "peft_init")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        theirs.save_pretrained(tmp_path / "peft_plain", path_initial_model_for_weight_conversion=tmp_path / "peft_init")


def test_a_randomized_pissa_adapter_converts_and_then_loads_on_the_original_base(saved_tiny, tmp_path):
    """pissa_niter_K's start cannot be rebuilt (load_adapter refuses the adapter as trained), but its
    tensors were saved: converted, it loads in either library."""
    from peft import PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    ours = trained_pissa(folder, tmp_path, "pissa_niter_4")
    with torch.no_grad():
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert config_of(tmp_path / "plain")["init_lora_weights"] is True
    with torch.no_grad():
        assert (PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "plain")(IDS).logits - trained).abs().max() < TOL
        assert (load_adapter(load_model(folder), tmp_path / "plain")(IDS) - trained).abs().max() < TOL


def test_embedding_adapters_and_modules_to_save_travel_unchanged(saved_tiny, tmp_path):
    """PiSSA leaves an embedding's adapter and the modules trained in full relative to W: padded with
    zeros to rank 2r, kept as they are (peft's conversion leaves both out of its file)."""
    from peft import PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    ours = trained_pissa(folder, tmp_path, targets=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # what nudge leaves alone: the embedding's A (zero at the start), the head
        for n, p in ours.named_parameters():
            if "lora_embedding_A" in n or n == "lm_head.weight":
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    tensors = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    assert a.shape == (8, 97) and not a[4:].any() and a[:4].any()
    assert torch.equal(tensors["base_model.model.lm_head.weight"], ours.lm_head.weight)
    with torch.no_grad():
        assert (PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "plain")(IDS).logits - trained).abs().max() < TOL
        assert (load_adapter(load_model(folder), tmp_path / "plain")(IDS) - trained).abs().max() < TOL


def test_the_converted_adapter_merges_and_exports_to_gguf(saved_tiny, tmp_path):
    """On the original base the converted adapter merges to the trained model, and llama.cpp's adapter
    file (refused for the PiSSA adapter itself) applied as W + alpha/r · B A to the original base's file
    gives the trained model's merged weights."""
    gguf = pytest.importorskip("gguf")
    from minilora.ship.gguf_export import export_adapter, export_merged
    _, folder = saved_tiny["llama-gqa"]
    ours = trained_pissa(folder, tmp_path, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    with torch.no_grad():
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    plain = load_adapter(load_model(folder), tmp_path / "plain")
    path = export_adapter(plain, tmp_path / "a.gguf")
    assert path.is_file()
    merged = export_merged(ours, tmp_path / "merged.gguf", "f32")
    base = export_merged(load_model(folder), tmp_path / "base.gguf", "f32")
    lora = assert_gguf_lora_applies(gguf.GGUFReader(str(path)), base, merged, atol=1e-5)
    assert len(lora) == 2 * 2 * 5 and all(v.shape[0] == 8 for k, v in lora.items() if k.endswith(".lora_a"))
    merge_lora(plain)
    with torch.no_grad():
        assert (plain(IDS) - trained).abs().max() < TOL


def test_conversion_errors_name_what_does_not_fit_and_keep_what_was_saved(saved_tiny, tmp_path):
    _, folder = saved_tiny["llama-gqa"]
    model = trained_pissa(folder, tmp_path)
    out = tmp_path / "out"
    save_adapter(model, out)
    saved = files(out)

    def refused(error, pattern, initial, trained=model):
        with pytest.raises(error, match=pattern):
            save_adapter(trained, out, path_initial_model_for_weight_conversion=initial)
        assert files(out) == saved

    def start(name, targets="all-linear", base=folder, **settings):
        save_adapter(apply_lora(load_model(base), targets, **{"r": 4, "alpha": 8, "init_lora_weights": "pissa",
                                                              **settings}), tmp_path / name)
        return tmp_path / name

    refused(CheckpointError, r"nowhere: path_initial_model_for_weight_conversion is no such folder: give the folder "
                             r"save_adapter wrote right after apply_lora", tmp_path / "nowhere")
    refused(CheckpointError, r"llama-gqa: path_initial_model_for_weight_conversion is not an adapter folder \(no "
                             r"adapter_config.json\)", folder)
    refused(CheckpointError, r"plain/adapter_config.json: init_lora_weights is True, not the start of a PiSSA/OLoRA "
                             r"adapter.*PEFT's own conversion rewrites it", start("plain", init_lora_weights=True))
    refused(CheckpointError, r"olora/adapter_config.json: init_lora_weights is 'olora' where the trained adapter's is "
                             r"'pissa': not the start of this adapter", start("olora", init_lora_weights="olora"))
    refused(CheckpointError, r"r2/adapter_config.json: r is 2 where the trained adapter's is 4", start("r2", r=2))
    refused(CheckpointError, r"alpha_pattern is \{'v_proj': 3\} where the trained adapter's is \{\}",
            start("pattern", alpha_pattern={"v_proj": 3}))
    refused(CheckpointError, r"qv/adapter_config.json: only the trained adapter has LoRA on "
                             r"model.layers.0.mlp.down_proj: the two adapters target different modules",
            start("qv", ["q_proj", "v_proj"]))
    refused(CheckpointError, r"init/adapter_config.json: only the initial adapter has LoRA on "
                             r"model.layers.0.mlp.down_proj", tmp_path / "init",
            trained=apply_lora(load_model(folder), ["q_proj", "v_proj"], r=4, alpha=8, init_lora_weights="pissa"))
    shutil.copytree(tmp_path / "init", tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(3, 32)
    save_file(tensors, weights)
    refused(CheckpointError, r"cut/adapter_config.json: model.layers.1.self_attn.k_proj.lora_A.weight is \(3, 32\) "
                             r"in the initial adapter, \(4, 32\) in the trained one", tmp_path / "cut")
    refused(CheckpointError, r"other_base: adapter was trained on another base model \(model_type: adapter 'qwen2' "
                             r"vs model 'llama'", start("other_base", base=saved_tiny["qwen2"][1]))
    refused(ConfigError, r"converts a PiSSA/OLoRA adapter .*; this one's init_lora_weights is True: a LoRA on the "
                         r"original base already, nothing to convert", tmp_path / "init",
            trained=apply_lora(load_model(folder), "all-linear", r=4, alpha=8))
    two = trained_pissa(folder, tmp_path / "two")
    add_adapter(two, "other", LoRAConfig(["q_proj"], r=2, alpha=4))
    refused(ConfigError, r"converts a model's one adapter; this one has default, other", tmp_path / "init", two)
    initial = files(tmp_path / "init")
    with pytest.raises(ConfigError, match=r"init: the converted adapter would replace the initial one it is made from"):
        save_adapter(model, tmp_path / "init", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert files(tmp_path / "init") == initial
