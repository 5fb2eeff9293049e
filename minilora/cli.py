"""The command line: `minilora params | train | recipes | demo | generate | serve | classify | merge | export | push |
plot | inspect`. Each subcommand is a small function over the Python API; errors minilora raises on purpose are printed as one line (no traceback)
with exit status 2. `train` is the one place that handles SIGINT/SIGTERM (stop_on_signals).

Here: the parser, main(), and the subcommands that train or look at runs and configs (params, train, recipes,
demo, plot, push). Those that use a model with its adapters (generate, serve, classify, merge, export,
inspect) are in cli_adapters.py."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__, demo
from .cli_adapters import add_classify, add_export, add_generate, add_inspect, add_merge, add_serve
from .errors import ConfigError, MiniLoraError
from .formats.paths import folder_size
from .generate import show_comparison
from .loading.weights import load_config
from .lora.config import LoRAConfig
from .lora.inject import apply_lora
from .lora.report import memory_report, param_report
from .models import build_model
from .recipe import RECIPES, load_recipe, load_trained, packaged_recipes, run_recipe
from .ship.hub import push_to_hub
from .training import distributed, fsdp
from .training.plots import plot_run


def targets_arg(values: list[str]) -> list[str] | str:
    """`--targets q_proj v_proj` is a list of suffixes; one value with regex characters is a regex."""
    if len(values) == 1 and (values[0] == "all-linear" or any(c in values[0] for c in "*\\[]()|^$")):
        return values[0]
    return values


def cmd_params(args: argparse.Namespace) -> None:
    config = load_config(args.model, revision=args.revision)
    if args.num_labels is not None:
        if args.task != "classification":
            raise ConfigError("--num-labels is for --task classification")
        config = {**config, "num_labels": args.num_labels, "id2label": None}
    with torch.device("meta"):  # shapes only: nothing is allocated, no weights are read
        model = build_model(config, f"{args.model} config", "classification" if args.task == "classification" else None)
        apply_lora(model, targets_arg(args.targets), r=args.r, alpha=args.alpha,
                   modules_to_save=args.modules_to_save, use_rslora=args.rslora, use_dora=args.dora)
    print(f"{args.model} ({config.get('model_type')}), {'DoRA' if args.dora else 'LoRA'} r={args.r}, alpha={args.alpha}")
    print(param_report(model))
    print()
    print(memory_report(model))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """While the block runs, SIGINT/SIGTERM ask training to stop: it finishes the current step, saves a
    checkpoint and returns. A second signal interrupts at once. Yields the should_stop() that train()
    asks; the previous handlers come back on exit. (In a thread other than the main one, signals
    cannot be handled there: nothing is installed.)"""
    requested = False

    def handle(signum, frame) -> None:
        nonlocal requested
        if requested:  # a second signal: stop now
            raise KeyboardInterrupt
        requested = True
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread
        pass
    try:
        yield lambda: requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_train(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, overrides=parse_overrides(args.overrides))
    try:
        model, tokenizer, result = run_recipe(recipe, stop_on_signals)
        main = distributed.is_main()
    except BaseException:
        distributed.shutdown(wait=False)  # the other ranks may never get here
        raise
    distributed.shutdown()
    if not main:  # rank 0 reports for all; the others end here
        end_worker_process()
    if result.stopped_early:
        print("stopped on request; resume with --train.resume_from_checkpoint latest")
        return
    print(f"adapter saved to {result.adapter_dir} ({folder_size(result.adapter_dir) / 1e6:.2f} MB)")
    if recipe.generate.prompts and recipe.data.task != "classification":
        if fsdp.left_sharded(model):  # too big to gather whole on every rank; the other ranks have ended
            print("loading the base and the trained adapter in this process for the samples")
            del model
            model, tokenizer = load_trained(recipe, result.adapter_dir)
        show_comparison(model, tokenizer, recipe.generate.prompts, recipe.generate.max_new_tokens,
                        recipe.generate.temperature, chat=recipe.generate.chat, system=recipe.generate.system)


def end_worker_process() -> None:
    """End a torchrun worker (rank > 0) now, without the interpreter's clean-up: about one gloo worker
    in twenty aborted there (SIGABRT, "terminate called without an active exception") after a complete
    run, which failed the whole torchrun. A worker writes no files; its output is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["--train.lr", "1e-4", "--data.limit=100"] -> {"train.lr": "1e-4", "data.limit": "100"}"""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument {item!r}: overrides look like --section.key value")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"override {item} has no value")
            value, i = items[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def cmd_recipes(args: argparse.Namespace) -> None:
    for name, path in packaged_recipes().items():
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
        print(f"{name:<22} {first}")
    print(f"\nminilora train NAME [--section.key value ...] runs one; they are in {RECIPES}")


def cmd_demo(args: argparse.Namespace) -> None:
    demo.main(stop_on_signals)


def cmd_plot(args: argparse.Namespace) -> None:
    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run}: no metrics.jsonl here; give a training run's output_dir")
    written = plot_run(run)
    if not written:
        raise ConfigError(f"{run / 'metrics.jsonl'}: fewer than two losses to draw")
    print("written: " + ", ".join(map(str, written)))
    if len(written) == 1:
        print("loss.png as well: pip install matplotlib")


def cmd_push(args: argparse.Namespace) -> None:
    url = push_to_hub(args.folder, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed {args.folder} to {args.repo_id} with a model card: {url}")


# ---------------------------------------------------------------------------------------------
# The parser: one function per subcommand, each adding its arguments and its cmd_ function

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA fine-tuning in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_params, add_train, add_generate, add_serve, add_classify, add_merge, add_export, add_inspect,
                add_recipes, add_demo, add_plot, add_push):  # generate ... inspect: cli_adapters.py
        add(sub)
    return parser


def add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="LoRA parameter report from config.json alone (no weights read)")
    p.add_argument("model", help="Hub repo id, local folder or .gguf file")
    defaults = LoRAConfig()
    p.add_argument("--targets", "--target-modules", nargs="+", default=defaults.targets,
                   help=f"module-name suffixes, one regex, or all-linear (default: {' '.join(defaults.targets)})")
    p.add_argument("--r", type=int, default=defaults.r)
    p.add_argument("--alpha", "--lora-alpha", type=float, default=defaults.alpha)
    p.add_argument("--modules-to-save", nargs="*", default=[])
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output row besides A and B")
    p.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm",
                   help="classification: the model with its classifier head (list it in --modules-to-save to train it)")
    p.add_argument("--num-labels", type=int, help="with --task classification: the classes")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.set_defaults(func=cmd_params)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA as a TOML recipe says")
    p.add_argument("recipe", help="a recipe .toml file, or the name of a packaged one (minilora recipes lists them)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value, e.g. --train.lr 1e-4")
    p.set_defaults(func=cmd_train)


def add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the recipes that ship with minilora (minilora train NAME runs one)")
    p.set_defaults(func=cmd_recipes)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the offline demo: LoRA on the real SmolLM2 and real quotes, before and after")
    p.set_defaults(func=cmd_demo)


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss, eval loss and learning rate (loss.svg; loss.png with matplotlib)")
    p.add_argument("run", help="the run's output_dir (where metrics.jsonl is)")
    p.set_defaults(func=cmd_plot)


def add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload an adapter (or merged model) folder to the Hugging Face Hub with a model card")
    p.add_argument("folder", help="e.g. runs/quotes-smollm2/adapter (its run folder's metrics go into the card)")
    p.add_argument("repo_id", help="user-or-org/name; created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="the commit message")
    p.set_defaults(func=cmd_push)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MiniLoraError as e:
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
