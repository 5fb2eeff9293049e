"""GGUF import against the `gguf` package (llama.cpp's own Python reader/writer, a test-only oracle):
a tiny Llama written as GGUF with F32, F16, Q8_0, Q4_0 and Q4_1 tensors and llama.cpp's q/k row
permutation loads here with the logits of the same dequantized weights in transformers."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from minilora.loading.weights import load_model  # noqa: E402

Q = gguf.GGMLQuantizationType
KINDS = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0, "ffn_gate": Q.F16,
         "ffn_up": Q.Q8_0, "ffn_down": Q.F16, "token_embd": Q.Q8_0, "output": Q.Q4_1}
NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py's permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{NAMES[rest]}.{kind}"
    return f"{NAMES[base]}.{kind}"


def write_gguf(hf, path, extra: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """hf's tensors as llama.cpp's converter writes them (KINDS' types, q/k rows permuted), plus `extra`
    {gguf name: float array} in Q8_0; returns the oracle: every Hub tensor dequantized, unpermuted."""
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    dequantized = {}
    for name, t in hf.state_dict().items():
        w = t.numpy().astype(np.float32)
        kind = KINDS.get(gguf_name(name).split(".")[-2], Q.F32) if w.ndim == 2 else Q.F32
        # Quantization works on blocks within a row, so it commutes with permuting rows: the oracle is
        # the dequantized unpermuted weight, independent of how we undo llama.cpp's permutation.
        dequantized[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape))
        if ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, kind), raw_dtype=kind)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, gguf.quants.quantize(w, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


def test_gguf_quant_types_and_permutation(saved_tiny, tmp_path):
    hf, _ = saved_tiny["llama-gqa"]
    cfg = hf.config
    path = tmp_path / "tiny.gguf"
    dequantized = write_gguf(hf, path)
    ours = load_model(path)
    assert not ours.config.tie_word_embeddings
    oracle = type(hf)(cfg).eval()
    oracle.load_state_dict(dequantized)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - oracle(input_ids=ids).logits).abs().max().item() <= 1e-5
    for name, t in ours.state_dict().items():  # tensor for tensor, the permutation undone
        assert torch.equal(t, dequantized[name]), name


@pytest.mark.parametrize("extra, named", [
    pytest.param("blk.{layers}.attn_q.weight", r"model\.layers\.{layers}\.self_attn\.q_proj\.weight",
                 id="a-block-beyond-the-block-count"),
    pytest.param("blk.0.attn_qkv.weight", r"model\.layers\.0\.attn_qkv\.weight", id="fused-attn-qkv"),
])
def test_a_gguf_tensor_the_model_has_no_place_for_is_named_kept_quantized_or_not(saved_tiny, tmp_path, extra, named):
    """keep_quantized=True used to fail with a raw AttributeError where the float load names the tensor;
    both now make the same check and say the same thing."""
    from minilora.errors import CheckpointError
    hf, _ = saved_tiny["llama-gqa"]
    cfg = hf.config
    extra = extra.format(layers=cfg.num_hidden_layers)
    path = tmp_path / "extra.gguf"
    write_gguf(hf, path, {extra: np.random.default_rng(0).standard_normal((64, cfg.hidden_size)).astype(np.float32)})
    messages = []
    for keep in (False, True):
        with pytest.raises(CheckpointError) as caught:
            load_model(path, keep_quantized=keep)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    import re
    assert re.search(named.format(layers=cfg.num_hidden_layers), messages[0]) and "extra.gguf" in messages[0], messages[0]
