"""The longest sequence one LoRA step trains within a memory budget: minilora against transformers + peft,
both with gradient checkpointing, on real models, in bf16 autocast.

    python benchmarks/long_context.py                                # SmolLM2-135M and Qwen2.5-Coder-0.5B, 8 GiB
    python benchmarks/long_context.py --models smollm2 --budget-gib 4

One step is a forward and backward pass over one sequence of T random tokens, every token a target,
LoRA r=8 alpha=16 on every linear projection but the head. minilora: gradient checkpointing, the fused
head loss (the (T, vocab) logits never exist at once), the frozen weights cast to bf16 once. peft:
`gradient_checkpointing_enable(use_reentrant=False)` and transformers' own loss. Each trial runs in a
process of its own, and a watchdog thread there ends it the moment its resident memory passes the
budget (so a trial that would swap costs seconds, not minutes). The peak counts everything the process
held, loading included.

The search: T doubles from `--start` while the step fits; then the memory measured at the two longest
lengths that fit gives the slope (memory grows about linearly in T: the attention runs in SDPA's flash
kernel, which holds no (T, T) scores, and checkpointing keeps one block's activations at a time), the
length that slope predicts for the budget is tried, then the halves between the longest fit and the
shortest miss, 3 trials in all (to 256 tokens). Resident memory is what a user sees, allocator and all:
glibc keeps freed blocks of up to 32 MB for reuse, so the peak moves by a few hundred MB from one
length to the next, on both sides alike.
A trial that runs past `--trial-timeout` seconds ends the search at the last length that fitted
(marked "time-capped"). Writes benchmarks/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}
OVER = 3  # the exit code of a trial that passed the budget


def rss() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def peak() -> int:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def watchdog(budget: int) -> None:
    def watch():
        while True:
            if rss() > budget:
                print(json.dumps({"over": True, "rss": rss()}), flush=True)
                os._exit(OVER)
            time.sleep(0.02)
    threading.Thread(target=watch, daemon=True).start()


def worker(side: str, gguf: str, folder: str, T: int, budget: int) -> dict:
    watchdog(budget)
    import torch
    torch.manual_seed(0)
    started = time.perf_counter()
    ids = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(1))
    if side == "minilora":
        import contextlib

        from minilora.kernels import frozen_weights_in
        from minilora.loading.weights import load_model
        from minilora.lora.inject import apply_lora
        from minilora.training.gradients import set_gradient_checkpointing
        from minilora.training.objectives.causal_lm import causal_lm_loss
        model = apply_lora(load_model(folder), LINEAR, r=8, alpha=16)  # the same safetensors as peft's
        set_gradient_checkpointing(model, True)
        model.train()
        held = contextlib.ExitStack()
        held.enter_context(frozen_weights_in(model, torch.bfloat16))
        loaded = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            loss = loss / n
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR))
        model.train()
        loaded = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return dict(side=side, T=T, loss=float(loss.detach()), peak_rss=peak(), load_s=loaded - started,
                step_s=time.perf_counter() - loaded)


def trial(side: str, gguf: str, folder: str, T: int, budget: int, timeout: float) -> dict:
    """One step at length T in its own process: its figures, {"over": True}, or {"timeout": True}."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", side, "--gguf", gguf, "--folder", folder,
                               "--T", str(T), "--budget", str(budget)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"T": T, "timeout": True}
    if proc.returncode not in (0, OVER):
        raise SystemExit(f"{side} at T={T} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"T": T, **json.loads(proc.stdout.strip().splitlines()[-1])}


def longest(side: str, gguf: str, folder: str, budget: int, start: int, timeout: float, say) -> dict:
    fits, tried = [], []

    def run(T: int) -> dict:
        r = trial(side, gguf, folder, T, budget, timeout)
        tried.append(r)
        say(f"  {side} T={T}: " + ("over the budget" if r.get("over") else "time cap" if r.get("timeout") else
                                   f"{r['peak_rss'] / 2 ** 30:.2f} GiB, step {r['step_s']:.0f} s"))
        if not r.get("over") and not r.get("timeout"):
            fits.append(r)
        return r
    T = start
    while True:
        r = run(T)
        if r.get("over") or r.get("timeout"):
            break
        T *= 2
    capped, over = bool(r.get("timeout")), (T if r.get("over") else None)
    if not capped and over is not None and len(fits) >= 2:  # the slope's guess, then halves between fit and miss
        (a, b) = fits[-2:]
        slope = (b["peak_rss"] - a["peak_rss"]) / (b["T"] - a["T"])
        guess = int(b["T"] + (budget - b["peak_rss"]) / slope) // 256 * 256 if slope > 0 else 0
        for _ in range(3):
            lo = max(f["T"] for f in fits)
            if over - lo <= 256:
                break
            guess = guess if lo < guess < over else (lo + over) // 2 // 256 * 256
            r = run(guess)
            if r.get("timeout"):
                capped = True
                break
            if r.get("over"):
                over = guess
            guess = 0
    best = max(fits, key=lambda f: f["T"]) if fits else None
    return dict(longest=best["T"] if best else 0, at_longest=best, time_capped=capped, trials=tried)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--start", type=int, default=1024)
    parser.add_argument("--trial-timeout", type=float, default=1800.0)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--gguf")
    parser.add_argument("--folder")
    parser.add_argument("--T", type=int)
    parser.add_argument("--budget", type=int)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.gguf, args.folder, args.T, args.budget)))
        return
    import torch

    from minilora.data import assets
    from minilora.loading.weights import load_model, save_model
    budget = int(args.budget_gib * 2 ** 30)
    say = lambda s: print(s, flush=True)  # noqa: E731
    out = dict(budget_gib=args.budget_gib, threads=torch.get_num_threads(), torch=torch.__version__, models={})
    for name in args.models:
        gguf = str({"smollm2": assets.smollm2, "qwen2.5-0.5b": assets.qwen25_05b}[name]())
        folder = RESULTS / "models" / f"{name}-hf"
        if not (folder / "config.json").exists():
            save_model(load_model(gguf), folder)  # the GGUF's weights dequantized, for peft's side
        say(f"{MODELS[name]}, budget {args.budget_gib:g} GiB")
        sides = ["minilora"] + ([] if args.no_peft else ["peft"])
        out["models"][name] = {s: longest(s, gguf, str(folder), budget, args.start, args.trial_timeout, say)
                               for s in sides}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_context.json").write_text(json.dumps(out, indent=2) + "\n")
    say("\n| model | minilora longest T | peak RSS | step (s) | peft longest T | peak RSS | step (s) | ratio |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, sides in out["models"].items():
        cells = []
        for s in ("minilora", "peft"):
            r = sides.get(s)
            if r is None or r["at_longest"] is None:
                cells += ["-", "-", "-"]
                continue
            mark = " (time-capped)" if r["time_capped"] else ""
            cells += [f"{r['longest']}{mark}", f"{r['at_longest']['peak_rss'] / 2 ** 30:.2f} GiB",
                      f"{r['at_longest']['step_s']:.0f}"]
        ratio = (f"{sides['minilora']['longest'] / sides['peft']['longest']:.1f}x"
                 if "peft" in sides and sides["peft"]["longest"] else "-")
        say(f"| {MODELS[name]} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
