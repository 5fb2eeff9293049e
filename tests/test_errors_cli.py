"""Bad command-line arguments get one line, `minilora COMMAND: error: ...`, exit status 2 and no
traceback; a second run into a folder holding a finished one is refused unless asked (minilora/cli.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import copy_model, digests, tiny_model_with_tokenizer, write_recipe
from minilora.cli import main


@pytest.mark.parametrize("argv, message", [
    pytest.param(["generate", "{model}", "--prompt", "w5", "--stop", ""], "stop strings must be non-empty text",
                 id="generate-empty-stop"),
    pytest.param(["classify", "{bert}", "w5 w6", "--max-length", "-5"],
                 "max_length must be a positive number of tokens, got -5", id="classify-negative-max-length"),
    pytest.param(["generate", "{model}", "--prompt", "w5", "--temperature", "-1"],
                 "temperature must be a finite number >= 0", id="generate-negative-temperature"),
    pytest.param(["params", "{model}", "--targets", "q_proj["], "is not a valid regular expression",
                 id="params-bad-target-regex"),
])
def test_command_line_bad_arguments_are_one_line(saved_tiny, tmp_path, argv, message):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    bert = copy_model(saved_tiny, tmp_path, "bert")
    shutil.copy(folder / "tokenizer.json", bert / "tokenizer.json")
    argv = [a.format(model=folder, bert=bert) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "minilora", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"minilora {argv[0]}: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_command_line_refuses_a_catastrophic_target_regex_without_hanging(saved_tiny):
    proc = subprocess.run([sys.executable, "-m", "minilora", "params", str(saved_tiny["llama-gqa"][1]), "--targets",
                           "(a+)+b"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "repeats a repetition" in proc.stderr


def test_a_world_size_without_a_process_group_is_named(saved_tiny, tmp_path):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "minilora", "train", str(recipe)], capture_output=True, text=True,
                          env={**env, "WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 2 and "WORLD_SIZE=2 but the process group cannot form" in proc.stderr


def test_the_command_line_refuses_a_second_fresh_run_and_keeps_the_first(saved_tiny, tmp_path, capsys):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    before = digests(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoint-2, checkpoint-4, adapter)" in err and "--train.overwrite_output_dir true" in err
    assert digests(tmp_path / "run") == before


def test_the_command_line_overwrites_a_finished_run_when_asked(saved_tiny, tmp_path):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    assert main(["train", str(recipe), "--train.overwrite_output_dir", "true", "--lora.r", "2"]) == 0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2
