"""Model load time and peak memory: minilora's load_model against transformers' from_pretrained,
on the same local safetensors checkpoint.

    python benchmarks/load.py --model gpt2-medium        # also llama-small; --dtype fp32|bf16

The checkpoint (random weights, written once by transformers' save_pretrained) goes to
~/.cache/minilora/bench/<model>/. Each load runs in a fresh process, alternating sides, several
rounds; reported: the median wall time of load_model / from_pretrained (imports excluded), the time
until every weight has been read once (transformers memory-maps the file, so its load call returns
before reading anything: "ready" is the fair comparison), and the process's peak resident memory
(VmHWM) over its baseline after the imports. Writes
benchmarks/results/load_<model>_<dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import CONFIGS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("MINILORA_CACHE", Path.home() / ".cache" / "minilora")) / "bench"


def hwm() -> int:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def rss() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024


def hf_classes(model_type: str):
    import transformers
    return {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[model_type]


def write_checkpoint(name: str) -> Path:
    folder = CACHE / name
    if (folder / "config.json").exists():
        return folder
    import torch
    cfg = dict(CONFIGS[name])
    config_cls, model_cls = hf_classes(cfg.pop("model_type"))
    torch.manual_seed(0)
    model = model_cls(config_cls(**cfg))
    model.save_pretrained(folder)  # model.safetensors, the Hub's layout and names
    return folder


def worker(side: str, folder: str, dtype: str) -> dict:
    import torch
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    if side == "minilora":
        from minilora.loading.weights import load_model
    else:
        import transformers  # noqa: F401  (imported before the clock starts, like minilora)
        cfg = json.loads((Path(folder) / "config.json").read_text())
        model_cls = hf_classes(cfg["model_type"])[1]
    base = rss()
    start = time.perf_counter()
    if side == "minilora":
        model = load_model(folder, dtype=dt)
    else:
        model = model_cls.from_pretrained(folder, dtype=dt)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # read every weight once: a memory-mapped tensor is only read when touched
        checksum = sum(float(p.float().sum()) for p in model.parameters())
    ready = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    return dict(side=side, seconds=seconds, ready_seconds=ready, checksum=checksum,
                peak_over_baseline=hwm() - base, params=n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-medium", choices=list(CONFIGS))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["minilora", "transformers"])
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.dtype)))
        return
    folder = write_checkpoint(args.model)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for side in ("minilora", "transformers") if round_ % 2 == 0 else ("transformers", "minilora"):
            cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{side}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'})")
                continue
            runs.setdefault(side, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.model}: {size / 1e9:.2f} GB fp32 safetensors, loaded as {args.dtype}, {args.rounds} rounds")
    print(f"{'':>13} {'load call':>10} {'+ every weight read':>20} {'peak RSS over baseline':>23}")
    rows = {}
    for side, results in runs.items():
        seconds = sorted(r["seconds"] for r in results)[len(results) // 2]
        ready = sorted(r["ready_seconds"] for r in results)[len(results) // 2]
        peak = max(r["peak_over_baseline"] for r in results)
        rows[side] = dict(seconds=seconds, ready_seconds=ready, peak_over_baseline=peak, params=results[0]["params"],
                          checksum=results[0]["checksum"], rounds=results)
        print(f"{side:>13} {seconds:9.2f}s {ready:19.2f}s {peak / 1e9:22.2f}G")
    if len(rows) == 2:
        m, t = rows["minilora"], rows["transformers"]
        print(f"minilora / transformers, time to a model whose weights are all in memory: "
              f"{m['ready_seconds'] / t['ready_seconds']:.2f} (target <= 1); peak memory "
              f"{m['peak_over_baseline'] / t['peak_over_baseline']:.2f}; same weights: "
              f"{abs(m['checksum'] - t['checksum']) <= 1e-6 * max(1.0, abs(t['checksum']))}")
    RESULTS.mkdir(exist_ok=True)
    out = dict(model=args.model, dtype=args.dtype, checkpoint_bytes=size, rows=rows)
    (RESULTS / f"load_{args.model}_{args.dtype}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
