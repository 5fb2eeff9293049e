"""Loading a real GGUF file (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, from the package index: asset
qwen2.5-0.5b): minilora's load_model in float, with keep_quantized (the file's own blocks), and with
keep_quantized but the head in float (what it did before the untied head was kept in its blocks), against
transformers' own GGUF load (`from_pretrained(folder, gguf_file=name)`, which dequantizes with the gguf
package), side by side.

    python benchmarks/gguf_load.py                 # --asset gemma3-270m | qwen2.5-1.5b; --rounds 3

Each load runs in a fresh process, the sides in turn (the order reversed every other round); reported:
the fastest and the median wall time of the load call (imports excluded), its CPU time (all threads; on
a machine shared with other work the fastest wall time and the CPU time are the figures that compare),
the peak resident memory (VmHWM) and the
resident memory after the load (VmRSS), both over the process's baseline after the imports, and the
bytes of the model's parameters and buffers. Writes benchmarks/results/gguf_load_<asset>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("minilora float", "minilora blocks", "blocks, float head", "transformers")


def status(field: str) -> int:
    return int(open("/proc/self/status").read().split(f"{field}:")[1].split()[0]) * 1024


def worker(side: str, path: Path) -> dict:
    import torch
    if side == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        from minilora.loading.weights import load_model
    base = status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    if side == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    elif side == "minilora float":
        model = load_model(path)
    elif side == "minilora blocks":
        model = load_model(path, keep_quantized=True)
    else:  # the head in float: int8_skip names the layers a quantizer leaves alone
        model = load_model(path, keep_quantized=True, int8_skip=("lm_head",))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    state = [*model.parameters(), *model.buffers()]
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in state}.values())
    with torch.no_grad():
        logits = model(torch.tensor([[785, 6722, 315, 9625, 374]]))
    logits = getattr(logits, "logits", logits)
    return dict(side=side, seconds=seconds, cpu_seconds=cpu, peak_over_baseline=status("VmHWM") - base,
                rss_over_baseline=status("VmRSS") - base, model_bytes=nbytes, last_logits=logits[0, -1, :8].tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asset", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.path))))
        return
    from minilora.data.assets import resolve_asset
    path = Path(resolve_asset(f"asset:{args.asset}"))
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for side in SIDES if round_ % 2 == 0 else reversed(SIDES):
            proc = subprocess.run([sys.executable, __file__, "--worker", side, "--path", str(path)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{side}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})")
                continue
            runs.setdefault(side, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, {args.rounds} rounds, fp32 compute")
    print(f"{'':>20} {'load, fastest':>14} {'median':>7} {'CPU':>7} {'peak RSS':>9} {'RSS after':>10} "
          f"{'model bytes':>12}")
    rows = {}
    for side in SIDES:
        results = runs.get(side)
        if not results:
            continue
        median = sorted(r["seconds"] for r in results)[len(results) // 2]
        fastest, cpu = min(r["seconds"] for r in results), min(r["cpu_seconds"] for r in results)
        peak, after = max(r["peak_over_baseline"] for r in results), max(r["rss_over_baseline"] for r in results)
        size = results[0]["model_bytes"]
        rows[side] = dict(seconds=fastest, median_seconds=median, cpu_seconds=cpu, peak_over_baseline=peak,
                          rss_over_baseline=after, model_bytes=size, rounds=results)
        print(f"{side:>20} {fastest:13.2f}s {median:6.1f}s {cpu:6.1f}s {peak / 1e6:8.0f}M {after / 1e6:9.0f}M "
              f"{size / 1e6:11.0f}M")
    if "transformers" in rows:
        t, c = rows["transformers"]["seconds"], rows["transformers"]["cpu_seconds"]
        print("fastest load / transformers' (CPU time / transformers'): " + ", ".join(
            f"{side} {r['seconds'] / t:.2f} ({r['cpu_seconds'] / c:.2f})"
            for side, r in rows.items() if side != "transformers"))
    RESULTS.mkdir(exist_ok=True)
    out = dict(asset=args.asset, file=path.name, file_bytes=path.stat().st_size, rows=rows)
    (RESULTS / f"gguf_load_{args.asset}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
