"""Packing on the quotes demo: target tokens per second of one pass over the same examples, unpacked
(micro-batches of 8 examples padded to the longest) and packed (micro-batches of 8 rows of `cutoff`
tokens, examples laid end to end), with the demo's model, LoRA and settings.

    python benchmarks/packing.py                 # the demo's quotes, cutoff 96
    python benchmarks/packing.py --data chat     # the chat recipe's Alpaca conversations, cutoff 256

Both passes compute the summed loss over exactly the same targets, so the two sums must agree (to
fp32 rounding in fp32, to bf16's in bf16); the figure is forward + backward time, no optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def one_pass(model, data, micro_batch_size, bf16) -> tuple[float, int, float, int]:
    """(summed loss, target tokens, seconds, padded positions) of forward + backward over `data` in order."""
    from minilora.data.batching import collate
    from minilora.training.objectives.causal_lm import causal_lm_loss
    total, count, padded = 0.0, 0, 0
    start = time.perf_counter()
    for i in range(0, len(data), micro_batch_size):
        batch = collate(data[i:i + micro_batch_size], pad_id=0)
        padded += int((batch["attention_mask"] == 0).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = causal_lm_loss(model, batch)
        loss.backward()
        total, count = total + loss.item(), count + n
    return total, count, time.perf_counter() - start, padded


def main() -> None:
    from minilora import hardware
    from minilora.data import assets
    from minilora.data.batching import pack
    from minilora.data.records import build_examples, read_records
    from minilora.kernels import frozen_weights_in
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    p = argparse.ArgumentParser()
    p.add_argument("--data", choices=["quotes", "chat"], default="quotes")
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    args = p.parse_args()
    torch.manual_seed(0)
    gguf = assets.smollm2()
    model, tok = load_model(gguf), load_tokenizer(gguf)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=8, alpha=16)
    if args.data == "quotes":
        rows, template, cutoff = read_records(assets.quotes_jsonl())[:args.examples], "quotes", 96
    else:
        rows, template, cutoff = read_records(assets.alpaca_chat())[:args.examples], None, 256
    data = build_examples(rows, tok, template, cutoff=cutoff)
    packed = pack(data, cutoff)
    bf16 = hardware.use_bf16("auto", torch.device("cpu")) if args.dtype == "auto" else args.dtype == "bf16"
    print(f"{args.data}: {len(data)} examples of {sum(len(e.input_ids) for e in data) / len(data):.0f} tokens on "
          f"average -> {len(packed)} packed rows of up to {cutoff}; {'bf16 autocast' if bf16 else 'fp32'}, "
          f"micro-batches of {args.micro_batch_size}")
    with frozen_weights_in(model, torch.bfloat16) if bf16 else contextlib.nullcontext():
        one_pass(model, data[:args.micro_batch_size * 2], args.micro_batch_size, bf16)  # warm-up
        results = {name: one_pass(model, d, args.micro_batch_size, bf16) for name, d in (("unpacked", data),
                                                                                       ("packed", packed))}
    print(f"{'':<10} {'summed loss':>12} {'targets':>8} {'padded positions':>17} {'seconds':>8} {'target tok/s':>13}")
    for name, (total, count, seconds, padded) in results.items():
        print(f"{name:<10} {total:>12.3f} {count:>8} {padded:>17} {seconds:>8.1f} {count / seconds:>13.0f}")
    (a, _, ta, _), (b, _, tb, _) = results.values()
    print(f"packed / unpacked target tokens/s: {ta / tb:.2f}x; summed losses differ by {abs(a - b) / abs(a):.1e} (relative)")


if __name__ == "__main__":
    main()
