"""The command line: `params` against published parameter counts; `train`, `generate`, `merge` on a tiny model."""

import json
import subprocess
import sys

import pytest

from minilora.cli import main

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def test_params_7b_config_alone(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))  # no weights in the folder at all
    assert main(["params", str(tmp_path), "--targets", "q_proj", "v_proj", "--r", "8", "--alpha", "16"]) == 0
    out = capsys.readouterr().out
    # PEFT's print_trainable_parameters for Llama-2-7B with r=8 on q_proj, v_proj:
    assert "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622" in out
    assert "model.layers.*.self_attn.q_proj                   32     4096x4096   8   16,777,216           65,536" in out


def test_params_gpt2_medium_preset(capsys):
    assert main(["params", "gpt2-medium", "--targets", "c_attn", "--r", "4", "--alpha", "32"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 393,216 || all params: 355,216,384" in out


def test_cli_error_is_one_line_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    proc = subprocess.run([sys.executable, "-m", "minilora", "params", str(tmp_path), "--targets", "qq_proj"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("minilora params: error: LoRA target 'qq_proj' matches no linear module")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "minilora", "params", str(tmp_path), "--r", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "rank r must be a positive integer, got r=0" in proc.stderr


def tiny_model_with_tokenizer(saved_tiny, tmp_path):
    """The tiny Llama folder plus a word-level tokenizer.json over its 97 ids."""
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path / "tiny"
    shutil.copytree(saved_tiny["llama-gqa"][1], folder)
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 97)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<eos>"])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return folder


RECIPE = """
[model]
name = "{model}"
[lora]
targets = ["q_proj", "v_proj"]
r = 4
alpha = 8
[data]
train = "{data}"
template = {{ prompt = "{{author}} says", response = " {{quote}}" }}
cutoff = 16
val_size = 4
[train]
output_dir = "{out}"
max_steps = 4
micro_batch_size = 2
batch_size = 4
lr = 1e-2
save_every = 2
progress = false
[generate]
prompts = ["w5 says", "w9 says"]
max_new_tokens = 4
"""


def write_recipe(saved_tiny, tmp_path, **fields):
    model = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    rows = [{"author": f"w{2 + i % 5}", "quote": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(5))} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = RECIPE.format(model=model, data=tmp_path / "data.jsonl", out=tmp_path / "run")
    for key, value in fields.items():
        text = text.replace(key, value)
    (tmp_path / "r.toml").write_text(text)
    return tmp_path / "r.toml", model


def test_train_generate_merge_from_the_command_line(saved_tiny, tmp_path, capsys):
    recipe, model = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe), "--train.max_steps", "6", "--lora.r=2"]) == 0
    out = capsys.readouterr().out
    assert "adapter saved to" in out and "base model" in out and "with the adapter" in out
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(l["step"] for l in lines) == 6                   # the override took
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2
    assert main(["generate", str(model), "--adapter", str(tmp_path / "run" / "adapter"), "--prompt", "w5 says",
                 "--compare", "--max-new-tokens", "3"]) == 0
    assert "=== w5 says" in capsys.readouterr().out
    assert main(["merge", str(model), str(tmp_path / "run" / "adapter"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()


@pytest.mark.parametrize("change, message", [
    (("max_steps = 4", "max_step = 4"), r"\[train\]: unknown key 'max_step'"),
    (("lr = 1e-2", 'lr = "fast"'), r"\[train\].lr: expected float, got str 'fast'"),
    (("r = 4", "r = 0"), "rank r must be a positive integer"),
    (("[generate]", "[generation]"), r"unknown section\(s\) generation"),
    (("cutoff = 16", "cutoff = 16\ncutof = 3"), r"\[data\]: unknown key 'cutof'"),
])
def test_bad_recipes_name_the_key(saved_tiny, tmp_path, capsys, change, message):
    import re
    recipe, _ = write_recipe(saved_tiny, tmp_path, **{change[0]: change[1]})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_tokenizer_of_another_model_and_cutoff_beyond_the_context(saved_tiny, tmp_path, capsys):
    import re
    from tokenizers import Tokenizer
    recipe, model = write_recipe(saved_tiny, tmp_path, **{"cutoff = 16": "cutoff = 5000"})
    assert main(["train", str(recipe)]) == 2
    assert re.search(r"\[data\].cutoff: 5000 tokens is longer than the model's context of 2048", capsys.readouterr().err)
    tk = Tokenizer.from_file(str(model / "tokenizer.json"))
    tk.add_tokens([f"extra{i}" for i in range(10)])
    tk.save(str(model / "tokenizer.json"))
    recipe.write_text(recipe.read_text().replace("cutoff = 5000", "cutoff = 16"))
    assert main(["train", str(recipe)]) == 2
    assert "the tokenizer has 107 tokens but the model's embeddings only 97 rows" in capsys.readouterr().err
