"""Bad recipe files and values get one line naming the section and key at fault (exit status 2),
before anything is loaded or written (minilora/recipe.py, `minilora train RECIPE`)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import copy_model, tiny_model_with_tokenizer, write_recipe
from minilora.cli import main


@pytest.mark.parametrize("change, message", [
    pytest.param(('template = { prompt = "{author} says"', 'template = { prompt = "{author says"'),
                 r"\[data\]: template: template prompt '\{author says': expected '\}' before end of string",
                 id="template-unclosed-brace"),
    pytest.param(('template = { prompt = "{author} says"', 'template = { prompt = "{0} says"'),
                 r"\[data\]: template: template prompt '\{0\} says': \{0\} is not a field name",
                 id="template-positional-field"),
    pytest.param(('[lora]\n', '[lora]\ntargets = "q_proj["\n'),
                 r"\[lora\]: LoRA target regex 'q_proj\[' is not a valid regular expression", id="lora-targets-bad-regex"),
    pytest.param(('[model]\n', '[model]\ndevice = "gpu"\n'), r"\[model\]: device: 'gpu' is not a device torch knows",
                 id="model-device-unknown"),
    pytest.param(('[model]\n', '[model]\ndtype = "float64x"\n'), r"\[model\]: dtype: unknown dtype 'float64x'",
                 id="model-dtype-unknown"),
    pytest.param(('[generate]\n', '[generate]\ntemperature = -1.0\n'),
                 r"\[generate\]: temperature must be a finite number >= 0", id="generate-negative-temperature"),
    pytest.param(('cutoff = 16', 'cutoff = 0'), r"\[data\]: cutoff: expected a positive number, got 0", id="data-zero-cutoff"),
])
def test_bad_recipe_values_are_named_before_anything_loads(saved_tiny, tmp_path, capsys, change, message):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    text = recipe.read_text()
    if change[0].startswith("[lora]"):
        text = text.replace('targets = ["q_proj", "v_proj"]\n', "")
    assert change[0] in text, change
    recipe.write_text(text.replace(change[0], change[1], 1))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    pytest.param(('train = "', 'train = "" #'), r"\[data\]: train: empty", id="empty-train-path"),
    pytest.param(("max_new_tokens = 4", "max_new_tokens = 100000"),
                 r"\[generate\]\.max_new_tokens: 100000 tokens after a prompt of \d+ run past the model's context of 2048",
                 id="max-new-tokens-past-the-context"),
])
def test_recipe_values_that_would_fail_later_are_refused_before_training(saved_tiny, tmp_path, capsys, change, message):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    recipe.write_text(recipe.read_text().replace(*change))
    assert main(["train", str(recipe)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_is_named(saved_tiny, tmp_path, capsys):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    recipe.write_bytes("[model]\nname = \"caf\xe9\"\n".encode("latin-1"))
    assert main(["train", str(recipe)]) == 2
    assert "not valid TOML in UTF-8" in capsys.readouterr().err


def test_a_folder_given_as_the_recipe_is_named(saved_tiny, tmp_path, capsys):
    write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(tmp_path)]) == 2
    assert "a folder, not a recipe file" in capsys.readouterr().err


def test_a_recipe_truncation_other_than_right_left_or_none_is_refused(saved_tiny, tmp_path):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    recipe.write_text(recipe.read_text().replace("cutoff = 16", 'cutoff = 16\ntruncation = "middle"'))
    proc = subprocess.run([sys.executable, "-m", "minilora", "train", str(recipe)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "truncation: expected right, left or none, got 'middle'" in proc.stderr


def test_a_classifier_whose_fresh_head_would_stay_untrained_is_refused(saved_tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    folder = copy_model(saved_tiny, tmp_path, "distilbert")
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if "classifier" not in k}
    save_file(state, str(folder / "model.safetensors"))  # a bare encoder: the head starts fresh
    shutil.copy(tiny_model_with_tokenizer(saved_tiny, tmp_path) / "tokenizer.json", folder / "tokenizer.json")
    rows = [{"text": f"w{5 + i % 7} w{9 + i % 5}", "label": str(i % 2)} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.toml").write_text(f'[model]\nname = "{folder}"\n[lora]\ntargets = ["q_lin"]\n[data]\n'
                                     f'train = "{tmp_path / "d.jsonl"}"\ntask = "classification"\ncutoff = 8\n'
                                     f'[train]\noutput_dir = "{tmp_path / "run"}"\nmax_steps = 1\nprogress = false\n')
    assert main(["train", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert "[lora].modules_to_save: the classification head starts untrained" in err and "pre_classifier, classifier" in err
