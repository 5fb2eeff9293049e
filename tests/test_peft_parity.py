"""PEFT parity beyond plain LoRA, with peft itself as the oracle: SEQ_CLS adapters, tied heads,
DoRA, LoRA on embeddings, per-module ranks, several named adapters. Logits equal to 1e-5 in fp32."""

import copy
import re
import json

import pytest
import torch
from minilora.loading.weights import load_model
from minilora.lora.config import lora_state
from minilora.lora.inject import apply_lora
from minilora.lora.peft_files import adapter_classes, load_adapter, save_adapter

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
ENCODER_TARGETS = {"bert": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}


def randomize(model, seed=0, scale=0.1):
    """Random values in every trainable tensor (LoRA's B starts at zero: nothing would be compared)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def max_error(a, b, mask=MASK):
    if a.dim() == 3:  # (B, T, V): only the positions the mask keeps
        return (a - b)[mask.bool()].abs().max().item()
    return (a - b).abs().max().item()


def logits(model, peft=False):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK) if peft else model(IDS, attention_mask=MASK)
    return out.logits if peft else out


# --- 1. SEQ_CLS adapters: PEFT lists ["classifier", "score"] in modules_to_save -----------------------

@pytest.mark.parametrize("kind", list(ENCODER_TARGETS))
def test_seq_cls_adapter_from_peft_loads_with_its_classifier(saved_tiny, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny[kind]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                               target_modules=ENCODER_TARGETS[kind]))
    randomize(peft_model, seed=1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) >= {"classifier", "score"}  # "score" names nothing in an encoder
    classes = adapter_classes(tmp_path / "peft")
    assert classes == {"num_labels": hf.config.num_labels}  # PEFT writes no label names
    ours = load_adapter(load_model(folder, task="classification", **classes), tmp_path / "peft")
    assert ours.config.id2label == {str(i): n for i, n in hf.config.id2label.items()}  # the base's names kept
    assert max_error(logits(ours), logits(peft_model, peft=True)) <= 1e-5
    # and the other way: what minilora saves for this classifier loads in peft
    save_adapter(ours, tmp_path / "ours")
    from peft import PeftModel
    back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert max_error(logits(back, peft=True), logits(ours)) <= 1e-5


def test_seq_cls_adapter_labels_from_a_config_beside_it(saved_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny["bert"]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    peft_model.save_pretrained(tmp_path / "peft")
    names = {"0": "sad", "1": "calm", "2": "glad"}
    (tmp_path / "peft" / "config.json").write_text(json.dumps({"id2label": names}))  # as a Trainer may save
    classes = adapter_classes(tmp_path / "peft")
    assert classes == {"id2label": {0: "sad", 1: "calm", 2: "glad"}}
    model = load_adapter(load_model(folder, task="classification", **classes), tmp_path / "peft")
    assert model.config.id2label == names


def test_score_in_modules_to_save_is_a_typo_on_a_language_model(saved_tiny):
    from minilora.errors import ConfigError
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(ConfigError, match="'score' matches no module"):
        apply_lora(load_model(folder), ["q_proj"], modules_to_save=["score"])


# --- both directions for each kind of PEFT adapter ----------------------------------------------------

# (tiny model, peft LoraConfig arguments, the same for apply_lora)
KINDS = {
    "dora": ("llama-gqa", dict(target_modules=["q_proj", "v_proj"], use_dora=True),
             dict(targets=["q_proj", "v_proj"], use_dora=True)),
    "dora-gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], use_dora=True),
                         dict(targets=["c_attn", "c_fc"], use_dora=True)),
    "dora-bias-rslora": ("qwen2", dict(target_modules=["q_proj", "k_proj"], use_dora=True, use_rslora=True),
                         dict(targets=["q_proj", "k_proj"], use_dora=True, use_rslora=True)),
    "embedding": ("llama-gqa", dict(target_modules=["embed_tokens", "q_proj"]),
                  dict(targets=["embed_tokens", "q_proj"])),
    "embedding-gpt2": ("gpt2", dict(target_modules=["wte", "c_attn"]), dict(targets=["wte", "c_attn"])),
    "patterns": ("llama-gqa", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                   rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                   alpha_pattern={"down_proj": 3.0}),
                 dict(targets=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3.0})),
    "tied-head": ("llama-tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                  dict(targets=["q_proj"], modules_to_save=["lm_head"])),
    "tied-head-ensure-tying": ("llama-tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                  ensure_weight_tying=True),
                               dict(targets=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)),
}


def peft_model_of(hf, peft_args, seed):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, **peft_args))
    randomize(model, seed=seed)
    return model.eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_adapter_loads_here_with_peft_logits(saved_tiny, tmp_path, kind):
    model_kind, peft_args, _ = KINDS[kind]
    hf, folder = saved_tiny[model_kind]
    theirs = peft_model_of(hf, peft_args, seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(folder), tmp_path / "peft")
    assert max_error(logits(ours), logits(theirs, peft=True)) <= 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_saved_here_loads_in_peft_with_our_logits(saved_tiny, tmp_path, kind):
    from minilora.lora.config import LoRAConfig
    from peft import PeftModel
    model_kind, _, ours_args = KINDS[kind]
    hf, folder = saved_tiny[model_kind]
    ours = apply_lora(load_model(folder), LoRAConfig(r=4, alpha=8, **ours_args))
    randomize(ours, seed=2)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert max_error(logits(theirs, peft=True), logits(ours)) <= 1e-5


# --- 2. tied heads ------------------------------------------------------------------------------------

def test_tied_head_in_modules_to_save_gets_its_own_copy(saved_tiny, tmp_path):
    import transformers
    from minilora.loading.weights import save_model
    from minilora.lora.inject import remove_lora
    _, folder = saved_tiny["llama-tied"]
    model = apply_lora(load_model(folder), ["q_proj"], modules_to_save=["lm_head"])
    embeddings = model.model.embed_tokens.weight
    assert model.lm_head.weight is not embeddings and not embeddings.requires_grad and model.lm_head.weight.requires_grad
    before = embeddings.detach().clone()
    loss = model(IDS, attention_mask=MASK)[MASK.bool()].logsumexp(-1).mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(model.model.embed_tokens.weight, before)  # the embeddings stay as they were
    assert not torch.equal(model.lm_head.weight, before)
    expected = logits(model)
    merged = remove_lora(copy.deepcopy(model))  # a merged model keeps its own head, and says it is untied
    save_model(merged, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert max_error(logits(hf, peft=True), expected) <= 1e-5
    base = remove_lora(model, merge=False)  # the base model as it was: tied again
    assert base.lm_head.weight is base.model.embed_tokens.weight and torch.equal(base.lm_head.weight, before)


def test_ensure_weight_tying_trains_the_shared_tensor(saved_tiny, tmp_path):
    from minilora.lora.config import LoRAConfig
    _, folder = saved_tiny["llama-tied"]
    model = apply_lora(load_model(folder), LoRAConfig(["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    save_adapter(model, tmp_path / "a")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:  # both names, as PEFT writes
        assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(f.keys())
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["ensure_weight_tying"] is True


# --- 3. DoRA ------------------------------------------------------------------------------------------

def test_dora_gradients_equal_peft(saved_tiny):
    """Trained here as in PEFT: the same loss gives the same gradients for A, B and the magnitudes."""
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny["qwen2"]
    theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                          use_dora=True))
    randomize(theirs, seed=3)
    ours = apply_lora(load_model(folder), ["q_proj", "o_proj"], r=4, alpha=8, use_dora=True)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                name = re.sub(r"\.(lora_\w+?)\.default", r".adapters.default.\1", n.removeprefix("base_model.model."))
                ours_params[name.removesuffix(".weight") if "magnitude" in name else name].copy_(p)
    theirs.train()(input_ids=IDS, attention_mask=MASK).logits[MASK.bool()].pow(2).mean().backward()
    ours.train()(IDS, attention_mask=MASK)[MASK.bool()].pow(2).mean().backward()
    ours_name = lambda n: re.sub(r"\.(lora_\w+?)\.default", r".adapters.default.\1", n.removeprefix("base_model.model."))
    grads = {ours_name(n).removesuffix(".weight") if "magnitude" in n else ours_name(n): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) == 3 * 2 * 2
    for n, g in grads.items():
        assert (ours_params[n].grad - g).abs().max().item() <= 1e-5, n


def test_dora_merge_unmerge_and_its_equation(saved_tiny):
    from minilora.lora.inject import merge_lora, unmerge_lora
    _, folder = saved_tiny["qwen2"]
    model = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8, use_dora=True)
    randomize(model, seed=4)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, layer.in_features)
    # eq. 5: W' = m · (W0 + s B A) / ||W0 + s B A||_row
    adapted = w0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    w_dora = layer.lora_magnitude_vector[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ w_dora.T + layer.bias, atol=1e-5)
    expected = logits(model)
    merge_lora(model)
    assert max_error(logits(model), expected) <= 1e-5
    unmerge_lora(model)
    assert (layer.weight - w0).abs().max().item() <= 1e-6


def test_dora_starts_as_the_base_model_and_runs_on_an_int8_base(saved_tiny):
    from minilora.lora.layers import LoRALinear
    from minilora.quant.int8 import Int8Linear
    _, folder = saved_tiny["llama-gqa"]
    base = logits(load_model(folder))
    model = apply_lora(load_model(folder), ["q_proj", "v_proj"], use_dora=True)
    assert max_error(logits(model), base) <= 1e-5  # m = ||W0||_row and B = 0: W' = W0 at step 0
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    float_layer = LoRALinear(copy.deepcopy(linear), r=4, alpha=8, use_dora=True)
    int8_layer = LoRALinear(Int8Linear.from_linear(linear), r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for a, b in ((float_layer, int8_layer),):
            b.lora_A.weight.copy_(a.lora_A.weight)
            a.lora_B.weight.normal_()
            b.lora_B.weight.copy_(a.lora_B.weight)
    # the int8 layer is DoRA over its dequantized weight: m starts at its row norms, the output within
    # int8's rounding of the float layer's
    dequantized = int8_layer.weight.float() * int8_layer.weight_scale[:, None]
    assert torch.allclose(int8_layer.lora_magnitude_vector, dequantized.norm(dim=1))
    x = torch.randn(5, 64)
    assert (int8_layer(x) - float_layer(x)).abs().max().item() <= 0.05 * float_layer(x).abs().max().item()
    int8_layer(x).sum().backward()
    assert int8_layer.lora_magnitude_vector.grad is not None and int8_layer.lora_A.weight.grad is not None


# --- 4. LoRA on embeddings ----------------------------------------------------------------------------

def test_embedding_lora_merge_unmerge_and_all_linear_leaves_it(saved_tiny):
    from minilora.lora.inject import merge_lora, unmerge_lora
    from minilora.lora.embedding import LoRAEmbedding
    _, folder = saved_tiny["llama-gqa"]
    assert not any(isinstance(m, LoRAEmbedding) for m in apply_lora(load_model(folder), "all-linear").modules())
    model = apply_lora(load_model(folder), ["embed_tokens"], r=4, alpha=8)
    table = model.model.embed_tokens
    assert isinstance(table, LoRAEmbedding) and not table.lora_embedding_A.any()  # A = 0: starts unchanged
    randomize(model, seed=5)
    w0 = table.weight.detach().clone()
    ids = torch.tensor([3, 7, 7])  # the update is a lookup into A, then B: row i of W0 + s (B A)^T
    expected_rows = w0[ids] + table.scaling * (table.lora_embedding_B @ table.lora_embedding_A[:, ids]).T
    assert torch.allclose(table(ids), expected_rows, atol=1e-6)
    expected = logits(model)
    merge_lora(model)
    assert max_error(logits(model), expected) <= 1e-5
    unmerge_lora(model)
    assert (table.weight - w0).abs().max().item() <= 1e-6


# --- 5. per-module ranks and alphas -------------------------------------------------------------------

def test_rank_and_alpha_patterns_follow_peft_rule(saved_tiny, tmp_path):
    from minilora.lora.config import LoRAConfig
    _, folder = saved_tiny["llama-gqa"]
    config = LoRAConfig(["q_proj", "v_proj"], r=4, alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\..*q_proj": 6},
                        alpha_pattern={"q_proj": 3})
    model = apply_lora(load_model(folder), config)
    attn = [layer.self_attn for layer in model.model.layers]
    assert [(a.q_proj.r, a.q_proj.alpha, a.v_proj.r, a.v_proj.alpha) for a in attn] == [(4, 3, 2, 8), (6, 3, 2, 8)]
    assert config.settings_for("model.layers.0.self_attn.xq_proj") == (4, 8)  # the key must follow a dot
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == config.rank_pattern and saved["alpha_pattern"] == {"q_proj": 3}


def test_patterns_in_a_recipe(tmp_path):
    from minilora.errors import ConfigError
    from minilora.fields import from_table
    from minilora.lora.config import LoRAConfig
    config = from_table(LoRAConfig, {"targets": ["q_proj"], "rank_pattern": {"q_proj": 16}}, "recipe.toml [lora]")
    assert config.settings_for("a.q_proj") == (16, 16)
    with pytest.raises(ConfigError, match=r"\[lora\]: LoRA rank r must be a positive integer, got r=0"):
        from_table(LoRAConfig, {"rank_pattern": {"q_proj": 0}}, "recipe.toml [lora]")
    with pytest.raises(ConfigError, match=r"rank_pattern key '\(a\+\)\+' repeats a repetition"):
        LoRAConfig(rank_pattern={"(a+)+": 2})


# --- 7. several named adapters ------------------------------------------------------------------------

def test_several_named_adapters_switch_disable_combine_as_peft(saved_tiny, tmp_path):
    from minilora.lora.adapters import add_weighted_adapter, set_adapter
    from minilora.lora.inject import adapter_disabled
    from peft import LoraConfig, PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    theirs = peft_model_of(hf, dict(target_modules=["q_proj", "v_proj"]), seed=6)
    theirs.add_adapter("other", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj"]))
    theirs.set_adapter("other")
    randomize(theirs, seed=7)
    theirs.save_pretrained(tmp_path / "peft")  # PEFT's layout: default in the folder, "other" in peft/other
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()

    ours = load_adapter(load_model(folder), tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    assert lora_state(ours).active_adapter == "default" and list(lora_state(ours).adapters) == ["default", "other"]
    theirs.set_adapter("default")
    assert max_error(logits(ours), logits(theirs, peft=True)) <= 1e-5
    set_adapter(ours, "other")
    theirs.set_adapter("other")
    assert max_error(logits(ours), logits(theirs, peft=True)) <= 1e-5
    with adapter_disabled(ours), theirs.disable_adapter():
        assert max_error(logits(ours), logits(theirs, peft=True)) <= 1e-5
        assert max_error(logits(ours), logits(hf, peft=True)) <= 1e-5

    # the weighted sum of the two updates, as PEFT's add_weighted_adapter(..., combination_type="cat")
    theirs.add_weighted_adapter(["default", "other"], [0.7, -0.3], "mix", combination_type="cat")
    theirs.set_adapter("mix")
    add_weighted_adapter(ours, ["default", "other"], [0.7, -0.3], "mix")
    assert lora_state(ours).active_adapter == "other"
    set_adapter(ours, "mix")
    assert max_error(logits(ours), logits(theirs, peft=True)) <= 1e-5
    layer = ours.model.layers[0].self_attn
    assert (layer.q_proj.r, layer.v_proj.r, layer.k_proj.r) == (6, 4, 2)

    # saved here in PEFT's layout; PEFT reads every adapter back
    save_adapter(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir() if p.is_dir()) == ["mix", "other"]
    back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "mix", adapter_name="mix")
    back.set_adapter("mix")
    assert max_error(logits(back.eval(), peft=True), logits(ours)) <= 1e-5
    assert lora_state(ours).active_adapter == "mix"  # saving switched through them all and back


def test_named_adapter_errors(saved_tiny, tmp_path):
    from minilora.errors import CheckpointError, ConfigError
    from minilora.lora.adapters import add_adapter, delete_adapter, set_adapter
    from minilora.lora.config import LoRAConfig
    from minilora.lora.inject import merge_lora
    _, folder = saved_tiny["llama-gqa"]
    model = apply_lora(load_model(folder), ["q_proj"])
    with pytest.raises(ConfigError, match="no adapter named 'x' on the model \\(it has default\\)"):
        set_adapter(model, "x")
    with pytest.raises(ConfigError, match="adapter name 'default'"):
        add_adapter(model, "default", LoRAConfig(["k_proj"]))
    with pytest.raises(ConfigError, match="'nothing' matches no"):
        add_adapter(model, "b", LoRAConfig(["nothing"]))
    assert list(lora_state(model).adapters) == ["default"] and model.model.layers[0].self_attn.q_proj.active
    add_adapter(model, "b", LoRAConfig(["k_proj"]))
    with pytest.raises(ConfigError, match="'b' is the active one"):
        delete_adapter(model, "b")
    merge_lora(model)
    with pytest.raises(ConfigError, match="merged into the base weights"):
        set_adapter(model, "default")
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=2), tmp_path / "r2")
    fresh = apply_lora(load_model(folder), ["q_proj"], r=4)
    with pytest.raises(CheckpointError, match="differ from those of the LoRA layer already there"):
        load_adapter(fresh, tmp_path / "r2")
    load_adapter(fresh, tmp_path / "r2", adapter_name="small")  # beside it, under its own name
    assert lora_state(fresh).active_adapter == "default" and lora_state(fresh).adapters["small"].r == 2


def test_report_counts_dora_magnitudes_and_embedding_updates_as_peft(saved_tiny):
    from minilora.lora.config import LoRAConfig
    from minilora.lora.report import param_report
    hf, folder = saved_tiny["llama-gqa"]
    theirs = peft_model_of(hf, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=False), seed=0)
    ours = apply_lora(load_model(folder), LoRAConfig(["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8))
    report = param_report(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    assert sum(row.count * row.trainable for row in report.rows) == report.trainable
    dora = param_report(apply_lora(load_model(folder), LoRAConfig(["q_proj", "v_proj"], r=4, alpha=8, use_dora=True)))
    theirs = peft_model_of(hf, dict(target_modules=["q_proj", "v_proj"], use_dora=True), seed=0)
    assert dora.trainable == theirs.get_nb_trainable_parameters()[0]
    assert sum(row.count * row.trainable for row in dora.rows) == dora.trainable  # r(d+k) + d per module


@pytest.mark.parametrize("config", [
    dict(targets=["q_proj", "v_proj"], use_dora=True, dropout=0.1),
    dict(targets=["q_proj", "embed_tokens"], rank_pattern={"embed_tokens": 2}, dropout=0.1),
], ids=["dora", "embedding"])
def test_dora_and_embedding_adapters_train_and_resume_exactly(saved_tiny, tmp_path, config):
    """train() trains the magnitudes and the embedding's A/B; a stop and resume continues the same curve,
    and the saved adapter gives the trained model's logits."""
    from conftest import Tok, examples
    from minilora.lora.config import LoRAConfig
    from minilora.training.loop import TrainConfig, train
    _, folder = saved_tiny["llama-gqa"]

    def model():
        torch.manual_seed(0)
        return apply_lora(load_model(folder), LoRAConfig(r=4, alpha=8, **config))

    def settings(out):
        return TrainConfig(output_dir=str(out), epochs=2, micro_batch_size=2, batch_size=4, lr=1e-2, save_every=2,
                           progress=False)
    full_model = model()
    trained = [n for n, p in full_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n or "lora_embedding_A" in n for n in trained)
    before = {n: p.detach().clone() for n, p in full_model.named_parameters() if p.requires_grad}
    full = train(full_model, Tok, examples(12), None, settings(tmp_path / "a"))
    assert not full.stopped_early
    changed = {n for n, p in full_model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed == set(trained)  # every adapter tensor learned, magnitudes and the table's A included
    asked = []
    stopped = train(model(), Tok, examples(12), None, settings(tmp_path / "b"),
                    should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert stopped.stopped_early
    cfg = settings(tmp_path / "b")
    cfg.resume_from_checkpoint = "latest"
    resumed_model = model()
    resumed = train(resumed_model, Tok, examples(12), None, cfg)
    a = {h["step"]: h["loss"] for h in full.history if "loss" in h}
    assert [h["step"] for h in resumed.history if "loss" in h] == [4, 5, 6]
    for h in resumed.history:
        if "loss" in h:
            assert abs(h["loss"] - a[h["step"]]) <= 1e-6
    for (n, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert (p - q).abs().max().item() <= 1e-6, n
    expected = logits(full_model.eval())
    assert max_error(logits(load_adapter(load_model(folder), full.adapter_dir)), expected) <= 1e-6


@pytest.mark.parametrize("field, value", [("lora_bias", True), ("layers_to_transform", [0]),
                                          ("trainable_token_indices", [1, 2])])
def test_peft_options_without_counterpart_are_refused_by_name(saved_tiny, tmp_path, field, value):
    from minilora.errors import CheckpointError
    hf, folder = saved_tiny["llama-gqa"]
    theirs = peft_model_of(hf, dict(target_modules=["q_proj"]), seed=0)
    theirs.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=rf"adapter_config.json: {field} = .* is not supported here"):
        load_adapter(load_model(folder), tmp_path / "a")


def test_a_folder_of_named_adapters_names_them(saved_tiny, tmp_path):
    from minilora.errors import CheckpointError
    from minilora.lora.adapters import add_adapter
    from minilora.lora.config import LoRAConfig
    _, folder = saved_tiny["llama-gqa"]
    model = add_adapter(add_adapter(load_model(folder), "a", LoRAConfig(["q_proj"])), "b", LoRAConfig(["k_proj"]))
    save_adapter(model, tmp_path / "two")
    assert not (tmp_path / "two" / "adapter_config.json").exists()
    with pytest.raises(CheckpointError, match=r"named adapters in a, b: load each with load_adapter\(model, '.*two/a', "
                                              r"adapter_name='a'\)"):
        load_adapter(load_model(folder), tmp_path / "two")


def test_load_into_a_named_adapter_that_is_not_active(saved_tiny, tmp_path):
    """As PEFT: load_adapter(..., adapter_name="b") fills "b", whichever adapter is active."""
    from minilora.lora.adapters import add_adapter, set_adapter
    from minilora.lora.config import LoRAConfig
    _, folder = saved_tiny["llama-gqa"]
    source = apply_lora(load_model(folder), ["k_proj"], r=2)
    randomize(source, seed=8)
    save_adapter(source, tmp_path / "k")
    expected = logits(source)
    model = add_adapter(apply_lora(load_model(folder), ["q_proj"]), "b", LoRAConfig(["k_proj"], r=2))
    set_adapter(model, "default")
    randomize(model, seed=9)
    default = logits(model)
    load_adapter(model, tmp_path / "k", adapter_name="b")
    assert lora_state(model).active_adapter == "default" and max_error(logits(model), default) == 0
    set_adapter(model, "b")
    assert max_error(logits(model), expected) <= 1e-6


def test_tied_embedding_lora_with_ensure_weight_tying_is_refused_both_ways(saved_tiny, tmp_path):
    """PEFT then also adapts the tied head with the same A and B (transposed); that is not built here,
    so it is refused by name, from the API and from PEFT's file, and the model is left as it was."""
    from minilora.errors import CheckpointError, ConfigError
    from minilora.lora.config import LoRAConfig
    hf, folder = saved_tiny["llama-tied"]
    model = load_model(folder)
    with pytest.raises(ConfigError, match=r"model.embed_tokens: LoRA on a layer tied to lm_head with "
                                          r"ensure_weight_tying is not supported"):
        apply_lora(model, LoRAConfig(["q_proj", "embed_tokens"], ensure_weight_tying=True))
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing was wrapped
    theirs = peft_model_of(hf, dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), seed=0)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(CheckpointError, match=r"adapter_config.json does not fit this model: model.embed_tokens: "
                                              r"LoRA on a layer tied to lm_head with ensure_weight_tying"):
        load_adapter(load_model(folder), tmp_path / "peft")


def test_weighted_adapter_weights_are_checked_and_rslora_gives_the_exact_sum(saved_tiny):
    from minilora.errors import ConfigError
    from minilora.lora.adapters import add_adapter, add_weighted_adapter, set_adapter
    from minilora.lora.config import LoRAConfig
    _, folder = saved_tiny["llama-gqa"]
    model = apply_lora(load_model(folder), LoRAConfig(["q_proj"], r=2, alpha=3, use_rslora=True))
    add_adapter(model, "b", LoRAConfig(["q_proj", "v_proj"], r=4, alpha=5, use_rslora=True))
    for bad in (["a", "b"], [0.5, float("nan")], [True, 1.0]):
        with pytest.raises(ConfigError, match="weights must be finite numbers"):
            add_weighted_adapter(model, ["default", "b"], bad, "mix")
    deltas = {}
    for name in ("default", "b"):
        set_adapter(model, name)
        randomize(model, seed=len(name))
        deltas[name] = model.model.layers[0].self_attn.q_proj.delta_weight().detach()
    add_weighted_adapter(model, ["default", "b"], [0.6, -0.4], "mix")
    set_adapter(model, "mix")
    mixed = model.model.layers[0].self_attn.q_proj.delta_weight()
    assert torch.allclose(mixed, 0.6 * deltas["default"] - 0.4 * deltas["b"], atol=1e-6)


def test_peft_names_are_exact_aliases(saved_tiny, tmp_path):
    """target_modules, lora_alpha, lora_dropout (PEFT's names) in apply_lora, LoRAConfig, a recipe's [lora]
    and `minilora params`: the same adapter as minilora's names; both at once, differing, is refused."""
    import torch
    from conftest import write_recipe
    from minilora.cli import main
    from minilora.errors import ConfigError
    from minilora.loading.weights import load_model
    from minilora.lora.config import LoRAConfig
    from minilora.lora.inject import apply_lora
    from minilora.recipe import load_recipe
    folder = saved_tiny["llama-gqa"][1]
    ours, theirs = load_model(folder), load_model(folder)
    torch.manual_seed(0)
    apply_lora(ours, ["q_proj", "o_proj"], r=4, alpha=32, dropout=0.1)
    torch.manual_seed(0)
    apply_lora(theirs, target_modules=["q_proj", "o_proj"], r=4, lora_alpha=32, lora_dropout=0.1)
    assert lora_state(ours).config == lora_state(theirs).config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert LoRAConfig(target_modules="all-linear", lora_alpha=8).targets == "all-linear"
    with pytest.raises(ConfigError, match="alpha and lora_alpha name the same setting"):
        LoRAConfig(alpha=4, lora_alpha=8)
    with pytest.raises(ConfigError, match="name the layers to adapt: targets \\(or PEFT's target_modules\\)"):
        apply_lora(load_model(folder))
    recipe, _ = write_recipe(saved_tiny, tmp_path, **{'targets = ["q_proj", "v_proj"]': 'target_modules = ["q_proj"]',
                                                      "alpha = 8": "lora_alpha = 8"})
    lora = load_recipe(recipe).lora
    assert (lora.targets, lora.alpha) == (["q_proj"], 8)
    assert main(["params", str(folder), "--target-modules", "q_proj", "--lora-alpha", "8", "--r", "2"]) == 0
