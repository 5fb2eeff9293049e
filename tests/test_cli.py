"""`minilora params` from config.json alone, against published parameter counts."""

import json
import subprocess
import sys

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
