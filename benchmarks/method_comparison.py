"""LoRA's variants side by side on one real model and one real task, offline, on this machine:

    python benchmarks/method_comparison.py                 # every method, then peft's where it has one
    python benchmarks/method_comparison.py --steps 20 --methods "LoRA r8" "PiSSA r8"   # a quick look

The model is SmolLM2-135M-Instruct (its Q4_1 GGUF from the package index, dequantized to fp32; the
GGUF row keeps the blocks); the task the arithmetic questions made here (asset:arithmetic: "What is
417 + 385?", "What is 47 * 8?"), learned as chat turns whose answer is "<answer>802</answer>". Every
method gets the same budget: the same `--steps` optimizer steps over the same batches (8 conversations
each, seed 0), AdamW with 4 warm-up steps then constant, LoRA on every linear layer but the head
(r=8 alpha=16 unless the row says otherwise; LoftQ alpha=8, as its start equals W only at scale 1).

Per method: trainable parameters, the peak resident memory of its process (the higher of the peak while
loading and the peak while training; what the benchmark holds for its own figures in between is not
counted, on either side), the
median seconds per step after two warm-up steps, the held-out loss on the 64 test questions, their
exact-answer score (greedy, the answer inside the tags equal to the truth), and the LoRA paper's §7
summary of what was learned: the mean effective rank (exp of the entropy of the normalized singular
values) of each adapted layer's update ΔW = W_after - W_before (for PiSSA, OLoRA and LoftQ, whose
adapters start non-zero, the change, not s·B A). transformers + peft (+ bitsandbytes for NF4) run the
same steps on the same batches for the methods they have, timed the same way (their held-out figures
are not computed: the point is their time and memory beside ours). Each run is its own process.
Writes benchmarks/results/method_comparison.json and benchmarks/method_comparison.svg.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, WARMUP, TEST = 8, 4, 64
# name: (LoRA settings over r=8 alpha=16, TrainConfig settings, the base, lr); peft: what it calls the same
METHODS = {
    "LoRA r8": ({}, {}, "float", 5e-4),
    "LoRA r32": ({"r": 32, "alpha": 64}, {}, "float", 5e-4),
    "rsLoRA r32": ({"r": 32, "alpha": 16, "use_rslora": True}, {}, "float", 5e-4),
    "DoRA r8": ({"use_dora": True}, {}, "float", 5e-4),
    "PiSSA r8": ({"init_lora_weights": "pissa"}, {}, "float", 5e-4),
    "OLoRA r8": ({"init_lora_weights": "olora"}, {}, "float", 5e-4),
    "LoRA+ r8": ({}, {"loraplus_lr_ratio": 16.0}, "float", 5e-4),
    "LoRA-FA r8": ({}, {"optim": "lorafa"}, "float", 5e-4),
    "QLoRA r8 (NF4)": ({}, {}, "nf4", 5e-4),
    "LoftQ r8 (NF4)": ({"alpha": 8, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
                       {}, "float", 5e-4),
    "LoRA r8 (GGUF blocks)": ({}, {}, "gguf", 5e-4),
    "full fine-tuning": (None, {}, "float", 5e-5),
}
PEFT_HAS = [m for m in METHODS if m not in ("LoftQ r8 (NF4)", "LoRA r8 (GGUF blocks)")]  # peft's LoftQ needs CUDA


def task(tokenizer, steps: int):
    """(training examples for `steps` batches, held-out examples, held-out prompts' ids, answers)."""
    from minilora.data.assets import arithmetic
    from minilora.data.chat import tokenize_conversation
    from minilora.data.records import Example, read_records
    train_file, test_file = arithmetic()

    def example(record):
        ids, learned = tokenize_conversation(tokenizer, [*record["prompt"], {"role": "assistant",
                                                                            "content": f"<answer>{record['answer']}</answer>"}])
        return Example(ids, [i if keep else -100 for i, keep in zip(ids, learned)])
    train_rows, test_rows = read_records(str(train_file)), read_records(str(test_file))[:TEST]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True),
                                add_special_tokens=False) for r in test_rows]
    return ([example(r) for r in train_rows[:steps * BATCH]], [example(r) for r in test_rows], prompts,
            [str(r["answer"]) for r in test_rows])


def adapted(model, peft: bool = False) -> dict:
    """{name: the layer's effective weight W (+ s·B A), fp32} of every linear layer LoRA targets here."""
    import torch
    out = {}
    for name, m in model.named_modules():
        if not name.endswith(tuple(LINEAR)) or not hasattr(m, "weight"):
            continue
        if hasattr(m, "base_weight"):  # a minilora LoRA layer (its base dequantized)
            w = m.base_weight().float() + (m.delta_weight().float() if m.active else 0)
        elif isinstance(m, torch.nn.Linear):
            w = m.weight.float()
        else:
            continue
        out[name] = w.detach().clone()
    return out


def worker(method: str, side: str, gguf: str, folder: str, steps: int) -> dict:
    import torch
    torch.manual_seed(0)
    lora, train_settings, base, lr = METHODS[method]
    from minilora.loading.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(gguf)
    train_data, test_data, prompts, answers = task(tokenizer, steps)
    from minilora.data.batching import collate
    batches = [collate(train_data[i * BATCH:(i + 1) * BATCH], tokenizer.pad_token_id) for i in range(steps)]
    if side == "minilora":
        model, optimizer = minilora_model(method, lora, train_settings, base, lr, gguf, folder)
        from minilora.training.objectives.causal_lm import causal_lm_loss

        def loss_of(batch):
            loss, n = causal_lm_loss(model, batch)
            return loss / n
    else:
        model, optimizer = peft_model(method, lora, train_settings, base, lr, folder)

        def loss_of(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_peak, before_file = peak_rss(), Path(tempfile.mkdtemp()) / "before.pt"
    if side == "minilora":  # the weights before, for the held-out figures: on disk, not in the memory measured
        torch.save(adapted(model), before_file)
        gc.collect()
    reset_peak_rss()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    model.train()
    times, losses, start = [], [], time.perf_counter()
    for batch in batches:
        t = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    row = dict(method=method, side=side, trainable=trainable, steps=steps, train_s=time.perf_counter() - start,
               step_s=sorted(times[2:])[len(times[2:]) // 2], first_loss=losses[0], last_loss=losses[-1])
    row.update(load_peak_rss=load_peak, train_peak_rss=peak_rss(), peak_rss=max(load_peak, peak_rss()))
    if side == "minilora":
        row.update(held_out(model, tokenizer, test_data, prompts, answers, torch.load(before_file, mmap=True)))
    return row


def peak_rss() -> int:
    """The process's peak resident memory so far (bytes): Linux's VmHWM."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def reset_peak_rss() -> None:
    """Start VmHWM again from the current resident memory (Linux: 5 written to clear_refs), so that what the
    benchmark itself holds between loading and training (the weights before, ours only) is not counted."""
    Path("/proc/self/clear_refs").write_text("5")


def minilora_model(method, lora, train_settings, base, lr, gguf, folder):
    import torch

    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.training.config import TrainConfig
    from minilora.training.optimizers import freeze_for, make_optimizer
    model = load_model(gguf if base == "gguf" else folder, load_in_4bit=base == "nf4", keep_quantized=base == "gguf")
    if lora is None:  # full fine-tuning: every weight trains (the tied embeddings and head once)
        for p in model.parameters():
            p.requires_grad_(True)
        return model, torch.optim.AdamW([p for p in model.parameters()], lr=lr)
    apply_lora(model, LINEAR, **{"r": 8, "alpha": 16, **lora})
    cfg = TrainConfig(lr=lr, **train_settings)
    freeze_for(model, cfg)
    return model, make_optimizer(model, cfg)


def peft_model(method, lora, train_settings, base, lr, folder):
    import torch
    import transformers
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32) if base == "nf4" else None
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant,
                                                           device_map="cpu" if quant else None)
    if lora is None:
        return hf, torch.optim.AdamW(hf.parameters(), lr=lr)
    from peft import LoraConfig, get_peft_model
    settings = {"r": 8, "alpha": 16, **lora}
    model = get_peft_model(hf, LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], target_modules=LINEAR,
                                          use_rslora=settings.get("use_rslora", False),
                                          use_dora=settings.get("use_dora", False),
                                          init_lora_weights=settings.get("init_lora_weights", True)))
    if "loraplus_lr_ratio" in train_settings:
        from peft.optimizers import create_loraplus_optimizer
        return model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
                                                loraplus_lr_ratio=train_settings["loraplus_lr_ratio"])
    if train_settings.get("optim") == "lorafa":
        from peft.optimizers import create_lorafa_optimizer
        return model, create_lorafa_optimizer(model, r=settings["r"], lora_alpha=settings["alpha"], lr=lr)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def held_out(model, tokenizer, test_data, prompts, answers, before) -> dict:
    """The held-out loss, the exact-answer score (greedy), and the mean effective rank of the updates."""
    import torch

    from minilora.data.chat import end_of_turn_ids
    from minilora.generate import generate_ids
    from minilora.lora.analysis import spectrum
    from minilora.training.evaluate import evaluate
    from minilora.training.rewards import exact_match
    model.eval()
    loss = evaluate(model, test_data, tokenizer.pad_token_id)["eval_loss"]
    with torch.no_grad():
        new = generate_ids(model, prompts, end_of_turn_ids(tokenizer), tokenizer.pad_token_id, max_new_tokens=16)
    completions = [tokenizer.decode(ids) for ids in new]
    exact = sum(exact_match(prompts, completions, answers)) / len(answers)
    after = adapted(model)
    ranks = [spectrum(after[n] - before[n])["effective_rank"] for n in before]
    return dict(held_out_loss=loss, exact=exact, effective_rank=sum(ranks) / len(ranks),
                sample=completions[0])


def run(method: str, side: str, gguf: str, folder: str, steps: int) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--worker", method, "--side", side, "--gguf", gguf,
                           "--folder", folder, "--steps", str(steps)], capture_output=True, text=True)
    if proc.returncode:
        print(f"{method} ({side}): failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def svg(rows: dict, file: Path) -> None:
    """Held-out loss (bars) and exact-answer score (text) per method, as a small hand-written SVG."""
    names = list(rows)
    top = max(r["held_out_loss"] for r in rows.values()) * 1.1
    height, bar = 40 + 26 * len(names), 300
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="760" height="{height}" font-family="sans-serif" '
             'font-size="12">', '<text x="10" y="18" font-weight="bold">held-out loss after the same steps '
             '(shorter is better); exact-answer score, s/step, peak RSS</text>']
    for i, name in enumerate(names):
        r, y = rows[name], 34 + 26 * i
        width = bar * r["held_out_loss"] / top
        parts += [f'<text x="10" y="{y + 14}">{name}</text>',
                  f'<rect x="170" y="{y}" width="{width:.1f}" height="18" fill="#4878a8"/>',
                  f'<text x="{176 + width:.1f}" y="{y + 14}">{r["held_out_loss"]:.3f}   exact {r["exact"]:.2f}   '
                  f'{r["step_s"]:.2f} s   {r["peak_rss"] / 2 ** 30:.2f} GiB</text>']
    file.write_text("\n".join(parts + ["</svg>"]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--peft-steps", type=int, default=8, help="peft's steps: enough for a median step time")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--update", action="store_true", help="keep the other methods' rows of the last run")
    parser.add_argument("--worker")
    parser.add_argument("--side")
    parser.add_argument("--gguf")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.side, args.gguf, args.folder, args.steps)))
        return
    import torch

    from minilora.data import assets
    from minilora.loading.weights import load_model, save_model
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}: expected some of {list(METHODS)}")
    RESULTS.mkdir(exist_ok=True)
    gguf = str(assets.smollm2())
    folder = RESULTS / "models" / "smollm2-hf"
    if not (folder / "config.json").exists():
        save_model(load_model(gguf), folder)  # the GGUF's weights dequantized, for the float and NF4 rows and peft
    started, rows, peft = time.perf_counter(), {}, {}
    for method in args.methods:
        row = run(method, "minilora", gguf, str(folder), args.steps)
        if row:
            rows[method] = row
            print(f"{method}: loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, held-out {row['held_out_loss']:.3f}, "
                  f"exact {row['exact']:.3f}, {row['step_s']:.2f} s/step; {row['sample']!r}", flush=True)
    for method in [] if args.no_peft else [m for m in args.methods if m in PEFT_HAS]:
        row = run(method, "peft", gguf, str(folder), args.peft_steps)
        if row:
            peft[method] = row
    total = time.perf_counter() - started
    previous = RESULTS / "method_comparison.json"
    if args.update and previous.exists():  # a rerun of some methods: the other rows stay as they were
        old = json.loads(previous.read_text())
        rows, peft = {**old["minilora"], **rows}, {**old["peft"], **peft}
        rows = {m: rows[m] for m in METHODS if m in rows}
        total += old["total_s"]
    print(f"\nSmolLM2-135M-Instruct, asset:arithmetic, {args.steps} steps of {BATCH} conversations, "
          f"{torch.get_num_threads()} threads; the whole run {total / 60:.1f} min")
    print(f"| method | trainable | peak RSS | s/step | held-out loss | exact ({TEST}) | eff. rank ΔW | "
          f"peft s/step | peft peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        p = peft.get(method)
        theirs = f"{p['step_s']:.2f} | {p['peak_rss'] / 2 ** 30:.2f} GiB" if p else "- | -"
        print(f"| {method} | {r['trainable'] / 1e6:.2f} M | {r['peak_rss'] / 2 ** 30:.2f} GiB | {r['step_s']:.2f} | "
              f"{r['held_out_loss']:.3f} | {r['exact']:.3f} | {r['effective_rank']:.2f} | {theirs} |")
    out = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", task="asset:arithmetic", steps=args.steps,
               batch=BATCH, threads=torch.get_num_threads(), total_s=total, minilora=rows, peft=peft,
               torch=torch.__version__)
    (RESULTS / "method_comparison.json").write_text(json.dumps(out, indent=2) + "\n")
    if rows:
        svg(rows, HERE / "method_comparison.svg")


if __name__ == "__main__":
    main()
