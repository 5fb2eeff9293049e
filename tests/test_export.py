"""GGUF export against the gguf package (the oracle that reads what was written, and quantizes Q8_0 and
Q4_0 itself) and against minilora's own GGUF reader (the round trip gives the exported model's logits).
llama.cpp itself runs the files in tests/test_llamacpp.py (opt-in)."""

import numpy as np
import pytest
import torch
from conftest import assert_gguf_lora_applies, lora_model
from minilora.errors import CheckpointError, ConfigError
from minilora.formats import ggml_blocks as ggml
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.ship.gguf_export import (
    TYPES,
    export_adapter,
    export_merged,
    to_llamacpp_rows,
)

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", [ggml.Q8_0, ggml.Q4_0], ids=["Q8_0", "Q4_0"])
def test_quantizers_write_the_gguf_packages_bytes(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32) * rng.uniform(0.01, 10, (64, 1)).astype(np.float32)
    x[0] = 0
    x[1, :32] = 0.5  # ties for the largest magnitude
    x[2, :32] = np.linspace(-1, 1, 32)
    x[3, :64] = np.arange(64) / 2 - 16  # values at exact halves of the step
    ours = ggml.quantize_blocks(torch.from_numpy(x), kind).numpy().reshape(64, -1)
    assert np.array_equal(ours, gguf.quants.quantize(x, gguf.GGMLQuantizationType(kind)))


def adapted(saved_tiny, kind="llama-gqa", **lora):
    return lora_model(saved_tiny, kind, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], std=0.2, **lora)


def merged_weights(model):
    import copy

    from minilora.lora.inject import remove_lora
    return {n: t.detach().clone() for n, t in remove_lora(copy.deepcopy(model), merge=True).state_dict().items()}


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "qwen2"])
def test_merged_f32_reads_back_tensor_by_tensor_and_gives_the_same_logits(saved_tiny, tmp_path, kind):
    model = adapted(saved_tiny, kind)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    weights = merged_weights(model)
    path = export_merged(model, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == ("qwen2" if kind == "qwen2" else "llama")
    written = {t.name: t for t in reader.tensors}
    from minilora.ship.gguf_export import gguf_name
    for hub, w in weights.items():
        if hub == "lm_head.weight" and kind in ("llama-tied", "qwen2"):
            assert "output.weight" not in written
            continue
        t = written.pop(gguf_name(hub))
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and tuple(reversed(t.shape.tolist())) == tuple(w.shape)
        assert np.array_equal(np.asarray(t.data).reshape(w.shape), to_llamacpp_rows(hub, w, model.config).numpy()), hub
    assert not written
    with torch.no_grad():
        assert (load_model(path)(ids) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_merged_quantized_is_the_merged_model_rounded_as_its_type(saved_tiny, tmp_path, kind):
    """Reloaded, the file computes what the merged model computes with each 2-D weight rounded through
    the type (gguf's own dequantization of the written bytes), and the error is that of the type."""
    model = adapted(saved_tiny)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        exact = model(ids)
    weights = merged_weights(model)
    path = export_merged(model, tmp_path / "m.gguf", kind)
    reloaded = load_model(path)
    rounded = load_model(saved_tiny["llama-gqa"][1])
    with torch.no_grad():
        for hub, w in weights.items():
            if w.dim() == 2:  # rows not of whole 32-value blocks (down_proj's 48) are written F16
                raw = ggml.quantize_blocks(w, TYPES[kind]) if kind != "f16" and w.shape[-1] % 32 == 0 else None
                w = w.half().float() if raw is None else ggml.dequantize_blocks(raw, TYPES[kind]).view(w.shape)
            rounded.get_parameter(hub).copy_(w)
        got = reloaded(ids)
        assert (got - rounded(ids)).abs().max().item() <= 1e-5
        error = (got - exact).abs().max().item()
    assert error <= {"f16": 1e-2, "q8_0": 0.1, "q4_0": 1.5}[kind], error
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == {"f16": 1, "q8_0": 7, "q4_0": 2}[kind]


@pytest.mark.parametrize("kind, settings", [("llama-gqa", {}), ("llama-gqa", {"use_rslora": True}),
                                            ("llama-gqa", {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
                                            ("qwen2", {})], ids=["plain", "rslora", "patterns", "qwen2"])
def test_adapter_applied_the_llamacpp_way_gives_the_merged_weights(saved_tiny, tmp_path, kind, settings):
    """llama.cpp applies an adapter as W + alpha / r · B A on its own layout (r from each lora_a): done
    here in numpy on the exported base, it gives the exported merged model, tensor by tensor; module
    scales that differ (rsLoRA, rank and alpha patterns) are folded into B."""
    model = adapted(saved_tiny, kind, **settings)
    path = export_adapter(model, tmp_path / "a.gguf")
    base = export_merged(load_model(saved_tiny[kind][1]), tmp_path / "base.gguf", "f32")
    merged = export_merged(model, tmp_path / "merged.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    assert len(assert_gguf_lora_applies(reader, base, merged, atol=1e-6)) == 2 * 2 * 5


def test_what_llamacpp_cannot_carry_is_refused_by_name(saved_tiny, tmp_path):
    dora = adapted(saved_tiny, use_dora=True)
    with pytest.raises(ConfigError, match="q_proj: DoRA cannot be expressed in llama.cpp's adapter format"):
        export_adapter(dora, tmp_path / "a.gguf")
    torch.manual_seed(0)
    saved = load_model(saved_tiny["llama-gqa"][1])
    apply_lora(saved, ["q_proj"], r=2, alpha=4, modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match=r"modules_to_save \(lm_head\): .* export the merged model instead"):
        export_adapter(saved, tmp_path / "a.gguf")
    embedding = load_model(saved_tiny["llama-gqa"][1])
    apply_lora(embedding, ["embed_tokens"], r=2, alpha=4)
    with pytest.raises(ConfigError, match="embed_tokens: LoRA on an embedding is not in llama.cpp's adapter format"):
        export_adapter(embedding, tmp_path / "a.gguf")
    gpt2 = load_model(saved_tiny["gpt2"][1])
    apply_lora(gpt2, ["c_attn"], r=2, alpha=4)
    with pytest.raises(ConfigError, match="writes llama.cpp.s llama, qwen2, qwen3, gemma2 and gemma3 architectures .* this model is gpt2"):
        export_adapter(gpt2, tmp_path / "a.gguf")
    window = load_model(saved_tiny["mistral-window"][1])
    with pytest.warns(UserWarning, match="has no sliding window: .* sequences of up to 5 tokens"):
        export_merged(window, tmp_path / "window.gguf")
    (tmp_path / "window.gguf").unlink()
    int8 = load_model(saved_tiny["llama-gqa"][1], load_in_8bit=True)
    apply_lora(int8, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ConfigError, match="load the base in floating point|quantized"):
        export_merged(int8, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="GGUF type 'q4_k': expected one of f32, f16, q8_0, q4_0"):
        export_merged(adapted(saved_tiny), tmp_path / "m.gguf", "q4_k")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_the_old_file_whole(saved_tiny, tmp_path, monkeypatch):
    """The disk fills part-way through the new file: the old file stays whole and no partial file is left."""
    target = tmp_path / "a.gguf"
    target.write_bytes(b"the previous export")
    real_open = open

    class FullDisk:
        """A file on a disk with room for 100 more bytes: what does not fit raises ENOSPC, as write(2) does."""
        def __init__(self, file):
            self.file, self.room = file, 100

        def write(self, data):
            fits = bytes(data[:self.room])
            self.file.write(fits)
            self.room -= len(fits)
            if len(fits) < len(data):
                raise OSError(28, "No space left on device")
            return len(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

    def opener(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return FullDisk(f) if str(file).endswith(".partial") else f  # the new file, written beside the old
    monkeypatch.setattr("builtins.open", opener)
    with pytest.raises(CheckpointError, match=r"a.gguf: could not be written \(No space left on device\); nothing was replaced"):
        export_adapter(adapted(saved_tiny), target)
    assert target.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_real_smollm2_merged_keeps_its_tokenizer_and_template(smollm2_path, tmp_path):
    """From the real GGUF: the merged Q8_0 file carries the source's metadata (tokenizer, chat template),
    its tokenizer loads back equal, and its logits are the merged model's within Q8_0's error."""
    from minilora.cli import main
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.lora.peft_files import save_adapter
    torch.manual_seed(0)
    model = load_model(smollm2_path)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[1, 9690, 314, 253, 3575, 28, 2]])
    assert main(["export", str(smollm2_path), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m.gguf"),
                 "--merged", "--type", "q8_0"]) == 0
    assert main(["export", str(smollm2_path), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")]) == 0
    assert main(["export", str(smollm2_path), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")]) == 2
    source, written = load_tokenizer(smollm2_path), load_tokenizer(tmp_path / "m.gguf")
    assert written.chat_template == source.chat_template and written.tk.to_str() == source.tk.to_str()
    from minilora.lora.inject import remove_lora
    remove_lora(model, merge=True)
    with torch.no_grad():  # the merged model with every 2-D weight rounded through Q8_0, as the file holds it
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(ggml.dequantize_blocks(ggml.quantize_blocks(p, ggml.Q8_0), ggml.Q8_0).view(p.shape))
        assert (load_model(tmp_path / "m.gguf")(ids) - model(ids)).abs().max().item() <= 1e-4


def test_merged_from_a_folder_writes_the_tokenizer_llamacpp_reads(smollm2_path, tmp_path):
    """A model from a Hub-style folder: the vocabulary (padded with unused tokens to the embedding's rows,
    as llama.cpp checks), merges, token types, special ids, the pre-tokenizer's name and the chat template
    are written from its tokenizer.json, and read back they tokenize as the original does. A tokenizer
    llama.cpp would split differently is refused."""
    transformers = pytest.importorskip("transformers")
    from minilora.loading.tokenizer import load_tokenizer
    source = load_tokenizer(smollm2_path)
    config = transformers.LlamaConfig(vocab_size=49152 + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    source.save(tmp_path / "model")  # tokenizer.json + tokenizer_config.json, as a Hub folder holds them
    model, folder_tok = load_model(tmp_path / "model"), load_tokenizer(tmp_path / "model")
    path = export_merged(model, tmp_path / "m.gguf", "f32", folder_tok)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and len(fields["tokenizer.ggml.tokens"].contents()) == 49216
    assert fields["tokenizer.ggml.token_type"].contents()[-64:] == [5] * 64  # unused padding rows
    back = load_tokenizer(path)
    for text in ["Hello world, 2024!", "<|im_start|>user\nZähl bis 3<|im_end|>", "  spaces\tand\nlines 🎉"]:
        assert back.encode(text) == source.encode(text), text
    assert (back.eos_token_id, back.chat_template) == (source.eos_token_id, source.chat_template)
    from tokenizers import pre_tokenizers
    folder_tok.tk.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ConfigError, match="not byte-level BPE|pre-tokenization .* is not one written here"):
        export_merged(model, tmp_path / "other.gguf", "f32", folder_tok)


def test_export_leaves_the_model_as_it_was_and_refuses_what_llamacpp_would_misread(saved_tiny, tmp_path):
    """export_merged computes each merged weight as it writes it (the model keeps its adapter; inside
    adapter_disabled the base is written); LoRA on a tied head, NaN and fp16 overflow are refused naming
    the tensor, leaving no file; head_dim other than hidden / heads is written for llama.cpp."""
    from minilora.lora.inject import adapter_disabled, lora_modules
    model = adapted(saved_tiny)
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(ids)
        export_merged(model, tmp_path / "m.gguf", "f32")
        assert len(lora_modules(model)) == 2 * 5 and torch.equal(model(ids), before)  # 2 layers x 5 targets
        with adapter_disabled(model):
            export_merged(model, tmp_path / "base.gguf", "f32")
            assert (load_model(tmp_path / "base.gguf")(ids) - model(ids)).abs().max().item() <= 1e-5
    tied = load_model(saved_tiny["llama-tied"][1])
    apply_lora(tied, ["lm_head"], r=2, alpha=4)
    with pytest.raises(ConfigError, match="lm_head: LoRA on a head tied to the embeddings"):
        export_adapter(tied, tmp_path / "tied.gguf")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 7e4  # beyond fp16
    with pytest.raises(ConfigError, match=r"blk.0.ffn_up.weight: NaN or infinite values in F16 .*try --type f32"):
        export_merged(model, tmp_path / "f16.gguf", "f16")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"blk.0.ffn_up.weight: NaN or infinite values in F32"):
        export_merged(model, tmp_path / "nan.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "m.gguf"]  # no .partial left
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      rope_scaling={"rope_type": "default"})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    wide = load_model(tmp_path / "wide")
    fields = gguf.GGUFReader(str(export_merged(wide, tmp_path / "wide.gguf", "f32"))).fields
    assert fields["llama.attention.key_length"].contents() == fields["llama.rope.dimension_count"].contents() == 16
    with torch.no_grad():
        assert (load_model(tmp_path / "wide.gguf")(ids) - wide(ids)).abs().max().item() <= 1e-5
