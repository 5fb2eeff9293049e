"""Many adapters on one base: generation throughput of mixed-adapter batches against the same requests one
adapter at a time and against a merged model per adapter, then `minilora serve`'s requests/s under a few
concurrency levels (the official openai client, threads, 127.0.0.1).

    python benchmarks/serve_throughput.py                  # SmolLM2-135M-Instruct, 4 adapters
    python benchmarks/serve_throughput.py --adapters 8 --new-tokens 32
    python benchmarks/serve_throughput.py --asset qwen2.5-0.5b   # Qwen2.5-Coder-0.5B-Instruct (its GGUF, dequantized)

The adapters are r=8 LoRAs on q_proj/v_proj with random B (what they say does not matter here, only
that each row must go through its own); every request asks for `--new-tokens` greedy tokens of one of
`--prompts` prompts, the adapters taken in turn. Writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Quote by Mae West:", "The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are", "Water boils at", "My favourite book is", "In 1969, the first"]


MODELS = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def source(asset: str) -> Path:
    from minilora.data import assets
    return {"smollm2": assets.smollm2, "qwen2.5-0.5b": assets.qwen25_05b}[asset]()


def adapters(folder: Path, k: int, asset: str = "smollm2") -> list[Path]:
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import save_adapter
    out = []
    for i in range(k):
        path = folder / f"adapter{i}"
        if not (path / "adapter_config.json").exists():
            torch.manual_seed(i)
            model = apply_lora(load_model(source(asset)), ["q_proj", "v_proj"], r=8, alpha=16)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            save_adapter(model, path)
        out.append(path)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asset", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16, help="requests in the batch comparison")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level of the server")
    args = parser.parse_args()
    import openai

    from minilora.generate import generate_ids
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.loading.weights import load_model
    from minilora.lora.adapters import set_adapter
    from minilora.lora.inject import merge_lora, unmerge_lora
    from minilora.lora.peft_files import load_adapter
    from minilora.serve_http import make_server
    RESULTS.mkdir(exist_ok=True)
    paths = adapters(RESULTS / f"serve_adapters_{args.asset}", args.adapters, args.asset)
    names = [f"adapter{i}" for i in range(args.adapters)]
    model, tokenizer = load_model(source(args.asset)), load_tokenizer(source(args.asset))
    for name, path in zip(names, paths):
        load_adapter(model, path, adapter_name=name)
    model.eval()
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.prompts)]
    rows = [names[i % len(names)] for i in range(args.prompts)]
    eos, pad, n = [tokenizer.eos_token_id], tokenizer.pad_token_id or 0, args.new_tokens

    def gen(ids, **kw):
        with torch.no_grad():
            return generate_ids(model, ids, eos, pad, n, **kw)
    gen(prompts[:2], adapter_names=rows[:2])  # warm-up
    mixed_s, mixed = timed(lambda: gen(prompts, adapter_names=rows))

    def one_at_a_time():
        out = []
        for name in names:
            set_adapter(model, name)
            out += gen([p for p, r in zip(prompts, rows) if r == name])
        return out
    single_s, single = timed(one_at_a_time)

    def merged():
        out, spent = [], 0.0
        for name in names:
            set_adapter(model, name)
            merge_lora(model)
            t, got = timed(lambda: gen([p for p, r in zip(prompts, rows) if r == name]))
            spent += t
            out += got
            unmerge_lora(model)
        return spent, out
    merged_total, (merged_s, merged_out) = timed(merged)
    set_adapter(model, names[0])
    tokens = lambda outs: sum(len(o) for o in outs)  # noqa: E731
    batch = {"mixed batch": (mixed_s, tokens(mixed)), "one adapter at a time": (single_s, tokens(single)),
             "merged model per adapter (generation only)": (merged_s, tokens(merged_out)),
             "merged model per adapter (with merge/unmerge)": (merged_total, tokens(merged_out))}
    print(f"{MODELS[args.asset]}, {args.adapters} adapters, {args.prompts} prompts x {n} greedy tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"| {'how':<46} | seconds | tokens/s |")
    print("|---|---:|---:|")
    for how, (s, t) in batch.items():
        print(f"| {how:<46} | {s:7.2f} | {t / s:8.1f} |")

    # the engine on this thread, as `minilora serve` runs it (torch on one thread: Engine.run says why)
    server = make_server(model, tokenizer, args.asset, port=0, engine_thread=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="none", max_retries=0,
                           timeout=600)

    def ask(i: int) -> int:
        out = client.completions.create(model=names[i % len(names)], prompt=PROMPTS[i % len(PROMPTS)],
                                        max_tokens=n, temperature=0)
        return out.usage.completion_tokens
    levels, engine = {}, server.engine

    def load() -> None:  # the clients, on threads; the engine stops when they are done
        try:
            ask(0)
            for level in (1, 4, 16):
                engine.batch_log = []
                with ThreadPoolExecutor(level) as pool:
                    s, counts = timed(lambda: list(pool.map(ask, range(args.requests))))
                mean = sum(len(b) for b in engine.batch_log) / len(engine.batch_log)
                levels[level] = dict(seconds=s, requests_per_s=args.requests / s, tokens_per_s=sum(counts) / s,
                                     mean_batch=mean)
        finally:
            engine.stop()
    threading.Thread(target=load, daemon=True).start()
    engine.run()
    print(f"\n| concurrency | requests/s | tokens/s | mean rows a step |   ({args.requests} requests each)")
    print("|---:|---:|---:|---:|")
    for level, r in levels.items():
        print(f"| {level} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['mean_batch']:.1f} |")
    server.shutdown()
    (RESULTS / f"serve_throughput_{args.asset}.json").write_text(json.dumps(dict(
        model=MODELS[args.asset], adapters=args.adapters, prompts=args.prompts, new_tokens=n, threads=torch.get_num_threads(),
        batch={k: dict(seconds=s, tokens=t, tokens_per_s=t / s) for k, (s, t) in batch.items()}, server=levels,
        torch=torch.__version__), indent=2) + "\n")


if __name__ == "__main__":
    main()
