"""A short LoRA run of the real SmolLM2-135M on real quotes (Debian fortunes): the held-out loss falls
and the fine-tuned model keeps the `Quote by X: "..."` format and stops, where the base model does not."""

import re

from minilora.generate import generate_ids
from minilora.lora.inject import adapter_disabled
from minilora.recipe import RECIPES, load_recipe, run_recipe

RECIPE = RECIPES / "quotes_smollm2.toml"
QUOTE = re.compile(r'^ "[^"]+"$')


def format_kept(model, tok, prompts, max_new_tokens=60):
    new = generate_ids(model, [tok.encode(p) for p in prompts], [tok.eos_token_id], tok.pad_token_id, max_new_tokens)
    return sum(len(ids) < max_new_tokens and QUOTE.match(tok.decode(ids)) is not None for ids in new)


def test_short_lora_run_on_real_quotes(smollm2_path, quotes_path, tmp_path):
    recipe = load_recipe(RECIPE, overrides={
        "model.name": str(smollm2_path), "data.train": str(quotes_path), "data.limit": "128",
        "data.val_size": "32", "lora.targets": '["q_proj", "v_proj"]', "train.output_dir": str(tmp_path),
        "train.lr": "2e-3", "train.eval_every": "100", "train.save_every": "100", "train.progress": "false"})
    model, tok, result = run_recipe(recipe)
    assert not result.stopped_early
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.2, evals  # held-out loss, before vs after
    prompts = [f"Quote by {a}:" for a in ["Mark Twain", "Oscar Wilde", "Voltaire", "Mae West", "Confucius", "Woody Allen"]]
    with adapter_disabled(model):
        before = format_kept(model, tok, prompts)
    after = format_kept(model, tok, prompts)
    assert after >= 5 and after > before + 2, (before, after)
    assert (result.adapter_dir / "adapter_model.safetensors").stat().st_size < 3_000_000  # tiny next to 538 MB
