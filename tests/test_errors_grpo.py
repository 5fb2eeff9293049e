"""The bad GRPO inputs each part refuses, by name: a prompt that runs past the context, num_generations
below 2, a batch that is not whole groups, an unknown reward function (before the model loads), a
reward function that raises (the run stops, nothing saved is overwritten), prompt-only records that
are malformed, prompts given to another objective and completions given to GRPO, settings of GRPO
given to another objective."""


import pytest
from conftest import lora_model, tiny_model_with_tokenizer
from test_grpo_training import write_grpo_recipe

from minilora.cli import main
from minilora.data.prompts import build_prompts
from minilora.data.records import Record, build_examples
from minilora.errors import ConfigError, DataError, TrainingError
from minilora.generate import grpo_objective
from minilora.loading.tokenizer import load_tokenizer
from minilora.recipe import load_recipe
from minilora.training.config import TrainConfig
from minilora.training.loop import train


@pytest.fixture
def tok(saved_tiny, tmp_path):
    return load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path))


def grpo_config(tmp_path, **kw):
    return TrainConfig(**{"output_dir": str(tmp_path / "run"), "objective": "grpo", "reward_funcs": ["r"],
                          "num_generations": 2, "max_completion_length": 4, "batch_size": 4, "micro_batch_size": 2,
                          "progress": False, "max_steps": 2, **kw})


def ones(prompts, completions, **kw):
    return [1.0] * len(completions)


@pytest.mark.parametrize("settings,message", [
    ({"num_generations": 1}, "num_generations must be an integer of at least 2.*got 1"),
    ({"num_generations": 4, "batch_size": 6, "micro_batch_size": 2}, "batch_size=6 is not a multiple of num_generations=4"),
    ({"temperature": 0.0}, "temperature must be a positive finite number.*all be the same"),
    ({"loss_type": "sigmoid"}, "loss_type 'sigmoid': expected one of grpo, bnpo, dr_grpo, dapo"),
    ({"beta": -0.1}, "beta must be a finite number >= 0"),
    ({"scale_rewards": "rank"}, "scale_rewards must be one of group, batch, none"),
    ({"reward_funcs": None}, "objective \"grpo\" needs reward_funcs"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights must be 1 finite numbers"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
])
def test_bad_grpo_settings_are_named(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(tmp_path, **settings)


def test_grpo_settings_belong_to_grpo(tmp_path):
    with pytest.raises(ConfigError, match="num_generations is a setting of grpo, not of objective 'dpo'"):
        TrainConfig(objective="dpo", num_generations=4)
    with pytest.raises(ConfigError, match="reward_funcs is a setting of grpo, not of objective None"):
        TrainConfig(reward_funcs=["exact_match"])
    with pytest.raises(ConfigError, match="loss_type 'dapo': expected one of sigmoid"):
        TrainConfig(objective="dpo", loss_type="dapo")


def test_a_recipes_settings_are_named_with_the_recipe(saved_tiny, tmp_path):
    recipe = write_grpo_recipe(saved_tiny, tmp_path)
    with pytest.raises(ConfigError, match=r"r.toml \[train\].*batch_size=6 is not a multiple of num_generations=4"):
        load_recipe(recipe, {"train.batch_size": "6", "train.micro_batch_size": "2"})
    with pytest.raises(ConfigError, match=r"r.toml \[train\].reward_funcs: reward function 'rewards:nothing'.*no "
                                          r"function 'nothing'"):
        load_recipe(recipe, {"train.reward_funcs": '["rewards:nothing"]'})
    with pytest.raises(ConfigError, match=r"\[train\].reward_funcs: reward function 'absent_mod:f'.*no module"):
        load_recipe(recipe, {"train.reward_funcs": '["absent_mod:f"]'})


def test_a_prompt_past_the_context_is_named_with_its_row(saved_tiny, tmp_path, capsys):
    rows = [{"prompt": "w5 w6", "bonus": "w2"}] * 8 + [{"prompt": " ".join(["w9"] * 20), "bonus": "w2"}]
    recipe = write_grpo_recipe(saved_tiny, tmp_path, data=rows)
    (tmp_path / "test.jsonl").unlink()
    text = recipe.read_text().replace('test = "test.jsonl"\n', "").replace("val_size = 4", "val_size = 0")
    recipe.write_text(text.replace("max_completion_length = 6", "max_completion_length = 2040"))
    assert main(["train", str(recipe), "--model.device", "cpu"]) == 2
    err = capsys.readouterr().err
    # the tiny Llama's context is 2048 tokens (LlamaConfig's default)
    assert "prompts.jsonl, line 9: its 20 tokens and max_completion_length=2040 run past the model's context of 2048" in err
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


def test_a_reward_function_that_raises_stops_the_run_naming_it_and_the_prompt(saved_tiny, tmp_path, tok):
    def fussy(prompts, completions, **kw):
        if any(p == "w7 w8" for p in prompts):
            raise KeyError("no score for this one")
        return [0.5] * len(completions)
    prompts = build_prompts([{"prompt": "w5"}, {"prompt": "w7 w8"}], tok)
    cfg = grpo_config(tmp_path, batch_size=2, save_every=1, max_steps=4)
    model = lora_model(saved_tiny)
    order = train.__globals__["epoch_order"](2, cfg.seed, 0)  # the prompt of step 1: w5 first or second
    with pytest.raises(TrainingError, match=r"reward function 'fussy' raised KeyError.*on prompt 'w7 w8'"):
        train(model, tok, prompts, None, cfg, objective=grpo_objective(tok, cfg, [fussy]))
    saved = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
    assert saved == ([] if order[0] == 1 else ["checkpoint-1"]) and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("record,message", [
    ({"question": "w5"}, 'needs a "prompt" \\(the record has: question\\)'),
    ({"prompt": "   "}, "the prompt is empty"),
    ({"prompt": []}, "the prompt is empty; expected text or a list of messages"),
    ({"prompt": [{"role": "robot", "content": "w5"}]}, "prompt message 1 is .*expected"),
    ({"prompt": 5}, "the prompt is int"),
])
def test_bad_prompt_records_are_named_with_their_row(tok, record, message):
    with pytest.raises(DataError, match=message) as e:
        build_prompts([{"prompt": "w5"}, Record(record, "prompts.jsonl, line 2")], tok)
    assert "prompts.jsonl, line 2" in str(e.value)
    kept = build_prompts([{"prompt": "w5"}, Record(record, "prompts.jsonl, line 2")], tok, skip_bad_rows=True)
    assert len(kept) == 1 and kept.skipped == 1


def test_prompts_and_completions_go_to_their_own_objectives(saved_tiny, tmp_path, tok):
    prompts = build_prompts([{"prompt": "w5"}, {"prompt": "w6"}], tok)
    examples = build_examples([{"text": "w5 w6 w7"}] * 2, tok, "text")
    with pytest.raises(ConfigError, match="the data are prompts without completions, but the objective is CausalLM"):
        train(lora_model(saved_tiny), tok, prompts, None, TrainConfig(output_dir=str(tmp_path / "a"), progress=False))
    cfg = grpo_config(tmp_path)
    with pytest.raises(DataError, match="GRPO samples its completions from prompts"):
        train(lora_model(saved_tiny), tok, examples, None, cfg, objective=grpo_objective(tok, cfg, [ones]))
    with pytest.raises(ConfigError, match="objective 'grpo' samples completions.*grpo_objective"):
        train(lora_model(saved_tiny), tok, prompts, None, cfg)
    with pytest.raises(ConfigError, match=r"batch_size=3 is not a multiple of num_generations=2"):
        bad = TrainConfig(output_dir=str(tmp_path / "b"), batch_size=3, micro_batch_size=1, progress=False)
        train(lora_model(saved_tiny), tok, prompts, None, bad, objective=grpo_objective(tok, cfg, [ones]))
    assert not any((tmp_path / d).exists() for d in ("a", "b", "run"))
