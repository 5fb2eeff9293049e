"""A LoRA training step with the frozen base held each way: fp32, bf16, int8, NF4, and (from a GGUF file)
its own blocks; side by side with transformers + peft + bitsandbytes (load_in_8bit / load_in_4bit).

    python benchmarks/quant_step.py --model smollm2       # the real SmolLM2-135M (its Q4_1 GGUF)
    python benchmarks/quant_step.py --model gpt2-medium   # random weights in gpt2-medium's shapes

LoRA r=8 on q_proj/v_proj (c_attn for GPT-2), micro-batch 8 x 128, AdamW; each configuration in its
own process (its peak RSS is its own), `--rounds` times (3), the order of the sides reversed every other
round. Prints the median step time after two warm-up steps (the median round), tokens/s, the ratio to
the float step of the same dtype, and the peak RSS. In bf16, minilora's frozen float weights are cast
once, as train() casts them (kernels.frozen_weights_in). With `--paired`, each NF4 and GGUF side also runs
beside the float side in one process, their steps alternated: "paired" is the median of those per-pair
ratios (4 x --steps steps each), the steadier figure on a shared machine. Writes
benchmarks/results/quant_step_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ["minilora fp32", "minilora bf16", "minilora int8", "minilora nf4", "minilora nf4 bf16", "minilora gguf",
         "minilora gguf bf16", "peft+bnb 8bit", "peft+bnb 4bit", "peft+bnb 4bit bf16"]


def model_source(name: str, tmp: Path) -> tuple[str, str]:
    """(minilora's source, a transformers folder with the same float weights)."""
    import torch

    from minilora.loading.weights import load_model, save_model
    if name == "smollm2":
        from minilora.data import assets
        gguf = str(assets.smollm2())
        folder = tmp / "smollm2-hf"
        if not folder.exists():
            save_model(load_model(gguf), folder)
        return gguf, str(folder)
    folder = tmp / "gpt2-medium-random"
    if not folder.exists():
        from minilora.models import build_model
        cfg = dict(model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        from minilora.models.common import Provenance
        model.provenance = Provenance("random", folder, "safetensors", None, {**cfg, "architectures": ["GPT2LMHeadModel"]})
        save_model(model, folder)
    return str(folder), str(folder)


def prepare(side: str, source: str, hf_folder: str, batch: int, seq: int):
    """One side's model, LoRA'd, and a function that runs one training step on a fixed batch."""
    import torch
    torch.manual_seed(0)
    bf16 = side.endswith("bf16") or side == "minilora bf16"
    gpt2 = "gpt2" in hf_folder
    targets = ["c_attn"] if gpt2 else ["q_proj", "v_proj"]
    held = []
    if side.startswith("minilora"):
        from minilora.loading.weights import load_model
        from minilora.lora.inject import apply_lora
        from minilora.training.objectives.causal_lm import causal_lm_loss
        kind = side.split()[1]
        path = source if kind == "gguf" else (hf_folder if not source.endswith(".gguf") or kind != "fp32" else source)
        model = load_model(path, load_in_8bit=kind == "int8", load_in_4bit=kind == "nf4", keep_quantized=kind == "gguf")
        apply_lora(model, targets, r=8, alpha=16)
        vocab = model.config.vocab_size
        if bf16:  # as train() does: the frozen float weights cast to bf16 once (a reference kept: a context
            from minilora.kernels import frozen_weights_in  # left to the garbage collector would undo it)
            held.append(frozen_weights_in(model, torch.bfloat16))
            held[-1].__enter__()

        def loss_of(ids):
            loss, n = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            return loss / n
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        four = "4bit" in side
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=four, load_in_8bit=not four, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, quantization_config=quant, device_map="cpu")
        model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
        vocab = hf.config.vocab_size

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        assert all(held)  # kept alive with the step
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def worker(side: str, source: str, hf_folder: str, steps: int, batch: int, seq: int) -> dict:
    step_of = prepare(side, source, hf_folder, batch, seq)
    times = [step_of() for _ in range(steps)]
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    step = sorted(times[2:])[len(times[2:]) // 2]
    return dict(side=side, step_s=step, tokens_per_s=batch * seq / step, peak_rss=hwm)


def paired(side: str, source: str, hf_folder: str, steps: int, batch: int, seq: int) -> dict:
    """`side` and minilora's float side of its dtype in one process, their steps alternated (which goes
    first swapped each time): the median of the per-pair ratios float / side, which a slow spell of a
    shared machine moves far less than it moves times measured minutes apart in separate processes."""
    float_side = "minilora bf16" if "bf16" in side else "minilora fp32"
    steps_of = {float_side: prepare(float_side, source, hf_folder, batch, seq), side: prepare(side, source, hf_folder, batch, seq)}
    times: dict[str, list[float]] = {float_side: [], side: []}
    for i in range(steps):
        for name in ((float_side, side) if i % 2 else (side, float_side)):
            times[name].append(steps_of[name]())
    ratios = sorted(a / b for a, b in zip(times[float_side][2:], times[side][2:]))
    return dict(side=side, paired_ratio=ratios[len(ratios) // 2], pairs=len(ratios))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "gpt2-medium"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sides", nargs="*", default=SIDES)
    parser.add_argument("--rounds", type=int, default=3, help="each side run this many times, the sides' order "
                        "alternating between rounds; the median round is reported")
    parser.add_argument("--paired", action="store_true", help="also each quantized minilora side against the "
                        "float one in one process, steps alternated (the paired ratio)")
    parser.add_argument("--worker")
    parser.add_argument("--worker-paired")
    parser.add_argument("--source")
    parser.add_argument("--hf")
    args = parser.parse_args()
    if args.worker or args.worker_paired:
        work = worker if args.worker else paired
        print(json.dumps(work(args.worker or args.worker_paired, args.source, args.hf, args.steps, args.batch, args.seq)))
        return
    import torch

    from minilora.hardware import matmul_is_fast
    fast_bf16 = matmul_is_fast(torch.bfloat16, "cpu")
    RESULTS.mkdir(exist_ok=True)
    source, hf_folder = model_source(args.model, RESULTS / "models")
    sides = [side for side in args.sides if (fast_bf16 or "bf16" not in side)
             and ("gguf" not in side or source.endswith(".gguf"))]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):  # interleaved, so that a slow spell of a shared machine hits every side
        for side in (sides if r % 2 == 0 else sides[::-1]):
            proc = subprocess.run([sys.executable, __file__, "--worker", side, "--source", source, "--hf", hf_folder,
                                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{side}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})")
                continue
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = {side: sorted(rs, key=lambda row: row["step_s"])[len(rs) // 2] for side, rs in runs.items() if rs}
    for side, row in rows.items():
        row["rounds_s"] = [round(x["step_s"], 3) for x in runs[side]]
    print(f"LoRA step, {args.model}, micro-batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    if args.paired:
        for side in rows:
            if side.startswith("minilora") and side.split()[1] in ("nf4", "gguf"):
                proc = subprocess.run([sys.executable, __file__, "--worker-paired", side, "--source", source, "--hf",
                                       hf_folder, "--steps", str(4 * args.steps), "--batch", str(args.batch),
                                       "--seq", str(args.seq)], capture_output=True, text=True)
                if proc.returncode == 0:
                    rows[side]["paired_ratio"] = json.loads(proc.stdout.strip().splitlines()[-1])["paired_ratio"]
    print(f"{'base':>20} {'step s':>8} {'tokens/s':>9} {'vs float':>9} {'paired':>7} {'peak RSS':>9}")
    for side, r in rows.items():
        float_side = "minilora bf16" if "bf16" in side else "minilora fp32"
        ratio = rows[float_side]["step_s"] / r["step_s"] if float_side in rows else float("nan")
        paired_ratio = f"{r['paired_ratio']:6.2f}x" if "paired_ratio" in r else ""
        print(f"{side:>20} {r['step_s']:8.2f} {r['tokens_per_s']:9.0f} {ratio:8.2f}x {paired_ratio:>7} "
              f"{r['peak_rss'] / 1e9:8.2f}G")
    (RESULTS / f"quant_step_{args.model}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
