"""Qwen3 (dense), Gemma 2 and Gemma 3's text model against transformers (the oracle), fp32, on tiny
random configs chosen here: several sizes, grouped-query and multi-query attention, windows shorter
than the sequence, padding on either side, the KV cache, greedy generation; PEFT adapters both ways;
the configs refused by name."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from minilora.errors import ConfigError
from minilora.generate import generate_ids
from minilora.loading.weights import load_model, save_model
from minilora.lora.inject import apply_lora, remove_lora
from minilora.lora.peft_files import load_adapter, save_adapter
from minilora.models import KVCache, build_model
from test_peft_parity import randomize

TOL = 1e-5
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48)

# kind -> (model_type, the transformers config's arguments, written as the Hub's config.json files write them)
CONFIGS = {
    # head_dim 16 is not hidden / heads = 8; windows from layer 1 on (max_window_layers), 4 < the 11 tokens
    "qwen3-gqa-window": ("qwen3", dict(SMALL, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                       rope_theta=5e4)),
    "qwen3-mqa-tied": ("qwen3", dict(SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                     head_dim=8, tie_word_embeddings=True, attention_bias=True)),
    "qwen3-layer-types": ("qwen3", dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                        use_sliding_window=True, sliding_window=3,
                                        layer_types=["sliding_attention", "full_attention"])),
    # every second layer global; the global layers' RoPE linearly scaled, the local ones' on their own base
    "gemma3-gqa": ("gemma3_text", dict(SMALL, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, sliding_window=4, sliding_window_pattern=2, rope_theta=1e4,
                                       rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                       query_pre_attn_scalar=12)),
    "gemma3-mqa-capped": ("gemma3_text", dict(vocab_size=97, hidden_size=24, intermediate_size=40,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=8, sliding_window=3, attn_logit_softcapping=5.0,
                                              final_logit_softcapping=3.0, tie_word_embeddings=False)),
    "gemma2-gqa": ("gemma2", dict(SMALL, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, sliding_window=4, attn_logit_softcapping=4.0,
                                  final_logit_softcapping=5.0, query_pre_attn_scalar=16)),
    "gemma2-mqa": ("gemma2", dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=12, sliding_window=5)),
}
FAMILIES = {"qwen3": "qwen3-gqa-window", "gemma3": "gemma3-gqa", "gemma2": "gemma2-gqa"}


def hf_model(kind, seed=0):
    """transformers' model for one of CONFIGS, random not-small weights everywhere, eager attention."""
    import transformers
    model_type, args = CONFIGS[kind]
    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**copy.deepcopy(args), attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (transformers model, its save_pretrained folder)}"""
    root = tmp_path_factory.mktemp("new_families")
    out = {}
    for kind in CONFIGS:
        model = hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


def batch(seed=0, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0   # right padding
    mask[2, 4:] = 0
    return ids, mask


def error(a, b, keep=None):
    return ((a - b) if keep is None else (a - b)[keep]).abs().max().item()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_equal_transformers_with_right_padding(saved, kind):
    hf, folder = saved[kind]
    ours = load_model(folder)
    ids, mask = batch()
    with torch.no_grad():
        assert error(ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, mask.bool()) <= TOL
        assert error(ours(ids), hf(input_ids=ids).logits) <= TOL  # no mask: SDPA's causal fast path


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_left_padding_gives_the_unpadded_logits(saved, kind):
    hf, folder = saved[kind]
    ours = load_model(folder)
    ids, _ = batch(1)
    padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers given the same positions agrees as well
        assert error(hf(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 4:], expected) <= TOL
        assert error(ours(padded, attention_mask=mask)[:, 4:], expected) <= TOL


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_incremental_decoding_equals_the_full_forward(saved, kind):
    """Five tokens at once, then one at a time through the KV cache (past the window): every position's
    logits equal the full forward's, ours and transformers', left padding included."""
    hf, folder = saved[kind]
    ours = load_model(folder)
    ids, _ = batch(2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache()
        steps = [ours(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]
        steps += [ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(5, 12)]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert len(cache) == 12
    assert error(torch.cat(steps, dim=1), full, mask.bool()) <= TOL
    assert error(full, expected, mask.bool()) <= TOL


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_generation_equals_transformers_generate(saved, kind):
    hf, folder = saved[kind]
    ours = load_model(folder)
    prompt, eos = [5, 6, 7, 8, 9], hf.generation_config.eos_token_id  # Gemma's is 1, Qwen3's none
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    eos_ids = [] if eos is None else [eos]
    assert generate_ids(ours, [prompt], eos_ids=eos_ids, pad_id=0, max_new_tokens=10) == \
        [expected[:-1] if expected[-1:] == eos_ids else expected]  # transformers keeps the EOS, minilora not
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6]]  # a batch: each row as it comes alone
    together = generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=8)
    assert together == generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=8, use_cache=False)
    assert together == [generate_ids(ours, [p], eos_ids=[], pad_id=0, max_new_tokens=8)[0] for p in prompts]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_hub_style_config_json_reads_as_transformers_reads_it(saved, kind, tmp_path):
    """transformers 5 writes layer_types and rope_parameters out; the Hub's files say rope_theta,
    rope_scaling, rope_local_base_freq, sliding_window_pattern and leave the layer types to defaults."""
    hf, folder = saved[kind]
    shutil.copytree(folder, tmp_path / kind)
    model_type, args = CONFIGS[kind]
    (tmp_path / kind / "config.json").write_text(json.dumps({"model_type": model_type, **args}))
    ours = load_model(tmp_path / kind)
    ids, mask = batch()
    with torch.no_grad():
        assert error(ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, mask.bool()) <= TOL


def test_the_layer_types_and_ropes_are_transformers(saved):
    for kind, (hf, folder) in saved.items():
        ours = load_model(folder)
        assert ours.config.windows == [a.sliding_window for a in (layer.self_attn for layer in hf.model.layers)], kind
    gemma3 = load_model(saved["gemma3-gqa"][1]).config
    assert gemma3.kinds == ["sliding_attention", "full_attention", "sliding_attention"]
    assert {k: (r["rope_theta"], r["rope_type"]) for k, (_, r) in gemma3.ropes.items()} == {
        "full_attention": (1e4, "linear"), "sliding_attention": (100.0, "default")}


@pytest.mark.parametrize("kind", ["gemma3-gqa", "gemma2-mqa"])
def test_bf16_embeddings_are_scaled_as_transformers_scales_them(saved, kind):
    """sqrt(hidden_size) is rounded to the weights' dtype before the product (in bf16 sqrt(24) = 4.9062,
    not 4.8990): the first block's input is transformers' bit for bit."""
    import warnings
    hf, folder = saved[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 may be slow on this CPU: no matter here
        ours = load_model(folder, dtype=torch.bfloat16)
    hf = copy.deepcopy(hf).to(torch.bfloat16)
    seen = []
    for model in (ours, hf):
        hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        hook.remove()
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], seen[1])


def test_gemma3_with_its_text_config_nested_loads_the_text_model(saved, tmp_path):
    """model_type gemma3 (the multimodal layout) without a vision tower: the text_config is the model,
    under transformers 5's tensor names (model.language_model.*) or the older ones (language_model.model.*)."""
    from safetensors.torch import load_file, save_file
    hf, folder = saved["gemma3-mqa-capped"]
    text = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    ids, mask = batch()
    for prefix, head in (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head.")):
        (tmp_path / prefix).mkdir()
        save_file({(prefix + k[6:] if k.startswith("model.") else head + k[8:]): v for k, v in state.items()},
                  str(tmp_path / prefix / "model.safetensors"))
        (tmp_path / prefix / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
        ours = load_model(tmp_path / prefix)
        assert ours.fingerprint()["model_type"] == "gemma3"
        with torch.no_grad():
            assert error(ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, mask.bool()) <= TOL


@pytest.mark.parametrize("kind", ["qwen3-mqa-tied", "gemma3-gqa", "gemma2-gqa"])
def test_every_new_family_keeps_the_model_contract(kind, monkeypatch):
    """tests/test_models.py's contract check, run on these configs."""
    import test_models
    model_type, args = CONFIGS[kind]
    monkeypatch.setitem(test_models.TINY, kind, {"model_type": model_type, **args})
    test_models.test_every_family_keeps_the_model_contract(kind, None)


# --- PEFT: an adapter on each family loads both ways with the same logits -----------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"qwen3": ("qwen3-mqa-tied", TARGETS),
            "gemma3-embedding": ("gemma3-gqa", [*TARGETS, "embed_tokens"]),  # the LoRA delta scaled by sqrt(d) too
            "gemma3-capped": ("gemma3-mqa-capped", ["q_proj", "v_proj", "down_proj"]),
            "gemma2": ("gemma2-gqa", TARGETS)}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_adapter_loads_here_with_peft_logits(saved, tmp_path, name):
    from peft import LoraConfig, get_peft_model
    kind, targets = ADAPTERS[name]
    hf, folder = saved[kind]
    theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs, seed=1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(folder), tmp_path / "peft")
    ids, mask = batch()
    with torch.no_grad():
        assert error(ours(ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask).logits,
                     mask.bool()) <= TOL


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_saved_here_loads_in_peft_with_our_logits(saved, tmp_path, name):
    from peft import PeftModel
    kind, targets = ADAPTERS[name]
    hf, folder = saved[kind]
    ours = apply_lora(load_model(folder), targets, r=4, alpha=8)
    randomize(ours, seed=2)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    ids, mask = batch()
    with torch.no_grad():
        assert error(theirs(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask),
                     mask.bool()) <= TOL


@pytest.mark.parametrize("kind", ["gemma2-gqa", "qwen3-mqa-tied"])
def test_merged_model_saves_and_loads_in_transformers(saved, tmp_path, kind):
    import transformers
    _, folder = saved[kind]
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=8)
    randomize(model, seed=3)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
    remove_lora(model, merge=True)
    save_model(model, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert error(load_model(tmp_path / "merged")(ids, attention_mask=mask), expected, mask.bool()) <= TOL
        assert error(hf(input_ids=ids, attention_mask=mask).logits, expected, mask.bool()) <= TOL


@pytest.mark.parametrize("kind, fused", [("gemma2-gqa", False), ("gemma3-gqa", True)])
def test_training_loss_sees_the_soft_capped_logits(saved, kind, fused):
    """The fused head loss applies the bare head to hidden_states: for a model whose final logits are
    soft-capped (final_logit_softcap) it steps aside, and the loss is the cross-entropy of forward's
    capped logits."""
    from minilora.training.objectives.causal_lm import causal_lm_loss
    model = apply_lora(load_model(saved[kind][1]), ["q_proj"], r=2)
    assert (model.final_logit_softcap is None) == fused
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    loss, count = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        expected = F.cross_entropy(model(ids, attention_mask=mask).flatten(0, 1), shifted.flatten(), reduction="sum")
    assert count == int((shifted != -100).sum()) and abs(loss.item() - expected.item()) <= TOL * count


# --- refused by name --------------------------------------------------------------------------------

def text_config(kind="gemma3-gqa", **changes):
    model_type, args = CONFIGS[kind]
    return {"model_type": model_type, **copy.deepcopy(args), **changes}


@pytest.mark.parametrize("config, match", [
    pytest.param({"model_type": "gemma3", "text_config": text_config(), "vision_config": {"hidden_size": 16}},
                 r"vision_config is set: a Gemma 3 with a vision tower", id="gemma3-vision-tower"),
    pytest.param({"model_type": "gemma3", "vision_config": {"hidden_size": 16}}, r"vision_config", id="gemma3-vision-only"),
    pytest.param({"model_type": "gemma3"}, r"model_type gemma3 needs its text model's config as text_config",
                 id="gemma3-no-text-config"),
    pytest.param(text_config(model_type="qwen3_moe"), r"model_type 'qwen3_moe' is not supported: .*mixture-of-experts",
                 id="qwen3-moe"),
    pytest.param(text_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                 r"rope scaling type 'yarn' is not supported in rope_scaling", id="gemma3-yarn"),
    pytest.param(text_config(rope_scaling=None, rope_parameters={"full_attention": {"rope_type": "longrope"}}),
                 r"rope scaling type 'longrope' is not supported in rope_parameters.full_attention",
                 id="gemma3-rope-parameters-unknown"),
    pytest.param(text_config(rope_scaling={"rope_type": "linear"}), r"rope_scaling 'linear' needs factor",
                 id="gemma3-linear-without-factor"),
    pytest.param(text_config("gemma2-gqa", rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
                 r"rope scaling type 'dynamic' is not supported in rope_parameters ", id="gemma2-dynamic"),
    pytest.param(text_config("qwen3-mqa-tied", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                 r"rope scaling type 'yarn' is not supported in rope_scaling", id="qwen3-yarn"),
    pytest.param(text_config(use_bidirectional_attention=True), r"use_bidirectional_attention is true",
                 id="gemma3-bidirectional"),
    pytest.param(text_config("gemma2-gqa", sliding_window=None), r"sliding_window is null, but layers are sliding",
                 id="gemma2-no-window"),
    pytest.param(text_config("qwen3-mqa-tied", layer_types=["sliding_attention", "full_attention"]),
                 r"layer_types has sliding_attention layers, but use_sliding_window is false", id="qwen3-no-window"),
    pytest.param(text_config(layer_types=["full_attention"]), r"layer_types must list one of", id="gemma3-layer-types"),
])
def test_configs_refused_by_name(config, match):
    with pytest.raises(ConfigError, match=match), torch.device("meta"):
        build_model(config)


# --- all-linear, the parameter report, the memory report ---------------------------------------------

@pytest.mark.parametrize("kind", list(FAMILIES.values()))
def test_all_linear_targets_what_peft_targets_and_the_report_counts_what_peft_trains(saved, kind):
    """target_modules="all-linear" on each family: the same modules as PEFT's (every linear layer but the
    output head), and the report's trainable and total counts are PEFT's own."""
    from minilora.lora.inject import lora_modules
    from minilora.lora.report import param_report
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    hf, folder = saved[kind]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    ours = apply_lora(load_model(folder), "all-linear", r=4, alpha=8)
    assert sorted(n for n, _ in lora_modules(ours)) == theirs and "lm_head" not in theirs
    report = param_report(ours)
    assert (report.trainable, report.total) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", list(FAMILIES.values()))
def test_minilora_params_reads_each_family_from_config_json_alone(saved, kind, tmp_path, capsys):
    """`minilora params FOLDER` builds the model on the meta device from config.json (no weights read)
    and counts what apply_lora would train: PEFT's number for the same targets."""
    from minilora.cli import main
    from peft import LoraConfig, get_peft_model
    hf, folder = saved[kind]
    (tmp_path / "cfg").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "cfg" / "config.json")  # the config alone
    assert main(["params", str(tmp_path / "cfg"), "--targets", "q_proj", "v_proj", "--r", "4", "--alpha", "8"]) == 0
    out = capsys.readouterr().out
    trainable, total = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])) \
        .get_nb_trainable_parameters()
    assert f"{trainable:,}" in out and f"{total:,}" in out, out
