"""Bad model files get the project's own error naming the file, key or tensor at fault, never a raw
traceback or a silently wrong model: paths, config.json, safetensors and pickle checkpoints, GGUF files,
tokenizers, devices and dtypes (minilora/loading, minilora/formats)."""

import json
import shutil
import struct

import pytest
import torch
from conftest import copy_model, tiny_model_with_tokenizer
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_config, load_model

# ---------------------------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize("path, message", [
    pytest.param("/no/such/folder", "/no/such/folder: no such file or folder", id="folder"),
    pytest.param("model.gguf", "model.gguf: no such file or folder", id="gguf-file"),
])
def test_a_path_that_does_not_exist_is_named(path, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_an_unreachable_hub_id_says_so():
    with pytest.raises(CheckpointError, match="not a local path, and the Hugging Face Hub could not provide it"):
        load_model("no-such-user-xyz/no-such-model")


# ---------------------------------------------------------------------------------------------
# config.json: every value of the type and range its field needs

def test_a_config_missing_a_field_names_the_key_and_the_config_class(saved_tiny, tmp_path):
    folder = copy_model(saved_tiny, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing key\(s\) num_hidden_layers needed by LlamaConfig"):
        load_model(folder)


def test_a_config_that_is_not_json_is_named(saved_tiny, tmp_path):
    folder = copy_model(saved_tiny, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(folder)


@pytest.mark.parametrize("kind, change, message", [
    pytest.param("llama-gqa", dict(num_attention_heads=-4), r"num_attention_heads must be a positive integer",
                 id="negative-heads"),
    pytest.param("llama-gqa", dict(model_type="t5"), r"model_type 't5' is not supported", id="unsupported-model-type"),
    pytest.param("llama-tied", dict(tie_word_embeddings="no"), r"tie_word_embeddings must be true or false, got 'no'",
                 id="tie-word-embeddings-text"),
    pytest.param("mistral-window", dict(sliding_window=0), r"sliding_window must be a positive integer, got 0",
                 id="zero-sliding-window"),
    pytest.param("llama-gqa", dict(rms_norm_eps=-1.0), r"rms_norm_eps must be a positive finite number, got -1.0",
                 id="negative-rms-norm-eps"),
    pytest.param("llama-gqa", dict(head_dim=-8), r"head_dim must be a positive integer, got -8", id="negative-head-dim"),
    pytest.param("llama-gqa", dict(rope_theta="big"), r"rope_theta must be a number or null, got 'big'",
                 id="rope-theta-text"),
    pytest.param("llama-gqa", dict(max_position_embeddings=-1), r"max_position_embeddings must be a positive integer",
                 id="negative-max-positions"),
    pytest.param("llama-gqa", dict(hidden_act=["silu"]), r"hidden_act must be a string, got \['silu'\]",
                 id="hidden-act-list"),
    pytest.param("llama-gqa", dict(model_type=["llama"]), r"model_type \['llama'\] is not supported",
                 id="model-type-list"),
    pytest.param("llama-gqa", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                 r"rope_scaling 'llama3' needs low_freq_factor, high_freq_factor, original_max_position_embeddings",
                 id="llama3-rope-scaling-incomplete"),
    pytest.param("llama-gqa", dict(rope_scaling={"rope_type": "yarn"}), r"rope scaling type 'yarn' is not supported",
                 id="yarn-rope-scaling"),
    pytest.param("gpt2", dict(layer_norm_epsilon=None), r"layer_norm_epsilon must be set", id="null-layer-norm-epsilon"),
    pytest.param("gpt2", dict(resid_pdrop=1.5), r"resid_pdrop must be a probability in \[0, 1\], got 1.5",
                 id="dropout-above-one"),
    pytest.param("distilbert", dict(id2label=["neg", "pos"]), r"id2label must be a table or null", id="id2label-list"),
    pytest.param("bert", dict(num_labels=0), r"num_labels must be a positive integer, got 0", id="zero-num-labels"),
    pytest.param("bert", dict(id2label={"a": "x"}), r"id2label must map the class ids 0, 1, \.\.\. to names",
                 id="id2label-not-class-ids"),
])
def test_config_values_of_the_wrong_type_or_range_are_named(saved_tiny, tmp_path, kind, change, message):
    folder = copy_model(saved_tiny, tmp_path, kind, **change)
    with pytest.raises(ConfigError, match=rf"config\.json: {message}" if "model_type" not in message else message):
        load_model(folder)


def test_num_labels_disagreeing_with_id2label_is_refused(saved_tiny):
    with pytest.raises(ConfigError, match=r"num_labels=3 agree with it"):
        load_model(saved_tiny["bert"][1], num_labels=3, id2label={0: "a", 1: "b"})


# ---------------------------------------------------------------------------------------------
# Checkpoint files: safetensors, shards, pickles

def test_a_truncated_safetensors_file_is_named(saved_tiny, tmp_path):
    folder = copy_model(saved_tiny, tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file, truncated or corrupt"):
        load_model(folder)


def test_a_shard_missing_from_the_index_is_named(saved_tiny, tmp_path):
    hf, _ = saved_tiny["gpt2"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in the index is missing"):
        load_model(tmp_path / "sharded")


def test_a_shard_outside_the_checkpoint_folder_is_refused(saved_tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = copy_model(saved_tiny, tmp_path)
    save_file(load_file(str(folder / "model.safetensors")), str(tmp_path / "elsewhere.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard 'elsewhere\.safetensors' lies outside the checkpoint's folder"):
        load_model(folder)


@pytest.mark.parametrize("damage, message", [
    pytest.param("shape", r"not a readable safetensors file, truncated or corrupt \(tensor w runs past the end",
                 id="tensor-past-the-end"),
    pytest.param("weight_map", r"expected a weight_map object of tensor name -> shard file name", id="bad-weight-map"),
])
def test_odd_checkpoint_files_are_named(saved_tiny, tmp_path, damage, message):
    folder = copy_model(saved_tiny, tmp_path)
    if damage == "shape":
        header = json.dumps({"w": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 8]}}).encode()
        (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_a_checkpoint_mixing_float_dtypes_loads_in_one_dtype(saved_tiny, tmp_path):
    """One float64 tensor among float32 ones: with dtype=None every tensor takes the first one's dtype."""
    from safetensors.torch import load_file, save_file
    folder = copy_model(saved_tiny, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].double()
    save_file(state, str(folder / "model.safetensors"))
    model = load_model(folder, dtype=None)
    assert len({p.dtype for p in model.parameters()}) == 1
    assert model(torch.tensor([[1, 2, 3]])).isfinite().all()


@pytest.mark.parametrize("header, message", [
    pytest.param(b"[1, 2, 3]", r"the header is a JSON list, not an object", id="header-a-list"),
    pytest.param(b'{"w": {"dtype": "F32", "shape": [2]}}',
                 r"tensor w: expected dtype, shape \(non-negative integers\) and data_offsets", id="no-data-offsets"),
    pytest.param(b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', r"tensor w: expected dtype, shape",
                 id="negative-shape"),
    pytest.param(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', r"tensor w: expected dtype, shape",
                 id="offsets-backwards"),
    pytest.param(b'{"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}',
                 r"tensor w has dtype Q9, which is not supported", id="unknown-dtype"),
    pytest.param(json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(),
                 r"tensors a and b share bytes", id="tensors-sharing-bytes"),
])
def test_crafted_safetensors_headers_are_named_errors(tmp_path, header, message):
    from minilora.formats.safetensors import safetensors_tensors
    file = tmp_path / "x.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        list(safetensors_tensors(file))


def test_a_checkpoint_of_another_architecture_names_the_missing_and_unexpected_keys(saved_tiny, tmp_path):
    folder = copy_model(saved_tiny, tmp_path)
    shutil.copy(saved_tiny["gpt2"][1] / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match LlamaForCausalLM: missing keys: .*unexpected keys: "
                                              r"transformer\..*another architecture"):
        load_model(folder)


def test_a_shape_mismatch_names_the_key_and_both_shapes(saved_tiny, tmp_path):
    folder = copy_model(saved_tiny, tmp_path, "gpt2", vocab_size=98)
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer.wte.weight: checkpoint \(97, 32\) vs model \(98, 32\)"):
        load_model(folder)


def bin_checkpoint(saved_tiny, tmp_path):
    """A copy of the tiny Llama with its weights as pytorch_model.bin (plain tensors) instead of safetensors."""
    from safetensors.torch import load_file
    folder = copy_model(saved_tiny, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_pickle_checkpoint_of_plain_tensors_loads(saved_tiny, tmp_path):
    load_model(bin_checkpoint(saved_tiny, tmp_path))  # plain tensors: fine under weights_only=True


def test_a_pickle_checkpoint_that_would_run_code_is_refused(saved_tiny, tmp_path):
    folder = bin_checkpoint(saved_tiny, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        load_model(folder)


def norm_weight_replaced(saved_tiny, tmp_path, value):
    """A copy of the tiny Llama whose model.norm.weight is `value(the weight)`."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "m"
    shutil.copytree(saved_tiny["llama-gqa"][1], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = value(state["model.norm.weight"])
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_a_weight_that_is_not_floating_point_is_refused_by_name(saved_tiny, tmp_path):
    folder = norm_weight_replaced(saved_tiny, tmp_path, lambda w: w.long())
    with pytest.raises(CheckpointError, match=r"m: tensor model\.norm\.weight is torch\.int64, where a "
                                              r"floating-point weight belongs"):
        load_model(folder)


def test_a_weight_holding_nan_is_refused_by_name(saved_tiny, tmp_path):
    folder = norm_weight_replaced(saved_tiny, tmp_path, lambda w: torch.full_like(w, float("nan"), dtype=torch.float32))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds NaN or infinite values"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------
# GGUF files

def gguf_bytes(kvs: list[bytes], n_tensors: int = 0) -> bytes:
    """A GGUF v3 header by hand: magic, version, tensor count, key/value count, then the key/values."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize("read", [pytest.param(load_model, id="load_model"), pytest.param(load_config, id="load_config")])
def test_a_file_that_is_not_gguf_is_named(tmp_path, read):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="fake.gguf: not a GGUF file"):
        read(fake)


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda p: p.write_bytes(b""), r"x\.gguf: not a GGUF file \(too short\)", id="empty-file"),
    pytest.param(lambda p: p.mkdir(), r"x\.gguf: not a GGUF file \(a folder\)", id="a-folder"),
])
def test_an_empty_gguf_or_a_folder_is_not_a_gguf_file(tmp_path, make, message):
    from minilora.formats.gguf import read_gguf
    make(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match=message):
        read_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("kvs, message", [
    pytest.param([kv("general.alignment", 4, (0).to_bytes(4, "little"))],
                 r"general\.alignment is 0, expected a positive integer", id="zero-alignment"),
    pytest.param([kv("big", 9, (4).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little"))],
                 r"GGUF header is truncated or corrupt at byte \d+ \(an array of 1099511627776 elements",
                 id="huge-array"),
    pytest.param([kv("deep", 9, b"".join((9).to_bytes(4, "little") + (1).to_bytes(8, "little") for _ in range(6))
                     + (4).to_bytes(4, "little") + (0).to_bytes(8, "little"))], r"nests arrays deeper than 4",
                 id="deeply-nested-arrays"),
    pytest.param([kv("name", 8, (1 << 50).to_bytes(8, "little"))], r"truncated or corrupt at byte \d+ \(a string of",
                 id="huge-string"),
])
def test_crafted_gguf_metadata_is_a_named_error(tmp_path, kvs, message):
    from minilora.formats.gguf import read_gguf
    (tmp_path / "x.gguf").write_bytes(gguf_bytes(kvs))
    with pytest.raises(CheckpointError, match=message):
        read_gguf(tmp_path / "x.gguf")


def test_a_gguf_naming_a_tensor_twice_is_refused(tmp_path):
    from minilora.formats.gguf import read_gguf
    tensor = lambda name: struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IQIQ", 1, 32, 0, 0)
    (tmp_path / "t.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + tensor("token_embd.weight") * 2)
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd\.weight' appears twice"):
        read_gguf(tmp_path / "t.gguf")


def gguf_with_zero_heads_and_no_merges(tmp_path):
    u32 = lambda v: struct.pack("<I", v)
    text = lambda s: struct.pack("<Q", len(s)) + s.encode()
    header = [kv("general.architecture", 8, text("llama")), kv("llama.attention.head_count", 4, u32(0)),
              kv("llama.embedding_length", 4, u32(64)), kv("tokenizer.ggml.model", 8, text("gpt2")),
              kv("tokenizer.ggml.tokens", 9, u32(8) + struct.pack("<Q", 2) + text("a") + text("b"))]
    (tmp_path / "x.gguf").write_bytes(gguf_bytes(header))
    return tmp_path / "x.gguf"


def test_gguf_metadata_with_zero_heads_is_a_named_error(tmp_path):
    with pytest.raises(ConfigError, match=r"x\.gguf: GGUF metadata llama\.attention\.head_count is 0, expected a positive int"):
        load_config(gguf_with_zero_heads_and_no_merges(tmp_path))


def test_a_gguf_bpe_tokenizer_without_merges_is_a_named_error(tmp_path):
    from minilora.loading.tokenizer import load_tokenizer
    with pytest.raises(CheckpointError, match=r"x\.gguf: GGUF metadata has no tokenizer\.ggml\.merges list of strings"):
        load_tokenizer(gguf_with_zero_heads_and_no_merges(tmp_path))


# ---------------------------------------------------------------------------------------------
# Tokenizers

def test_an_eos_token_missing_from_the_vocabulary_is_refused(saved_tiny, tmp_path):
    from minilora.loading.tokenizer import load_tokenizer
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(CheckpointError, match=r"eos_token '<nope>' is not a token of this tokenizer's vocabulary"):
        load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------
# Devices and dtypes

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_named(saved_tiny):
    with pytest.raises(ConfigError, match=r"device: 'cuda', but this machine has 0 CUDA device\(s\)"):
        load_model(saved_tiny["llama-gqa"][1], device="cuda")


@pytest.mark.parametrize("dtype, message", [
    pytest.param("half-ish", r"dtype: unknown dtype 'half-ish'; use one of float32, fp32", id="unknown-name"),
    pytest.param(torch.int8, r"dtype: unknown dtype torch\.int8", id="integer-torch-dtype"),
])
def test_an_odd_dtype_is_named(saved_tiny, dtype, message):
    with pytest.raises(ConfigError, match=message):
        load_model(saved_tiny["llama-gqa"][1], dtype=dtype)


def test_a_dtype_may_be_given_by_its_short_name(saved_tiny):
    assert load_model(saved_tiny["llama-gqa"][1], dtype="bf16").lm_head.weight.dtype == torch.bfloat16
