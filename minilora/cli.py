"""The command line: `minilora params | ...`. Each subcommand is a small function over the Python API;
errors minilora raises on purpose are printed as one line (no traceback) with exit status 2."""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import MiniLoraError


def targets_arg(values: list[str]) -> list[str] | str:
    """`--targets q_proj v_proj` is a list of suffixes; one value with regex characters is a regex."""
    if len(values) == 1 and (values[0] == "all-linear" or any(c in values[0] for c in "*\\[]()|^$")):
        return values[0]
    return values


def cmd_params(args: argparse.Namespace) -> None:
    from .lora import apply_lora, param_report
    from .models import build_model
    from .weights import load_config
    config = load_config(args.model, revision=args.revision)
    with torch.device("meta"):  # shapes only: nothing is allocated, no weights are read
        model = build_model(config, f"{args.model} config")
        apply_lora(model, targets_arg(args.targets), r=args.r, alpha=args.alpha,
                   modules_to_save=args.modules_to_save, use_rslora=args.rslora)
    print(f"{args.model} ({config.get('model_type')}), LoRA r={args.r}, alpha={args.alpha}")
    print(param_report(model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA fine-tuning in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="LoRA parameter report from config.json alone (no weights read)")
    p.add_argument("model", help="Hub repo id, local folder or .gguf file")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                   help="module-name suffixes, one regex, or all-linear (default: q_proj v_proj)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--modules-to-save", nargs="*", default=[])
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.set_defaults(func=cmd_params)
    return parser


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
