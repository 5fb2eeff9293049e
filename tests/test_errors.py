"""Bad input gives one clear error naming the problem, never a traceback from deep inside torch."""

import json
import shutil

import pytest

from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_config, load_model


def copy_of(saved_tiny, kind, tmp_path):
    dest = tmp_path / kind
    shutil.copytree(saved_tiny[kind][1], dest)
    return dest


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="/no/such/folder: no such file or folder"):
        load_model("/no/such/folder")
    with pytest.raises(CheckpointError, match="model.gguf: no such file or folder"):
        load_model("model.gguf")


def test_unreachable_hub_id_says_so():
    with pytest.raises(CheckpointError, match="not a local path, and the Hugging Face Hub could not provide it"):
        load_model("no-such-user-xyz/no-such-model")


def test_truncated_safetensors(saved_tiny, tmp_path):
    folder = copy_of(saved_tiny, "llama-gqa", tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file, truncated or corrupt"):
        load_model(folder)


def test_missing_shard(saved_tiny, tmp_path):
    hf, _ = saved_tiny["gpt2"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in the index is missing"):
        load_model(tmp_path / "sharded")


def test_config_missing_a_field(saved_tiny, tmp_path):
    folder = copy_of(saved_tiny, "llama-gqa", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing key\(s\) num_hidden_layers needed by LlamaConfig"):
        load_model(folder)


def test_config_bad_values(saved_tiny, tmp_path):
    folder = copy_of(saved_tiny, "llama-gqa", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": -4}))
    with pytest.raises(ConfigError, match="num_attention_heads must be a positive integer"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(ConfigError, match="model_type 't5' is not supported"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(folder)


def test_checkpoint_of_another_architecture(saved_tiny, tmp_path):
    folder = copy_of(saved_tiny, "llama-gqa", tmp_path)
    shutil.copy(saved_tiny["gpt2"][1] / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match LlamaForCausalLM: missing keys: .*unexpected keys: "
                                              r"transformer\..*another architecture"):
        load_model(folder)


def test_shape_mismatch_names_the_key(saved_tiny, tmp_path):
    folder = copy_of(saved_tiny, "gpt2", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 98}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer.wte.weight: checkpoint \(97, 32\) vs model \(98, 32\)"):
        load_model(folder)


def test_pickle_checkpoint_needs_weights_only(saved_tiny, tmp_path):
    import torch
    folder = copy_of(saved_tiny, "llama-gqa", tmp_path)
    from safetensors.torch import load_file
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    load_model(folder)  # plain tensors: fine under weights_only=True

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        load_model(folder)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="fake.gguf: not a GGUF file"):
        load_model(fake)
    with pytest.raises(CheckpointError, match="fake.gguf: not a GGUF file"):
        load_config(fake)
