"""int8 benchmarks: Int8Linear against fp32 and bf16 nn.Linear at GPT-J-6B's shapes, and the memory and
time of loading a GPT-J-6B-shaped checkpoint in 8-bit.

    python benchmarks/int8.py layers            # forward and forward+backward times, and the error
    python benchmarks/int8.py load-6b [--dir D]  # writes a random 6B fp16 checkpoint (12 GB, sharded), loads it

Prints a table and writes benchmarks/results/int8_*.json. With bitsandbytes installed, its
Linear8bitLt is timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn as nn

from minilora.hardware import matmul_is_fast
from minilora.quant.int8 import Int8Linear

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096)]  # (in, out): attention, fc_in, fc_out


def timed(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def layers(tokens: int) -> list[dict]:
    rows = []
    fast_bf16, fast_int8 = matmul_is_fast(torch.bfloat16, "cpu"), matmul_is_fast(torch.int8, "cpu")
    # without AVX-512/AMX torch's bf16 product is a plain loop (~1 GFLOP/s): not timed, its error on 32 rows
    bf16_rows = tokens if fast_bf16 else 32
    nan = float("nan")
    for k, d in SHAPES:
        torch.manual_seed(0)
        fp32 = nn.Linear(k, d).requires_grad_(False)
        bf16 = nn.Linear(k, d).to(torch.bfloat16).requires_grad_(False)
        bf16.load_state_dict({n: t.to(torch.bfloat16) for n, t in fp32.state_dict().items()})
        q = Int8Linear.from_linear(fp32)
        x = torch.randn(tokens, k)
        with torch.no_grad():
            ref = fp32(x)
            err = ((q(x) - ref).norm() / ref.norm()).item()
            err_bf16 = ((bf16(x[:bf16_rows].bfloat16()).float() - ref[:bf16_rows]).norm() / ref[:bf16_rows].norm()).item()

        def fwd_bwd(layer, dtype):
            xi = x.to(dtype).requires_grad_(True)
            layer(xi).sum().backward()
        row = {"shape": f"{k}x{d}", "tokens": tokens,
               "fp32_fwd_ms": 1e3 * timed(lambda: fp32(x)),
               "bf16_fwd_ms": 1e3 * timed(lambda: bf16(x.bfloat16())) if fast_bf16 else nan,
               "int8_fwd_ms": 1e3 * timed(lambda: q(x)),
               "fp32_fwdbwd_ms": 1e3 * timed(lambda: fwd_bwd(fp32, torch.float32)),
               "bf16_fwdbwd_ms": 1e3 * timed(lambda: fwd_bwd(bf16, torch.bfloat16)) if fast_bf16 else nan,
               "int8_fwdbwd_ms": 1e3 * timed(lambda: fwd_bwd(q, torch.float32)),
               "int8_rel_error": err, "bf16_rel_error": err_bf16,
               "int8_kernel": "torch._int_mm" if fast_int8 else "fp32 product of the int8 values"}
        try:  # the library minilora replaces, when present, on the same inputs
            import bitsandbytes as bnb
            b = bnb.nn.Linear8bitLt(k, d, has_fp16_weights=False, threshold=6.0)
            b.load_state_dict(fp32.state_dict())
            row["bnb_fwd_ms"] = 1e3 * timed(lambda: b(x))
        except Exception:
            pass
        rows.append(row)
    print(f"Int8Linear vs nn.Linear, {tokens} tokens, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, int8 products by {rows[0]['int8_kernel']} (median ms"
          + ("" if fast_bf16 else "; bf16 not timed: no bf16 kernel on this CPU") + ")")
    print(f"{'shape':>12} {'fp32 fwd':>9} {'bf16 fwd':>9} {'int8 fwd':>9} {'speed-up':>9} | {'fp32 f+b':>9} "
          f"{'bf16 f+b':>9} {'int8 f+b':>9} {'speed-up':>9} | {'int8 err':>9} {'bf16 err':>9}")
    for r in rows:
        print(f"{r['shape']:>12} {r['fp32_fwd_ms']:9.1f} {r['bf16_fwd_ms']:9.1f} {r['int8_fwd_ms']:9.1f} "
              f"{r['fp32_fwd_ms'] / r['int8_fwd_ms']:8.2f}x | {r['fp32_fwdbwd_ms']:9.1f} {r['bf16_fwdbwd_ms']:9.1f} "
              f"{r['int8_fwdbwd_ms']:9.1f} {r['fp32_fwdbwd_ms'] / r['int8_fwdbwd_ms']:8.2f}x | "
              f"{r['int8_rel_error']:9.2e} {r['bf16_rel_error']:9.2e}"
              + (f" | bitsandbytes fwd {r['bnb_fwd_ms']:.1f}" if "bnb_fwd_ms" in r else ""))
    return rows


GPTJ_6B = dict(model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
               n_positions=2048, architectures=["GPTJForCausalLM"])


def write_random_checkpoint(folder: Path, config: dict, shard_bytes: int = 2 << 30) -> int:
    """A random fp16 checkpoint with the Hub's names and index, written one shard at a time."""
    from safetensors.torch import save_file

    from minilora.models import build_model
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(config).state_dict().items()}
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0
    names = sorted(shapes)

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size = {}, 0
    g = torch.Generator().manual_seed(0)
    for name in names:
        t = (torch.randn(shapes[name], generator=g, dtype=torch.float32) * 0.02).half()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel()
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def load_6b(folder: Path) -> dict:
    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing a random GPT-J-6B-shaped fp16 checkpoint to {folder} ...", flush=True)
        start = time.time()
        n = write_random_checkpoint(folder, GPTJ_6B)
        print(f"  {n / 1e9:.2f}B parameters in {time.time() - start:.0f} s")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import json, time, torch
        from minilora.loading.weights import load_model
        def status(key): return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        start = time.time()
        model = load_model({str(folder)!r}, dtype=torch.bfloat16, load_in_8bit=True)
        seconds = time.time() - start
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]]))
        print(json.dumps(dict(load_seconds=seconds, peak_rss=status("VmHWM"), rss=status("VmRSS"),
                              params=sum(p.numel() for p in model.parameters()), finite=bool(logits.isfinite().all()))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1]) | {"checkpoint_bytes": size}
    print(f"GPT-J-6B-shaped checkpoint ({row['params'] / 1e9:.2f}B params, {size / 1e9:.1f} GB fp16 on disk) "
          f"loaded with load_in_8bit=True: {row['load_seconds']:.0f} s, peak RSS {row['peak_rss'] / 1e9:.2f} GB "
          f"(target < 8 GB), RSS after {row['rss'] / 1e9:.2f} GB, logits finite: {row['finite']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["layers", "load-6b"])
    parser.add_argument("--tokens", type=int, default=512, help="rows of the activation matrix (batch x sequence)")
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache/minilora/gptj-6b-random"))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result = layers(args.tokens) if args.what == "layers" else load_6b(Path(args.dir))
    (RESULTS / f"int8_{args.what}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
