"""The command line: `params` against published parameter counts; `train`, `generate`, `merge` on a tiny model."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_recipe
from minilora.cli import main, stop_on_signals
from minilora.training.checkpoint import checkpoint_folders

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
    (("lr = 1e-2", 'lr = "fast"'), r"\[train\]: lr must be a number, got 'fast'"),
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


def test_stop_on_signals_asks_once_then_interrupts_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as should_stop:
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before kill() returns
        assert should_stop()
        with pytest.raises(KeyboardInterrupt):  # a second signal: stop now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_sigint_during_cli_training_saves_a_checkpoint_and_resume_finishes(saved_tiny, tmp_path):
    recipe, _ = write_recipe(saved_tiny, tmp_path, **{"max_steps = 4": "max_steps = 400", "save_every = 2": "save_every = 1000"})
    proc = subprocess.Popen([sys.executable, "-m", "minilora", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and \
            sum('"loss"' in line for line in (metrics.read_text().splitlines() if metrics.exists() else [])) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped on request; resume with --train.resume_from_checkpoint latest" in out
    (latest,) = checkpoint_folders(tmp_path / "run")  # saved at the step it stopped after, not at save_every
    step = int(latest.name.split("-")[1])
    assert 3 <= step < 400 and not (tmp_path / "run" / "adapter").exists()
    assert main(["train", str(recipe), "--train.resume_from_checkpoint", "latest", "--train.max_steps", "400"]) == 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 401))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_version(capsys):
    import minilora
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"minilora {minilora.__version__}"


def test_a_run_folder_given_as_the_adapter_points_to_its_adapter(saved_tiny, tmp_path, capsys):
    recipe, model = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["generate", str(model), "--adapter", str(tmp_path / "run"), "--prompt", "w5 says"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'}: a training run's folder, not an adapter: its adapter is {tmp_path / 'run' / 'adapter'}" in err
    assert "checkpoint-4" in err


def test_params_sizes_a_classifier(saved_tiny, capsys):
    folder = saved_tiny["bert"][1]
    assert main(["params", str(folder), "--task", "classification", "--num-labels", "5", "--targets", "query",
                 "--modules-to-save", "classifier"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"classifier \(trained in full\) +165\n", out)  # 32 x 5 + 5: the classes asked for
    assert main(["params", str(folder), "--num-labels", "5"]) == 2


def test_a_run_draws_its_loss_and_plot_redraws_it(saved_tiny, tmp_path, capsys):
    """Each run ends with loss.svg beside metrics.jsonl (loss, eval loss, learning rate; no plotting
    library needed); `minilora plot RUN` draws it again, and loss.png where matplotlib is installed."""
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    svg = (tmp_path / "run" / "loss.svg").read_text()
    assert svg.startswith("<svg") and {"<title>loss</title>", "<title>eval_loss</title>", "<title>lr</title>"} <= \
        set(re.findall(r"<title>\w+</title>", svg))
    (tmp_path / "run" / "loss.svg").unlink()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.svg").exists()
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err
