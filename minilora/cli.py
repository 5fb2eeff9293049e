"""The command line: `minilora params | train | recipes | demo | generate | serve | classify | merge | export | push |
plot | inspect`. Each subcommand is a small function over the Python API; errors minilora raises on purpose are printed as one line (no traceback)
with exit status 2. `train` is the one place that handles SIGINT/SIGTERM (stop_on_signals)."""

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
from .errors import ConfigError, MiniLoraError
from .formats.paths import folder_size
from .generate import classify, generate, show_comparison
from .loading.tokenizer import load_tokenizer
from .loading.weights import load_config, load_model, save_model, torch_dtype
from .lora.analysis import inspect_adapter, module_kind, plot_inspection, short_kind
from .lora.config import LoRAConfig
from .lora.inject import apply_lora, remove_lora
from .lora.peft_files import adapter_classes, load_adapter
from .lora.report import memory_report, param_report
from .models import build_model
from .recipe import RECIPES, load_recipe, packaged_recipes, run_recipe
from .ship.gguf_export import export_adapter, export_merged
from .ship.hub import push_to_hub
from .training import distributed
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


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_model(args.model, dtype=torch_dtype(args.dtype), revision=args.revision)
    tokenizer = load_tokenizer(args.model, revision=args.revision)
    prompts = args.prompt
    if args.system is not None and not args.chat:
        raise ConfigError("--system is a chat setting: add --chat")
    if args.adapter:
        load_adapter(model, args.adapter)
    elif args.compare:
        raise ConfigError("--compare needs --adapter")
    if args.compare:
        show_comparison(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.seed, args.chat,
                        args.system)
        return
    outputs = generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       stop=args.stop, seed=args.seed, chat=args.chat, system=args.system)
    for prompt, out in zip(args.prompt, outputs):
        print(f"{prompt}{out}" if not args.chat else out)


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve_http import make_server
    model = load_model(args.model, dtype=torch_dtype(args.dtype), revision=args.revision)
    tokenizer = load_tokenizer(args.model, revision=args.revision)
    base = args.served_model_name or args.model
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name == base:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH, NAME not the base model's name {base!r}")
        load_adapter(model, path, adapter_name=name)
    server = make_server(model, tokenizer, base, args.host, args.port, args.api_key, args.max_batch,
                         args.batch_wait_ms / 1000)
    names = ", ".join([base, *(s.partition("=")[0] for s in args.adapter or [])])
    print(f"minilora serve: {names} on http://{args.host}:{server.server_port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_classify(args: argparse.Namespace) -> None:
    classes = adapter_classes(args.adapter) if args.adapter else {}
    model = load_model(args.model, task="classification", revision=args.revision, **classes)
    tokenizer = load_tokenizer(args.model, revision=args.revision)
    if args.adapter:
        load_adapter(model, args.adapter)
    for text, (label, p) in zip(args.texts, classify(model, tokenizer, args.texts, args.max_length, args.truncation)):
        print(f"{label}\t{p:.3f}\t{text}")


def cmd_merge(args: argparse.Namespace) -> None:
    classes = adapter_classes(args.adapter)  # a classifier's label names go into config.json
    model = load_model(args.model, dtype=torch_dtype(args.dtype) if args.dtype else None, revision=args.revision,
                       **({"task": "classification", **classes} if classes else {}))
    load_adapter(model, args.adapter)
    remove_lora(model, merge=True)
    out = save_model(model, args.out, tokenizer=load_tokenizer(args.model, revision=args.revision), overwrite=args.overwrite)
    print(f"merged model saved to {out} ({folder_size(out) / 1e6:.1f} MB): the base was loaded in floating point "
          "and merged there (never into int8 or 4-bit weights, where the update would be rounded away)")


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; give --overwrite to replace it")
    if args.type != "f32" and not args.merged:
        raise ConfigError("--type is for --merged (an adapter file is written in f32)")
    model = load_model(args.model, revision=args.revision)  # in floating point: a merge is never rounded to 4-bit
    load_adapter(model, args.adapter)
    if args.merged:
        export_merged(model, out, args.type, load_tokenizer(args.model, revision=args.revision))
        print(f"merged model written to {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type}): llama-cli -m {out}")
    else:
        export_adapter(model, out)
        print(f"adapter written to {out} ({out.stat().st_size / 1e6:.2f} MB): llama-cli -m BASE.gguf --lora {out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    base = load_model(args.base) if args.base else None  # a GGUF's blocks dequantized on load
    result = inspect_adapter(args.adapter, base, args.compare)
    with_base = base is not None
    head = f"{'module':<44} {'r':>3} {'|dW|_F':>9} {'top1':>6} {'top2':>6} {'top4':>6} {'eff.rank':>8}"
    print(head + (f" {'|UtWV|':>9} {'W top-r':>9} {'random':>9} {'ampl.':>7}" if with_base else ""))
    keys = ["norm", "top1", "top2", "top4", "effective_rank"] + \
        (["w_on_delta", "w_on_own_top", "w_on_random", "amplification"] if with_base else [])
    widths = {"norm": "9.4f", "top1": "6.3f", "top2": "6.3f", "top4": "6.3f", "effective_rank": "8.2f",
              "w_on_delta": "9.4f", "w_on_own_top": "9.4f", "w_on_random": "9.4f", "amplification": "7.2f"}
    cell = lambda k, v: f"{'n/a':>{widths[k].split('.')[0]}}" if v is None else f"{v:{widths[k]}}"
    line = lambda label, r, m: f"{label:<44} {r:>3} " + " ".join(cell(k, m[k]) for k in keys)
    kinds: dict[str, list[dict]] = {}
    for name, m in result["modules"].items():
        print(line(name, m["r"], m))
        kinds.setdefault(module_kind(name)[0], []).append(m)
    for kind, rows in kinds.items() if len(result["modules"]) > len(kinds) else ():
        known = lambda k: [r[k] for r in rows if r[k] is not None]
        mean = {k: sum(known(k)) / len(known(k)) if known(k) else None for k in keys}
        print(line(f"mean of {len(rows)} {short_kind(kind)}", rows[0]["r"] if len({r["r"] for r in rows}) == 1 else "-", mean))
    if result["use_dora"]:
        print("a DoRA adapter: the figures are of its low-rank part s·B·A; the magnitudes rescale W0 + s·B·A's rows")
    if result["skipped"]:
        print(f"not measured (LoRA on embeddings): {', '.join(result['skipped'])}")
    if result["similarity"]:
        print("\nsubspace similarity phi(A1, A2, i, j) = |U1_i^T U2_j|_F^2 / min(i, j) (paper eq. 4); rows i, columns j")
        for name, grid in result["similarity"].items():
            print(f"{name}:")
            for i, row in enumerate(grid, start=1):
                print(f"  i={i:<3} " + " ".join(f"{v:.2f}" for v in row))
    if args.plot:
        print("written: " + ", ".join(map(str, plot_inspection(result, args.plot))))


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
    for add in (add_params, add_train, add_generate, add_classify, add_merge, add_export, add_inspect, add_recipes,
                add_demo, add_plot, add_push):
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


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete prompts with a model, optionally with an adapter")
    p.add_argument("model")
    p.add_argument("--adapter", help="adapter folder (PEFT format)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--compare", action="store_true", help="print the base model's and the adapter's side by side")
    p.add_argument("--chat", action="store_true", help="each prompt a user message in the model's own chat template "
                   "(ChatML if it has none); the answer ends at the end-of-turn token")
    p.add_argument("--system", help="with --chat: a system message instead of the template's default one")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_generate)


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: one base model, many adapters, batched together")
    p.add_argument("model")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="required of every request as 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=32, help="requests generated together at most")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for others to join it")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("classify", help="label texts with a classifier (and its adapter)")
    p.add_argument("model")
    p.add_argument("texts", nargs="+")
    p.add_argument("--adapter", help="adapter folder with the trained head (modules_to_save)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--truncation", choices=["right", "left"], default="right")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_classify)


def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into the base weights and save a full model folder")
    p.add_argument("model")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--dtype", help="cast the merged weights (default: the checkpoint's own dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_merge)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an adapter (or, with --merged, the merged model) as GGUF for llama.cpp/Ollama")
    p.add_argument("model", help="the base model: a .gguf file, a folder or a Hub id (Llama architecture)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--merged", action="store_true", help="the whole model with the adapter merged in")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="the merged model's weights (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_export)


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="what an adapter learned, as the LoRA paper measures it (section 7)")
    p.add_argument("adapter", help="an adapter folder (minilora's or PEFT's)")
    p.add_argument("--base", help="the base model: also W's projection on each update's subspace, and the amplification")
    p.add_argument("--compare", help="another adapter of the same modules: the subspace similarity of their A matrices")
    p.add_argument("--plot", metavar="DIR", help="also draw singular_values.png and similarity.png, and write "
                   "inspect.json, into DIR (matplotlib: pip install 'minilora[plot]')")
    p.set_defaults(func=cmd_inspect)


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
