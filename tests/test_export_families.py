"""GGUF export of Qwen3, Gemma 2 and Gemma 3 (llama.cpp's qwen3, gemma2 and gemma3 architectures),
against two readers that are not the writer: transformers' own GGUF loader (which undoes llama.cpp's
converter: Gemma's norms stored as 1 + w, its four norms a block under their own names) gives the
LoRA'd model's logits from the merged file; and the adapter file applied the way llama.cpp applies it
(W + alpha / r · B A, in numpy on the exported base) gives the merged file tensor by tensor. llama.cpp
itself runs them in tests/test_llamacpp.py (opt-in).

The configs are those llama.cpp can carry: it hard-codes Gemma's local/global pattern, Gemma 3's local
RoPE base (10,000) and the query scale (head_dim^-1/2); transformers' GGUF loader leaves the head size
and query_pre_attn_scalar at their defaults (128 for Qwen3, 256 for Gemma), so the tiny models use those."""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_gguf_lora_applies
from minilora.errors import ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.ship.gguf_export import export_adapter, export_merged

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48)
CONFIGS = {
    "qwen3": dict(SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  rope_theta=5e4),
    # seven layers: five local, one global (layer 5), one local, as llama.cpp's gemma3 assumes
    "gemma3_text": dict(SMALL, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        sliding_window=4, query_pre_attn_scalar=256, rope_theta=1e6),
    "gemma2": dict(SMALL, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                   sliding_window=4, query_pre_attn_scalar=256),
}
ARCH = {"qwen3": "qwen3", "gemma3_text": "gemma3", "gemma2": "gemma2"}


def classes(model_type):
    import transformers
    return {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
            "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)}[model_type]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{model_type: a save_pretrained folder of transformers' model, random not-small weights}"""
    root, out = tmp_path_factory.mktemp("export_families"), {}
    for model_type, args in CONFIGS.items():
        config_cls, model_cls = classes(model_type)
        torch.manual_seed(0)
        hf = model_cls(config_cls(**copy.deepcopy(args), attn_implementation="eager"))
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        hf.save_pretrained(root / model_type)
        out[model_type] = root / model_type
    return out


def adapted(folder, **settings):
    torch.manual_seed(1)
    model = apply_lora(load_model(folder), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8,
                       **settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_merged_f32_loads_in_transformers_gguf_reader_with_our_logits(folders, tmp_path, model_type):
    _, model_cls = classes(model_type)
    model = adapted(folders[model_type])
    ids = torch.randint(0, 97, (2, 11))  # longer than the 4-token window
    with torch.no_grad():
        expected = model(ids)
    path = export_merged(model, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == ARCH[model_type]
    oracle = model_cls.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    with torch.no_grad():
        assert (oracle(ids).logits - expected).abs().max().item() <= 1e-4
        assert (load_model(path)(ids) - expected).abs().max().item() <= 1e-5  # and minilora's own reader
    if model_type != "qwen3":  # the +1 of Gemma's (1 + w) norms is in the file, as llama.cpp's converter writes it
        written = {t.name: np.asarray(t.data) for t in reader.tensors}
        ours = model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
        assert np.allclose(written["blk.0.post_ffw_norm.weight"], ours + 1.0)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_adapter_applied_the_llamacpp_way_gives_the_merged_file(folders, tmp_path, model_type):
    model = adapted(folders[model_type], rank_pattern={"o_proj": 2})
    adapter = export_adapter(model, tmp_path / "a.gguf")
    base = export_merged(load_model(folders[model_type]), tmp_path / "base.gguf", "f32")
    merged = export_merged(model, tmp_path / "merged.gguf", "f32")
    reader = gguf.GGUFReader(str(adapter))
    assert reader.fields["general.architecture"].contents() == ARCH[model_type]
    assert len(assert_gguf_lora_applies(reader, base, merged, atol=1e-5)) == 2 * 5 * CONFIGS[model_type]["num_hidden_layers"]


@pytest.mark.parametrize("model_type, change, message", [
    ("gemma3_text", dict(rope_local_base_freq=100.0), r"the local layers' RoPE is .*'rope_theta': 100\.0.* but "
     r"llama\.cpp's gemma3 gives them base 10000"),
    ("gemma3_text", dict(sliding_window_pattern=2), r"layer_types \['sliding_attention', 'full_attention', .* is not "
     r"the pattern llama\.cpp's gemma3 assumes \(every 6th layer global"),
    ("gemma3_text", dict(final_logit_softcapping=3.0), r"final_logit_softcapping = 3\.0, but llama\.cpp's gemma3 does "
     r"not soft-cap"),
    ("gemma2", dict(query_pre_attn_scalar=16), r"query_pre_attn_scalar = 16, but llama\.cpp's gemma2 scales queries "
     r"by 256\^-1/2"),
    ("gemma2", dict(final_logit_softcapping=None), r"final_logit_softcapping is null, but llama\.cpp's gemma2 always "
     r"soft-caps"),
    ("qwen3", dict(attention_bias=True), r"attention biases \(attention_bias\), which llama\.cpp's qwen3 architecture"),
])
def test_what_llamacpp_would_run_as_another_model_is_refused_by_the_field(tmp_path, model_type, change, message):
    import json

    from minilora.models import build_model
    config = {**CONFIGS[model_type], **change, "model_type": model_type}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = build_model(config)
    for export in (lambda: export_merged(model, tmp_path / "m.gguf", "f32"),
                   lambda: export_adapter(apply_lora(model, ["q_proj"], r=2), tmp_path / "a.gguf")):
        with pytest.raises(ConfigError, match=message):
            export()
    assert not list(tmp_path.glob("*.gguf"))
