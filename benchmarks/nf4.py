"""4-bit benchmarks: NF4Linear against bitsandbytes' Linear4bit (NF4, blocks of 64, double quantization)
and against fp32/bf16 nn.Linear at GPT-J-6B's shapes, on the same weights and inputs.

    python benchmarks/nf4.py [--tokens 256]
    python benchmarks/nf4.py load-6b [--dir D]   # a GPT-J-6B-shaped checkpoint in NF4 and 8-bit: load, one LoRA step

For each shape: forward and forward+backward (input gradient, as under LoRA) median times, and each
layer's output error relative to the fp32 layer. bitsandbytes runs with compute dtype fp32 and bf16,
as minilora does (fp32 activations, or bf16 under autocast). Writes benchmarks/results/nf4_layers.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from minilora.hardware import matmul_is_fast
from minilora.quant.nf4 import NF4Linear

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096)]  # (in, out): attention, fc_in, fc_out


def timed(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bnb_linear4bit(fp32: nn.Linear, dtype: torch.dtype):
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(fp32.in_features, fp32.out_features, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(fp32.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
    layer.bias = nn.Parameter(fp32.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def load_and_step_6b(folder: Path) -> list[dict]:
    """Write (once) a random GPT-J-6B-shaped fp16 checkpoint, then in a fresh process per format: load it
    (NF4, 8-bit; the embeddings, norms and head in bf16, as int8.py's load-6b), then one LoRA optimizer
    step (q_proj/v_proj, r=8, the adapter in fp32) at micro-batch 1 x 256; load time, peak RSS, step time."""
    import subprocess
    import sys
    import textwrap
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from int8 import GPTJ_6B, write_random_checkpoint
    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing a random GPT-J-6B-shaped fp16 checkpoint to {folder} ...", flush=True)
        write_random_checkpoint(folder, GPTJ_6B)
    rows = []
    for kind in ("load_in_4bit", "load_in_8bit"):
        code = textwrap.dedent(f"""
            import json, time, torch
            from minilora.lora.inject import apply_lora
            from minilora.training.objectives.causal_lm import causal_lm_loss
            from minilora.loading.weights import load_model
            def status(key): return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
            start = time.time()
            model = load_model({str(folder)!r}, dtype=torch.bfloat16, {kind}=True)  # the float rest in bf16
            load_seconds, load_peak = time.time() - start, status("VmHWM")
            apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(0, 50400, (1, 256), generator=torch.Generator().manual_seed(0))
            start = time.time()
            loss, n = causal_lm_loss(model, {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}})
            (loss / n).backward()
            opt.step()
            print(json.dumps(dict(kind={kind!r}, load_seconds=load_seconds, load_peak_rss=load_peak,
                                  step_seconds=time.time() - start, peak_rss=status("VmHWM"), loss=float(loss / n))))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"GPT-J-6B-shaped, {kind}: load {row['load_seconds']:.0f} s (peak RSS {row['load_peak_rss'] / 1e9:.2f} GB), "
              f"one LoRA step at 1 x 256: {row['step_seconds']:.0f} s, peak RSS {row['peak_rss'] / 1e9:.2f} GB, "
              f"loss {row['loss']:.3f}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="layers", choices=["layers", "load-6b"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dir", default="/tmp/gptj6b-random")
    args = parser.parse_args()
    if args.what == "load-6b":
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "nf4_6b.json").write_text(json.dumps(load_and_step_6b(Path(args.dir)), indent=2) + "\n")
        return
    fast_bf16 = matmul_is_fast(torch.bfloat16, "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if fast_bf16 else [])
    rows = []
    for k, d in SHAPES:
        torch.manual_seed(0)
        fp32 = nn.Linear(k, d).requires_grad_(False)
        ours = NF4Linear.from_linear(fp32)
        x = torch.randn(args.tokens, k)
        with torch.no_grad():
            ref = fp32(x)
        for dtype in dtypes:
            name = "fp32" if dtype == torch.float32 else "bf16"
            plain = nn.Linear(k, d).to(dtype).requires_grad_(False)
            plain.load_state_dict({n: t.to(dtype) for n, t in fp32.state_dict().items()})
            xd = x.to(dtype)
            sides = {"nn.Linear": plain, "minilora NF4Linear": ours}
            try:
                sides["bitsandbytes Linear4bit"] = bnb_linear4bit(fp32, dtype)
            except Exception as e:  # bitsandbytes missing or without a CPU 4-bit kernel
                print(f"bitsandbytes: not run ({type(e).__name__}: {e})")
            for side, layer in sides.items():
                def fwd():
                    with torch.no_grad():
                        return layer(xd)

                def fwd_bwd():
                    xi = xd.clone().requires_grad_(True)
                    layer(xi).float().sum().backward()
                with torch.no_grad():
                    err = ((layer(xd).float() - ref).norm() / ref.norm()).item()
                rows.append(dict(shape=f"{k}x{d}", dtype=name, side=side, tokens=args.tokens,
                                 fwd_ms=1e3 * timed(fwd), fwd_bwd_ms=1e3 * timed(fwd_bwd), rel_error=err))
    print(f"4-bit layers, {args.tokens} tokens, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} (median ms; error relative to the fp32 layer)")
    print(f"{'shape':>11} {'dtype':>5} {'layer':>24} {'fwd':>8} {'fwd+bwd':>8} {'rel err':>9} {'vs bnb':>7}")
    for r in rows:
        peer = next((p for p in rows if p["shape"] == r["shape"] and p["dtype"] == r["dtype"]
                     and p["side"] == "bitsandbytes Linear4bit"), None)
        ratio = f"{peer['fwd_bwd_ms'] / r['fwd_bwd_ms']:6.2f}x" if peer and r["side"].startswith("minilora") else ""
        print(f"{r['shape']:>11} {r['dtype']:>5} {r['side']:>24} {r['fwd_ms']:8.1f} {r['fwd_bwd_ms']:8.1f} "
              f"{r['rel_error']:9.2e} {ratio:>7}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nf4_layers.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
