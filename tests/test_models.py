"""Hand-written models against transformers' implementations (the oracle), fp32, max abs error <= 1e-5."""

import pytest
import torch
import torch.nn as nn
from conftest import ENCODERS, TINY
from minilora.generate import generate_ids
from minilora.loading.weights import load_model

TOL = 1e-5


def batch(seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0   # right padding
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(TINY))
def test_logits_equal_transformers_with_right_padding(saved_tiny, kind):
    hf, folder = saved_tiny[kind]
    ours = load_model(folder)
    ids, mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL
    # No mask at all takes SDPA's causal fast path; it must agree too.
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", list(TINY))
def test_left_padding_gives_the_unpadded_logits(saved_tiny, kind):
    hf, folder = saved_tiny[kind]
    ours = load_model(folder)
    ids, _ = batch(1)
    padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(padded, attention_mask=mask)[:, 4:]
        # transformers given the same positions agrees on the padded batch as well
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hf_padded = hf(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 4:]
    assert (got - expected).abs().max().item() <= TOL
    assert (hf_padded - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", list(TINY))
def test_kv_cache_generation_equals_full_recompute(saved_tiny, kind):
    _, folder = saved_tiny[kind]
    ours = load_model(folder)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6]]
    with_cache = generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=12, use_cache=True)
    without = generate_ids(ours, prompts, eos_ids=[], pad_id=0, max_new_tokens=12, use_cache=False)
    assert with_cache == without
    assert all(len(o) == 12 for o in with_cache)
    # and the batch gives what each prompt gives alone (left padding is invisible)
    for p, o in zip(prompts, with_cache):
        assert generate_ids(ours, [p], eos_ids=[], pad_id=0, max_new_tokens=12) == [o]


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_cached_logits_equal_transformers_greedy_generation(saved_tiny, kind):
    hf, folder = saved_tiny[kind]
    ours = load_model(folder)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generate_ids(ours, [prompt[0].tolist()], eos_ids=[], pad_id=0, max_new_tokens=10) == [expected]


def test_state_dict_names_are_the_checkpoint_names(saved_tiny):
    from safetensors import safe_open
    for kind in ("llama-gqa", "gpt2"):
        hf, folder = saved_tiny[kind]
        ours = load_model(folder)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
        assert saved <= set(ours.state_dict())
        assert set(ours.state_dict()) - saved <= {"lm_head.weight"}  # the tied head, not saved by transformers


def test_sharded_checkpoint_loads_key_for_key(saved_tiny, tmp_path):
    for kind in ("gpt2", "llama-gqa"):
        hf, _ = saved_tiny[kind]
        hf.save_pretrained(tmp_path / kind, max_shard_size="20KB")
        assert (tmp_path / kind / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / kind).glob("*.safetensors"))) > 2
        ours = load_model(tmp_path / kind)
        ids, mask = batch()
        with torch.no_grad():
            assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= TOL


def test_hub_gpt2_layout_without_transformer_prefix(saved_tiny, tmp_path):
    """The Hub's gpt2 checkpoints come from the bare GPT2Model: no `transformer.` prefix, and saved
    causal-mask buffers `h.N.attn.bias`; both load."""
    import json

    from safetensors.torch import save_file
    hf, folder = saved_tiny["gpt2"]
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "hub").mkdir()
    save_file(state, str(tmp_path / "hub" / "model.safetensors"))
    (tmp_path / "hub" / "config.json").write_text(json.dumps(TINY["gpt2"]))
    ours = load_model(tmp_path / "hub")
    ids, _ = batch()
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() <= TOL


def test_bf16_load_runs_close_to_fp32(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    fp32, bf16 = load_model(folder), load_model(folder, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids, mask = batch()
    with torch.no_grad():
        diff = (bf16(ids, attention_mask=mask).float() - fp32(ids, attention_mask=mask))[mask.bool()]
    assert diff.abs().max().item() < 0.1 * fp32(ids).abs().max().item()


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_load_warns_only_where_bf16_products_are_slow(saved_tiny, monkeypatch, fast):
    import warnings

    import minilora.hardware
    monkeypatch.setattr(minilora.hardware, "matmul_is_fast", lambda dtype, device_type: fast)
    _, folder = saved_tiny["llama-gqa"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(folder, dtype=torch.bfloat16)
        load_model(folder)  # fp32: never
    assert ["much slower than fp32" in str(w.message) for w in caught] == ([] if fast else [True])


@pytest.mark.parametrize("dtype, need", [(torch.float16, "AVX-512 FP16 or AMX-FP16"),
                                         (torch.bfloat16, "AVX-512 BF16 or AMX")])
def test_the_slow_dtype_warning_says_what_this_cpu_has(saved_tiny, monkeypatch, dtype, need):
    """It used to say "no AVX-512/AMX" on a CPU with AVX-512 (fp16 is slow there for want of AVX-512
    FP16): the text now names the flags /proc/cpuinfo lists and what the dtype would need."""
    import minilora.hardware
    monkeypatch.setattr(minilora.hardware, "matmul_is_fast", lambda dtype, device_type: False)
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    with pytest.warns(UserWarning, match="much slower than fp32") as caught:
        load_model(saved_tiny["llama-gqa"][1], dtype=dtype)
    message = str(caught[0].message)
    name = str(dtype).removeprefix("torch.")
    assert f"fast {name} products need {need}" in message
    assert ("AVX-512" in message.split(";")[0]) == ("avx512f" in flags) and "no AVX-512" not in message
    assert ("AVX2" in message.split(";")[0]) == ("avx2" in flags)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_mapped_weights_are_copy_on_write(saved_tiny, tmp_path, kind):
    """fp32 loads map the safetensors file instead of copying it; writing to the weights (a merge does)
    must change the model only, never the checkpoint on disk."""
    import hashlib
    import shutil

    from minilora.lora.inject import apply_lora, merge_lora
    folder = tmp_path / kind
    shutil.copytree(saved_tiny[kind][1], folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    ids, mask = batch()
    model = load_model(folder)
    before = model(ids, attention_mask=mask)
    target = "c_attn" if kind == "gpt2" else "q_proj"
    apply_lora(model, [target], r=2, alpha=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    merge_lora(model)
    with torch.no_grad():  # and every weight written in place
        for p in model.parameters():
            p.mul_(2.0)
    del model
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == digest
    assert torch.equal(load_model(folder)(ids, attention_mask=mask), before)


@pytest.mark.parametrize("kind, task", [(k, None) for k in TINY] + [(k, t) for k in ENCODERS
                                                                     for t in ("classification", "embedding")])
def test_every_family_keeps_the_model_contract(kind, task):
    """What the loader, LoRA, quantization and adapters rely on (models/common.PretrainedModel), checked
    for every registered class: the declared output heads are the linear layers that "all-linear" LoRA
    leaves alone, those and the task head's are what 8-bit loading keeps in floating point, the
    fingerprint is config.json's values, the checkpoint mapping goes there and back, and only a
    classifier's task head may start fresh."""
    from minilora.models import MODEL_TYPES, PretrainedModel, build_model
    from minilora.names import find_targets, kept_in_float, matches
    from minilora.quant.int8 import Int8Linear, Int8Quantizer
    config = dict(TINY.get(kind) or ENCODERS[kind])
    with torch.device("meta"):
        model = build_model(config, task=task)
    assert isinstance(model, PretrainedModel) and type(model.config) is model.config_class
    assert type(model) in [c for e in MODEL_TYPES.values() for c in (e.values() if isinstance(e, dict) else [e])]
    linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    heads = [n for n in linear if matches(n, model.output_heads)]
    assert len(heads) == len(model.output_heads)  # each declared head is one linear layer of the model
    assert sorted(find_targets(model, "all-linear")) == sorted(set(linear) - set(heads))
    floats = [n for n in linear if matches(n, kept_in_float(model))]
    assert len(floats) == len(set(model.output_heads) | set(model.task_head))
    Int8Quantizer().prepare(model, None, "cpu")
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == set(floats)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == len(linear) - len(floats)
    fingerprint = model.fingerprint()
    assert {"model_type", "vocab_size"} <= set(fingerprint)
    assert all(fingerprint[k] == config[k] for k in fingerprint if k in config)
    for name, tensor in model.state_dict().items():
        assert model.checkpoint_to_model(*model.model_to_checkpoint(name, tensor))[0] == name
    for name, tensor in model.state_dict().items():  # a classifier's task head may start fresh, nothing else
        fresh = model.init_head(name, tensor.shape, "cpu")
        in_head = any(name.startswith(h + ".") for h in model.task_head)
        assert (fresh is not None) == in_head, name
        assert fresh is None or fresh.shape == tensor.shape
    assert bool(model.task_head) == (task == "classification")
    assert model.max_length > 0 and isinstance(model.input_embeddings, nn.Embedding)


def test_a_model_outside_the_registry_keeps_the_usual_head_names():
    """apply_lora and quantization work on any nn.Module: with no declared heads, "all-linear" leaves the
    usual output-layer names alone, and int8 keeps those and a pre_classifier in floating point."""
    from minilora.lora.inject import apply_lora
    from minilora.quant.int8 import quantize_model
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "lm_head": nn.Linear(4, 9), "score": nn.Linear(4, 2)})
    apply_lora(model, "all-linear", r=2)
    assert [type(m).__name__ for m in model.values()] == ["LoRALinear", "Linear", "Linear"]
    model = quantize_model(nn.ModuleDict({"body": nn.Linear(4, 4), "pre_classifier": nn.Linear(4, 4),
                                          "classifier": nn.Linear(4, 2)}))
    assert [type(m).__name__ for m in model.values()] == ["Int8Linear", "Linear", "Linear"]
