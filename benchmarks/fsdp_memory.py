"""Peak memory per rank (loading included) and step time, FSDP (fsdp = true: sharded loading, the base
sharded) against DDP (fsdp = false: every rank loads and keeps the whole base), on 1, 2 and 4 gloo
processes, for a GPT-J-6B-shaped and a Qwen2.5-1.5B-shaped checkpoint of random bf16 weights, the
base in bf16 or NF4. Each configuration is one torchrun subprocess with a timeout; one that fails or
runs out of time is reported as such.

    .venv/bin/python benchmarks/fsdp_memory.py                     # both shapes, every configuration
    .venv/bin/python benchmarks/fsdp_memory.py --layers 4          # the same layers' shapes, 4 of them
    .venv/bin/python benchmarks/fsdp_memory.py --shapes qwen2.5-1.5b --procs 1 2 --timeout 900
    .venv/bin/python benchmarks/fsdp_memory.py --shapes gpt-j-6b --procs 2 4 --bases bf16 --dir /tmp/ckpts

Peak RSS is each rank's VmHWM (/proc/self/status), the largest over the ranks, through loading and
training (before train() hands the model back whole on every rank, for generation: "handed back"); the step time is the
train()'s wall time over its steps (saving the adapter included), indicative only (the processes share the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # config.json of each, as the Hub has it (random weights are written in their place)
    "gpt-j-6b": dict(model_type="gptj", architectures=["GPTJForCausalLM"], vocab_size=50400, n_embd=4096,
                     n_layer=28, n_head=16, rotary_dim=64, n_positions=2048, layer_norm_epsilon=1e-5,
                     tie_word_embeddings=False, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                         hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
}
TARGETS = {"gpt-j-6b": ["q_proj", "v_proj"], "qwen2.5-1.5b": ["q_proj", "v_proj"]}


def write_checkpoint(shape: str, layers: int | None, folder: Path) -> dict:
    """A checkpoint of the shape's config (with `layers` blocks if given), random bf16 weights, written
    with minilora's own save_model."""
    import torch
    from minilora.loading.weights import save_model
    from minilora.models import build_model
    config = dict(SHAPES[shape])
    key = "n_layer" if "n_layer" in config else "num_hidden_layers"
    config[key] = layers or config[key]
    torch.set_default_dtype(torch.bfloat16)
    with torch.no_grad():
        model = build_model(config, shape)
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.set_default_dtype(torch.float32)
    save_model(model, folder)
    (folder / "config.json").write_text(json.dumps(config))
    return config


def worker(folder: str, out: str, fsdp: bool, nf4: bool, shape: str, seq: int, steps: int) -> None:
    """One rank: load (sliced under FSDP), apply LoRA, train `steps` steps of one sequence per rank."""
    import torch
    from minilora.data.records import Example
    from minilora.loading.weights import load_model, slice_reader
    from minilora.lora.inject import apply_lora
    from minilora.training import distributed, fsdp_load
    from minilora.training import fsdp as fsdp_module
    from minilora.training.loop import TrainConfig, train
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank_and_world()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16, load_in_4bit=nf4, shard=fsdp)
    apply_lora(model, TARGETS[shape], r=8, alpha=16)
    if fsdp:
        fsdp_load.read_when_sharded(model, slice_reader(model))
    g = torch.Generator().manual_seed(1)
    data = [Example(ids := torch.randint(2, 1000, (seq,), generator=g).tolist(), ids) for _ in range(world * steps)]

    class Tok:
        pad_token_id, eos_token_id = 0, 1
    cfg = TrainConfig(output_dir=f"{out}/run", fsdp=fsdp, max_steps=steps, micro_batch_size=1, batch_size=world,
                      lr=1e-4, progress=False, bf16=True, save_every=None)
    loaded, peak = time.perf_counter() - start, {}
    handed_back = fsdp_module.gather_for_the_caller

    def gather(m):  # the peak of loading and training, before train() hands the model back whole on every rank
        peak["trained"], peak["end"] = vm_hwm(), time.perf_counter()
        handed_back(m)
    fsdp_module.gather_for_the_caller = gather
    train(model, Tok, data, None, cfg)
    end = peak.get("end", time.perf_counter())
    Path(out, f"rank{rank}.json").write_text(json.dumps(dict(peak_rss=peak.get("trained", vm_hwm()), whole_rss=vm_hwm(),
                                                             step_s=(end - start - loaded) / steps)))


def vm_hwm() -> int:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def available() -> int:
    return int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024


def run(shape: str, folder: Path, n: int, fsdp: bool, nf4: bool, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) * (0.3 if nf4 else 1.0)
    if not fsdp and n * size > 0.9 * available():  # every rank holds the whole base: not started
        return dict(status=f"does not fit: {n} x {size / 2**30:.1f} GiB > {available() / 2**30:.1f} GiB available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", str(folder), str(out), str(int(fsdp)), str(int(nf4)), shape, str(args.seq), str(args.steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))})
    except subprocess.TimeoutExpired:
        return dict(status=f"over {args.timeout} s")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return dict(status=f"failed ({'killed: out of memory?' if proc.returncode in (-9, 137) else tail[0][:80]})")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    return dict(status="ok", peak_rss=max(r["peak_rss"] for r in ranks), whole_rss=max(r["whole_rss"] for r in ranks),
                step_s=max(r["step_s"] for r in ranks))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        folder, out, fsdp, nf4, shape, seq, steps = sys.argv[2:]
        return worker(folder, out, fsdp == "1", nf4 == "1", shape, int(seq), int(steps))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="blocks per model (default: the real count)")
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--dir", type=Path, default=None,
                   help="keep the checkpoints here and reuse them in later runs (GPT-J-6B's is 12 GB)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            folder = (args.dir or Path(tmp)) / f"{shape}-{args.layers or 'all'}"
            written = folder / "config.json"
            config = json.loads(written.read_text()) if args.dir and written.exists() else \
                write_checkpoint(shape, args.layers, folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            layers = config.get("n_layer") or config.get("num_hidden_layers")
            print(f"{shape}: {layers} blocks, {size / 2**30:.2f} GiB of bf16 safetensors", flush=True)
            for base in args.bases:
                for n in args.procs:
                    for fsdp in (True, False) if n > 1 else (False,):  # fsdp needs 2 processes or more
                        r = run(shape, folder, n, fsdp, base == "nf4", args, Path(tmp) / "runs" / f"{shape}-{base}-{n}-{fsdp}")
                        rows.append(dict(shape=shape, layers=layers, base=base, procs=n,
                                         mode="fsdp" if fsdp else "ddp", checkpoint_gib=size / 2**30, **r))
                        print(json.dumps(rows[-1]), flush=True)
    print("\n| shape (blocks) | base | processes | mode | peak RSS per rank, loading + training | handed back | "
          "step time (indicative) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        figures = f"{r['peak_rss'] / 2**30:.2f} GiB | {r['whole_rss'] / 2**30:.2f} GiB | {r['step_s']:.1f} s" \
            if r["status"] == "ok" else f"{r['status']} | - | -"
        print(f"| {r['shape']} ({r['layers']}) | {r['base']} | {r['procs']} | {r['mode']} | {figures} |")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "fsdp_memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
