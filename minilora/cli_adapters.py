"""The subcommands that use a model with its adapters: `minilora generate | serve | classify | merge | export |
inspect`. Each is a cmd_ function over the Python API and an add_ function that adds its arguments to the
parser cli.py builds (which also runs them and prints their errors). `serve` is cmd_serve and add_serve."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from .errors import ConfigError
from .formats.paths import folder_size
from .generate import classify, generate, show_comparison
from .loading.tokenizer import load_tokenizer
from .loading.weights import load_model, save_model, torch_dtype
from .lora.analysis import inspect_adapter, module_kind, plot_inspection, short_kind
from .lora.inject import remove_lora
from .lora.peft_files import adapter_classes, load_adapter
from .ship.gguf_export import export_adapter, export_merged


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
                         args.batch_wait_ms / 1000, engine_thread=False)
    names = ", ".join([base, *(s.partition("=")[0] for s in args.adapter or [])])
    print(f"minilora serve: {names} on http://{args.host}:{server.server_port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    threading.Thread(target=server.serve_forever, name="minilora-http", daemon=True).start()
    try:
        server.engine.run()  # on this thread, the one that loaded the model (Engine.run says why)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
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


# ---------------------------------------------------------------------------------------------
# Their parsers: one function per subcommand, each adding its arguments and its cmd_ function

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


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: one base model, many adapters, batched together")
    p.add_argument("model")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="required of every request as 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=32, help="requests generated together at most")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="from idle, how long the first request waits for others to join its batch")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_serve)


def add_classify(sub: argparse._SubParsersAction) -> None:
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
