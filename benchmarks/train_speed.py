"""LoRA training throughput: minilora against transformers + peft, same weights, batch and dtype.

    python benchmarks/train_speed.py --model gpt2-medium --dtype fp32 --steps 6
    python benchmarks/train_speed.py --model gpt2 --dtype bf16
    python benchmarks/train_speed.py --model gpt2 --dora      # DoRA on both sides (run it without, to compare)
    python benchmarks/train_speed.py --device cuda --model gpt2-medium --dtype bf16 --batch 16 --seq 512
    python benchmarks/train_speed.py --model llama-small --dtype bf16 --compile   # + both sides compiled

Each side runs in its own subprocess (so its peak memory, VmHWM, is its own): random weights from the
same seed, LoRA r=8 alpha=16 on the attention projections, micro-batch 8 x 128 tokens, AdamW. It
reports the loss of step 1 (which must agree), the time to the first step, the median tokens/s of the
steps after warm-up, the peak resident memory (on CUDA: the peak of torch's GPU allocator), and the matrix FLOP/s of a step against this machine's
measured matmul peak in the same dtype. With --compile, two more sides: minilora with
model.compile_blocks() (what `compile = true` does: each block compiled in place) and peft with
torch.compile(model) (what a user of transformers does, and TRL's torch_compile). Results go to
benchmarks/results/train_speed_*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
CONFIGS = {
    # dropout off (it lives partly in config fields, not modules), so the two sides' losses are comparable
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt2-medium": dict(model_type="gpt2", vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama-small": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
}


def worker(side: str, name: str, dtype: str, steps: int, batch: int, seq: int, reference: bool = False,
           dora: bool = False, device: str = "cpu", compiled: bool = False) -> dict:
    import torch
    torch.manual_seed(0)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = dict(CONFIGS[name])
    kind = cfg["model_type"]
    targets = TARGETS[kind]
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    start = time.perf_counter()
    if side == "minilora":
        from minilora.lora.inject import apply_lora
        from minilora.models import build_model
        from minilora.training.objectives.causal_lm import causal_lm_loss
        model = build_model(cfg)
        model.load_state_dict(reference_state(cfg), strict=False)  # the state dict is freed at once, as on peft's side
        model.tie_weights()
        model.to(device)
        apply_lora(model, targets, r=8, alpha=16, use_dora=dora)

        def loss_of(m):
            loss, n = causal_lm_loss(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            return loss / n
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        c = dict(cfg)
        c.pop("model_type")
        if kind == "gpt2":
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**c, attn_implementation="sdpa"))
        else:
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c, attn_implementation="sdpa"))
        hf.load_state_dict(hf_state(cfg), strict=False)
        hf.to(device)
        model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                              use_dora=dora))

        def loss_of(m):
            return m(input_ids=ids, labels=ids).loss
    # same LoRA initialisation on both sides
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(device) * 0.02)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if compiled and side == "minilora":
        model.compile_blocks()
    elif compiled:
        model = torch.compile(model)
    times, losses = [], []
    fp32_loss = None
    if reference:  # the step-1 loss in fp32, the yardstick for both sides' bf16 losses
        with torch.no_grad():
            fp32_loss = float(loss_of(model))
    held = contextlib.ExitStack()  # open until the worker returns (a context manager dropped unreferenced exits at once)
    if side == "minilora" and dtype == "bf16":  # what train() does for bf16 runs
        from minilora.kernels import frozen_weights_in
        held.enter_context(frozen_weights_in(model, torch.bfloat16))
    for step in range(steps):
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        sync()
        times.append(time.perf_counter() - t)
        if step == 0:
            first = time.perf_counter() - start
    if cuda:
        hwm = torch.cuda.max_memory_allocated()
    else:
        hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    steady = sorted(times[2:])[len(times[2:]) // 2] if len(times) > 2 else times[-1]
    return dict(side=side + (" compiled" if compiled else ""), loss_step1=losses[0], losses=losses, first_step_s=first, step_times=times[2:],
                step_s=steady, tokens_per_s=batch * seq / steady, peak_rss=hwm, fp32_loss=fp32_loss)


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def reference_state(cfg: dict) -> dict:
    """Random weights under the Hub's names, shared by both sides (GPT-2's in the Conv1D layout)."""
    import torch

    from minilora.models import build_model
    with torch.device("meta"):
        model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, t in model.state_dict().items():
        if name in model.tied_weights:
            continue
        w = torch.randn(t.shape, generator=g) * 0.02 if t.dim() > 1 else 1.0 + 0.0 * torch.randn(t.shape, generator=g)
        state[name] = w
    return state


def hf_state(cfg: dict) -> dict:
    import torch

    from minilora.models import build_model
    with torch.device("meta"):
        model = build_model(cfg)
    return dict(model.model_to_checkpoint(n, t) for n, t in reference_state(cfg).items())


def matmul_peak(dtype: str, device: str = "cpu") -> float:
    """FLOP/s of the fastest of a few large matmuls (square, and the step's own 1024-token shapes) in the
    given dtype: this machine's ceiling for the step. Best of several rounds: the ceiling, not an average
    disturbed by the neighbours of a shared machine (main() measures before and after and keeps the max)."""
    import torch
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 1024, 4096), (1024, 4096, 1024)):
        a, b = torch.randn(m, k, dtype=dt, device=device), torch.randn(k, n, dtype=dt, device=device)
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 3 * 2 * m * k * n / (time.perf_counter() - start))
    return best


def step_flops(cfg: dict, batch: int, seq: int, r: int = 8) -> float:
    """Matrix FLOPs a LoRA step must do: forward of every linear (2·d·k per token), the input gradient
    of every linear below the last trainable layer (another 2·d·k), the LoRA weight gradients, and
    attention's two matmuls forward and backward. Embedding lookups and norms are not counted."""
    import torch

    from minilora.models import build_model
    with torch.device("meta"):
        model = build_model(cfg)
    tokens = batch * seq
    dense = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads_dim = cfg.get("n_embd") or cfg.get("hidden_size")
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    attention = 2 * 2 * batch * seq * seq * heads_dim * layers  # QK^T and AV, forward
    targets = sum(m.in_features + m.out_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS[cfg["model_type"]])
    lora = 2 * tokens * r * targets * 3  # forward, input grad and weight grad of A and B
    return 2 * tokens * dense * 2 + attention * 2 + lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-medium", choices=list(CONFIGS))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per side, alternating minilora/peft, so that a slow spell of a shared "
                             "machine falls on both sides")
    parser.add_argument("--worker", choices=["minilora", "peft"])
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--dora", action="store_true", help="DoRA instead of plain LoRA, on both sides")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="also both sides compiled (see the docstring)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.dtype, args.steps, args.batch, args.seq, args.reference,
                                args.dora, args.device, args.compile)))
        return
    import torch

    from minilora.hardware import matmul_is_fast
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here")
        return
    if args.device == "cpu" and args.dtype == "bf16" and not matmul_is_fast(torch.bfloat16, "cpu"):
        print(f"bf16: this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}) has no bf16 matrix "
              "kernel; torch's bf16 product is a plain loop ~100x slower than fp32 here: nothing worth measuring")
        return
    peak = matmul_peak(args.dtype, args.device)
    runs: dict[str, list[dict]] = {}
    sides = ["minilora", "peft"] + (["minilora compiled", "peft compiled"] if args.compile else [])
    for round_ in range(args.rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            cmd = [sys.executable, __file__, "--worker", side.split()[0], "--model", args.model, "--dtype", args.dtype,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--device", args.device] + \
                (["--dora"] if args.dora else []) + (["--compile"] if side.endswith("compiled") else [])
            if round_ == 0 and side == "minilora" and args.dtype == "bf16":
                cmd.append("--reference")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{side}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})")
                continue
            runs.setdefault(side, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = {}
    for side, results in runs.items():  # steady steps of every round together; the worst memory
        step = median([t for r in results for t in r["step_times"]])
        rows[side] = dict(results[0], step_s=step, tokens_per_s=args.batch * args.seq / step,
                          first_step_s=min(r["first_step_s"] for r in results),
                          peak_rss=max(r["peak_rss"] for r in results), rounds=results)
    peak = max(peak, matmul_peak(args.dtype, args.device))
    flops = step_flops(CONFIGS[args.model], args.batch, args.seq)
    print(f"{'DoRA' if args.dora else 'LoRA'} r=8 on {TARGETS[CONFIGS[args.model]['model_type']]}, {args.model}, {args.dtype}, micro-batch "
          f"{args.batch} x {args.seq} on {args.device}; matmul peak {peak / 1e9:.0f} GFLOP/s; {flops / 1e9:.0f} GFLOP per step")
    print(f"{'':>17} {'loss@1':>10} {'first step':>11} {'tokens/s':>9} {'of peak':>8} {'peak GPU' if args.device == 'cuda' else 'peak RSS':>9}")
    for side, r in rows.items():
        r["fraction_of_peak"] = flops / r["step_s"] / peak
        print(f"{side:>17} {r['loss_step1']:10.6f} {r['first_step_s']:10.1f}s {r['tokens_per_s']:9.0f} "
              f"{r['fraction_of_peak']:8.0%} {r['peak_rss'] / 1e9:8.2f}G")
    if "minilora compiled" in rows and "peft compiled" in rows:
        print(f"compiled: minilora / peft tokens/s {rows['minilora compiled']['tokens_per_s'] / rows['peft compiled']['tokens_per_s']:.2f}x; "
              f"minilora compiled / minilora eager {rows['minilora compiled']['tokens_per_s'] / rows['minilora']['tokens_per_s']:.2f}x; "
              f"minilora compiled / peft eager {rows['minilora compiled']['tokens_per_s'] / rows['peft']['tokens_per_s']:.2f}x")
    if "minilora" in rows and "peft" in rows:
        ratio = rows["minilora"]["tokens_per_s"] / rows["peft"]["tokens_per_s"]
        diff = abs(rows["minilora"]["loss_step1"] - rows["peft"]["loss_step1"])
        print(f"minilora / peft tokens/s: {ratio:.2f}x (target >= 1.3x); step-1 loss difference {diff:.2e} "
              f"(target <= 1e-4); peak memory ratio {rows['minilora']['peak_rss'] / rows['peft']['peak_rss']:.2f}")
        per_round = [median(p["step_times"]) / median(m["step_times"])
                     for m, p in zip(rows["minilora"]["rounds"], rows["peft"]["rounds"])]
        best = min(t for r in rows["peft"]["rounds"] for t in r["step_times"]) / \
            min(t for r in rows["minilora"]["rounds"] for t in r["step_times"])
        rows["minilora"]["ratio_per_round"], rows["minilora"]["ratio_fastest_steps"] = per_round, best
        print(f"  ratio per round (this shared machine's speed drifts): {', '.join(f'{r:.2f}x' for r in per_round)}; "
              f"fastest step against fastest step: {best:.2f}x")
        ref = rows["minilora"].get("fp32_loss")
        if ref is not None:
            print(f"step-1 loss against the fp32 loss {ref:.6f}: minilora {rows['minilora']['loss_step1'] - ref:+.2e}, "
                  f"peft {rows['peft']['loss_step1'] - ref:+.2e}")
    RESULTS.mkdir(exist_ok=True)
    out = dict(model=args.model, dtype=args.dtype, device=args.device, dora=args.dora, batch=args.batch, seq=args.seq, matmul_peak=peak,
               step_flops=flops, rows=rows)
    suffix = ("_dora" if args.dora else "") + ("_cuda" if args.device == "cuda" else "") + ("_compile" if args.compile else "")
    (RESULTS / f"train_speed_{args.model}_{args.dtype}{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
