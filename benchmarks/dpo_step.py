"""One DPO training step: minilora against TRL's DPOTrainer + peft, same model, same pairs, same adapter.

    python benchmarks/dpo_step.py                       # a random Llama of SmolLM2-135M's shape
    python benchmarks/dpo_step.py --steps 4 --rounds 1  # fewer rounds on a busy machine
    python benchmarks/dpo_step.py --device cuda

Sigmoid DPO, beta 0.1, LoRA r=8 alpha=16 on q/k/v/o, a batch of 4 pairs (8 rows) of at most 256 tokens
(prompt 64-112 words, completions 64-144, over a word-level tokenizer whose ids are the words, so both
sides read the same ids), AdamW. Each side runs in its own subprocess (its peak memory is its own) from
the same random weights and the same LoRA initialisation; the step-1 loss must agree. A TRL step is what
its Trainer calls per batch: compute_loss (policy and reference log-probs, the loss) and backward, then
the optimizer step; the collated batch is made once, outside the timing, on both sides.

Reported: median step time after the warm-up steps, peak memory (VmHWM over the RSS after imports; on
CUDA torch.cuda.max_memory_allocated), and how many copies of the base weights each side holds: the
bytes of every distinct tensor storage reachable from the model and, on TRL's side, its ref_model, over
the bytes of one base. Neither keeps a second model: TRL with a peft model and no ref_model computes the
reference with the adapter disabled (as minilora does); with a PeftModel whose adapter is already
trained it would add a "ref" adapter copy (adapter-sized, not a model). Results go to
benchmarks/results/dpo_step.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=2048)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BETA, PAIRS, MAX_LENGTH = 0.1, 4, 256


def records(vocab: int) -> list[dict]:
    """PAIRS pairs of random words w2..w{vocab-1}: prompt + the longer completion <= MAX_LENGTH tokens (EOS included)."""
    import torch
    g = torch.Generator().manual_seed(3)

    def words(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(2, vocab, (n,), generator=g))
    return [{"prompt": words(64, 111), "chosen": " " + words(64, 143), "rejected": " " + words(64, 143)}
            for _ in range(PAIRS)]


def write_folder(folder: Path, cfg: dict) -> None:
    """config.json, random weights (the same for both sides) and a word-level tokenizer.json."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from minilora.models import build_model
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(t.shape, generator=g) * 0.02 if t.dim() > 1 else torch.ones(t.shape))
             for n, t in model.state_dict().items() if n not in model.tied_weights}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, cfg["vocab_size"])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<eos>"])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


def hwm() -> int:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def rss() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024


def lora_key(name: str) -> tuple | None:
    """(layer, module, A|B) in either library's naming."""
    m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\..*(lora_[AB])\.(?:default\.)?weight", name)
    return m.groups() if m else None


def copies(modules, base_bytes: int) -> float:
    """Bytes of the distinct tensor storages reachable from `modules`, over one base model's bytes."""
    seen = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(seen.values()) / base_bytes


def worker(side: str, folder: Path, steps: int, device: str) -> dict:
    import torch
    if side == "minilora":
        from minilora.data.batching import collate
        from minilora.data.preferences import build_pairs
        from minilora.loading.tokenizer import load_tokenizer
        from minilora.loading.weights import load_model
        from minilora.lora.inject import apply_lora
        from minilora.training.objectives import DPO
    else:
        import transformers
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer
        transformers.logging.set_verbosity_error()
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    baseline = rss()
    cfg = json.loads((folder / "config.json").read_text())
    rows, layers = records(cfg["vocab_size"]), cfg["num_hidden_layers"]
    if side == "minilora":
        model = apply_lora(load_model(folder, device=device), TARGETS, r=8, alpha=16)
        pairs = build_pairs(rows, load_tokenizer(folder), max_length=MAX_LENGTH)
        batch = collate(pairs, 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        objective = DPO(beta=BETA, loss_type="sigmoid")

        def loss_of():
            loss, n, _ = objective.loss(model, batch)
            return loss / n
        holders = [model]
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="sdpa").to(device)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<eos>",
                                                   pad_token="[UNK]")
        args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=not cuda, max_length=MAX_LENGTH,
                         per_device_train_batch_size=PAIRS, beta=BETA, loss_type=["sigmoid"], bf16=False)
        trainer = DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
        model = trainer.model
        batch = trainer.data_collator(list(trainer.train_dataset))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        def loss_of():
            trainer._metrics["train"].clear()
            return trainer.compute_loss(model, batch)
        holders = [model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    # the same LoRA initialisation on both sides (B non-zero, so that step 1 is not ln 2 on both trivially)
    g = torch.Generator().manual_seed(2)
    lora = {lora_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert None not in lora and len(lora) == 2 * len(TARGETS) * layers, sorted(lora)[:4]
    with torch.no_grad():
        for k in sorted(lora):
            lora[k].copy_(torch.randn(lora[k].shape, generator=g).to(device) * 0.02)
    frozen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
              if not p.requires_grad}
    base_bytes = sum(frozen.values())  # one base model (a tied head counted once)
    model.train()
    opt = torch.optim.AdamW(list(lora.values()), lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else hwm() - baseline
    warm = times[2:] or times[-1:]
    return dict(side=side, losses=losses, step_times=warm, step_s=sorted(warm)[len(warm) // 2], peak_bytes=peak,
                model_copies=copies(holders, base_bytes), ref_model=side != "minilora" and trainer.ref_model is not None,
                rows=int(batch["input_ids"].shape[0] if side == "minilora" else 2 * PAIRS),
                tokens=int(batch["attention_mask"].sum()) if side == "minilora" else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="steps per process; the first two are warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, alternating the order")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", choices=["minilora", "trl"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"], help="fewer for a quick check")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.steps, args.device)))
        return
    folder = Path(tempfile.mkdtemp()) / "smollm2-shaped"
    write_folder(folder, {**SMOLLM2, "num_hidden_layers": args.layers})
    runs: dict[str, list[dict]] = {"minilora": [], "trl": []}
    for round_ in range(args.rounds):
        for side in ("minilora", "trl") if round_ % 2 == 0 else ("trl", "minilora"):
            cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), "--steps", str(args.steps),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours, theirs = runs["minilora"], runs["trl"]
    step = {s: sorted(t for r in runs[s] for t in r["step_times"]) for s in runs}
    med = {s: step[s][len(step[s]) // 2] for s in runs}
    peak = {s: max(r["peak_bytes"] for r in runs[s]) for s in runs}
    print(f"DPO step, SmolLM2-135M-shaped random Llama ({args.layers} blocks), {PAIRS} pairs ({ours[0]['rows']} rows, {ours[0]['tokens']} "
          f"tokens), max_length {MAX_LENGTH}, LoRA r=8 on q/k/v/o, {args.device}, {args.rounds} round(s) x "
          f"{args.steps} steps")
    print(f"step-1 loss: minilora {ours[0]['losses'][0]:.6f}, TRL {theirs[0]['losses'][0]:.6f}")
    print("| | minilora | TRL DPOTrainer + peft | minilora / TRL |\n|---|---|---|---|")
    print(f"| median step | {med['minilora']:.2f} s | {med['trl']:.2f} s | {med['minilora'] / med['trl']:.2f}x |")
    mem = "peak GPU memory" if args.device == "cuda" else "peak RSS growth"
    print(f"| {mem} | {peak['minilora'] / 1e6:.0f} MB | {peak['trl'] / 1e6:.0f} MB | "
          f"{peak['minilora'] / peak['trl']:.2f}x |")
    print(f"| base-model copies held | {ours[0]['model_copies']:.2f} | {theirs[0]['model_copies']:.2f} "
          f"(ref_model: {'a model' if theirs[0]['ref_model'] else 'None, adapter disabled'}) | |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dpo_step.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
