"""The LoRA paper's section 7 (Hu et al. 2021, "Understanding the low-rank updates"), reproduced offline
on the real SmolLM2-135M-Instruct and real quotes, next to the paper's GPT-3 175B figures.

    python benchmarks/lora_analysis.py                  # four runs of ~60 steps, then the measurements
    python benchmarks/lora_analysis.py --reuse          # measure (and draw) the runs already trained

Four adapters on q_proj and v_proj, as the paper's: r = 8 and r = 64, each with seeds 0 and 1, alpha = 16
for both ranks (the paper keeps alpha at the first r it tries and does not tune it), the packaged quotes
recipe otherwise (Quote by {author}: "{quote}", lr 1e-3, cosine, bf16 where this CPU has it). Then:

  7.2 / Figure 3  φ(A_r=8, A_r=64, i, j): do the two ranks find the same directions? (the paper: the top
                  direction is shared, φ > 0.5; the others are not, φ near random)
  7.2 / Figure 4  φ(A_r=64 seed 0, A_r=64 seed 1, i, i): how many directions two seeds share (the paper:
                  more for W_q than W_v)
  7.3 / Table 7   ‖Uᵀ W_q Vᵀ‖_F with U, V the top-r singular vectors of ΔW_q, of W_q itself and of a
                  random matrix; ‖W_q‖_F, ‖ΔW_q‖_F and the amplification ‖ΔW_q‖_F / ‖Uᵀ W_q Vᵀ‖_F (the
                  paper: 21.5 at r = 4, 1.9 at r = 64)

φ of random subspaces of dimensions i and j in R^k averages max(i, j) / k (k = 576 here), printed
beside as the floor. The paper reports GPT-3's layer 48 of 96; here the middle layer (15 of 30) and the
mean over all 30. Figures (minilora inspect --plot) and every number go to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minilora.data import assets
from minilora.loading.weights import load_model
from minilora.lora.analysis import (
    adapter_factors,
    inspect_adapter,
    module_kind,
    plot_inspection,
    similarity_grid,
)
from minilora.recipe import load_recipe, run_recipe

OUT = Path(__file__).resolve().parent / "results" / "lora_analysis"
RUNS = {"r8_seed0": (8, 0), "r8_seed1": (8, 1), "r64_seed0": (64, 0), "r64_seed1": (64, 1)}
# The paper's Table 7 (GPT-3 175B, W_q of layer 48): ‖UᵀW_qVᵀ‖_F for U, V from ΔW_q / W_q / random
PAPER_TABLE7 = {4: {"w_on_delta": 0.32, "w_on_own_top": 21.67, "w_on_random": 0.02, "delta_norm": 6.91},
                64: {"w_on_delta": 1.90, "w_on_own_top": 37.71, "w_on_random": 0.33, "delta_norm": 3.57}}
PAPER_W_NORM = 61.95
PAPER_AMPLIFICATION = {4: 21.5, 64: 1.9}  # as the paper rounds 6.91 / 0.32 and 3.57 / 1.90


def train_runs(out: Path, limit: int, reuse: bool) -> dict[str, Path]:
    adapters = {}
    for name, (r, seed) in RUNS.items():
        folder = out / name
        if reuse and (folder / "adapter" / "adapter_config.json").is_file():
            print(f"{name}: reusing {folder / 'adapter'}")
        else:
            recipe = load_recipe("quotes-smollm2", overrides={
                "lora.targets": '["q_proj", "v_proj"]', "lora.r": str(r), "lora.alpha": "16",
                "data.limit": str(limit), "train.seed": str(seed), "train.output_dir": str(folder),
                "train.overwrite_output_dir": "true", "train.progress": "false", "train.eval_at_start": "false",
                "train.save_every": "1000", "train.log_every": "20", "generate.prompts": "[]"})
            start = time.time()
            _, _, result = run_recipe(recipe)
            evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
            print(f"{name}: r={r} seed={seed}, {result.history[-1]['step']} steps in {time.time() - start:.0f} s, "
                  f"held-out loss {evals[-1]:.3f}")
        adapters[name] = folder / "adapter"
    return adapters


def kind_of(name: str) -> tuple[str, int]:
    """("q_proj", 15) for model.layers.15.self_attn.q_proj."""
    pattern, layer = module_kind(name)
    return pattern.rsplit(".", 1)[-1], layer


def by_kind(result: dict, key: str) -> dict[str, dict[int, object]]:
    """{"q_proj": {layer: value}, "v_proj": {...}} of result[key]."""
    out: dict[str, dict[int, object]] = {}
    for name, value in result[key].items():
        kind, layer = kind_of(name)
        out.setdefault(kind, {})[layer] = value
    return out


FACTORS: dict[Path, dict] = {}


def delta_similarity(a1: Path, a2: Path, kind: str, layer: int, side: str) -> list[list[float]]:
    """φ(i, j) between the top right-singular ("input") or left-singular ("output") vectors of two
    adapters' ΔW of one module."""
    rows = []
    for folder in (a1, a2):
        a, b, scale = FACTORS.setdefault(folder, adapter_factors(folder))[f"model.layers.{layer}.self_attn.{kind}"]
        u, sv, vh = torch.linalg.svd(scale * (b @ a), full_matrices=False)
        vectors = vh if side == "input" else u.t()
        rows.append(sv[:a.shape[0], None] * vectors[:a.shape[0]])  # σ_i v_i: in ΔW's order (unit rows would lose it)
    return similarity_grid(*rows)


def mean(values) -> float:
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=960, help="quotes to train on (16 a step): 960 = 60 steps")
    parser.add_argument("--reuse", action="store_true", help="measure the runs already in --out, train the missing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    adapters = train_runs(args.out, args.limit, args.reuse)
    base = load_model(assets.smollm2())  # the Q4_1 GGUF's blocks dequantized: W as the adapters saw it
    k = base.model.layers[0].self_attn.q_proj.in_features
    ranks = inspect_adapter(adapters["r8_seed0"], base, adapters["r64_seed0"])
    seeds64 = inspect_adapter(adapters["r64_seed0"], base, adapters["r64_seed1"])
    seeds8 = inspect_adapter(adapters["r8_seed0"], None, adapters["r8_seed1"])
    layers = sorted(by_kind(ranks, "modules")["q_proj"])
    middle = layers[len(layers) // 2]
    report: dict = {"k": k, "middle_layer": middle, "layers": len(layers)}

    print(f"\n== 7.2, Figure 3: φ(A_r=8, A_r=64, i, j); random subspaces: max(i, j) / {k}")
    grids = by_kind(ranks, "similarity")
    js = [1, 2, 4, 8, 16, 32, 64]
    print(f"{'':<22}" + "".join(f"{'j=' + str(j):>7}" for j in js))
    for kind, per_layer in grids.items():
        for label, pick in ((f"layer {middle}", [middle]), (f"mean of {len(per_layer)}", list(per_layer))):
            for i in (1, 2, 8):
                values = [mean(per_layer[l][i - 1][j - 1] for l in pick) for j in js]
                print(f"{kind + ', ' + label + ', i=' + str(i):<22}" + "".join(f"{v:7.3f}" for v in values))
                report.setdefault("figure3", {}).setdefault(kind, {})[f"{label}, i={i}"] = dict(zip(js, values))
    print(f"{'random, i=1':<22}" + "".join(f"{max(1, j) / k:7.3f}" for j in js))
    print("the paper: the top direction (i = j = 1) overlaps with phi > 0.5 for both W_q and W_v; "
          "directions beyond it do not (phi near 0)")
    print("the same phi over the singular vectors of the two ΔW = s·B·A themselves, i = j = 1, 2, 4, 8, mean of all "
          "layers (right: the input directions; left: the output directions), and the random floor i / dimension:")
    dims = [1, 2, 4, 8]
    for kind in grids:
        for side in ("input", "output"):
            per_layer = [delta_similarity(adapters["r8_seed0"], adapters["r64_seed0"], kind, layer, side)
                         for layer in layers]
            values = [mean(grid[i - 1][i - 1] for grid in per_layer) for i in dims]
            size = k if side == "input" else base.get_submodule(f"model.layers.0.self_attn.{kind}").out_features
            print(f"{kind + ', ΔW ' + side:<22}" + "".join(f"{v:7.3f}" for v in values)
                  + f"   random {', '.join(f'{i / size:.3f}' for i in dims)}")
            report.setdefault("figure3_delta", {}).setdefault(kind, {})[side] = dict(zip(dims, values))

    print(f"\n== 7.2, Figure 4: φ(A seed 0, A seed 1, i, i), two seeds of the same rank; random: i / {k}")
    dims = [1, 2, 4, 8, 16, 32, 64]
    print(f"{'':<22}" + "".join(f"{'i=' + str(i):>7}" for i in dims))
    for label, result, r in (("r=8", seeds8, 8), ("r=64", seeds64, 64)):
        for kind, per_layer in by_kind(result, "similarity").items():
            values = [mean(per_layer[l][i - 1][i - 1] for l in per_layer) for i in dims if i <= r]
            print(f"{kind + ', ' + label + ', mean':<22}" + "".join(f"{v:7.3f}" for v in values))
            report.setdefault("figure4", {}).setdefault(kind, {})[label] = dict(zip([i for i in dims if i <= r], values))
    print(f"{'random':<22}" + "".join(f"{i / k:7.3f}" for i in dims))
    print("the paper (r = 64, GPT-3): W_q shares more directions across seeds than W_v "
          "(a higher 'intrinsic rank'); both well above random")

    print(f"\n== 7.3, Table 7: W_q of layer {middle} (of {len(layers)}; the paper: layer 48 of 96)")
    rows = {8: ranks["modules"], 64: seeds64["modules"]}
    name = next(n for n in rows[8] if kind_of(n) == ("q_proj", middle))
    print(f"{'':<32}{'|UtWqV| dWq':>13}{'Wq':>9}{'random':>9}{'|dWq|_F':>9}{'|Wq|_F':>9}{'ampl.':>8}")
    for r in (8, 64):
        m = rows[r][name]
        print(f"{'minilora SmolLM2, r=' + str(r):<32}{m['w_on_delta']:13.3f}{m['w_on_own_top']:9.3f}"
              f"{m['w_on_random']:9.3f}{m['delta_norm']:9.3f}{m['w_norm']:9.2f}{m['amplification']:8.2f}")
        all_q = [v for n, v in rows[r].items() if kind_of(n)[0] == "q_proj"]
        print(f"{'   mean of ' + str(len(all_q)) + ' layers':<32}{mean(v['w_on_delta'] for v in all_q):13.3f}"
              f"{mean(v['w_on_own_top'] for v in all_q):9.3f}{mean(v['w_on_random'] for v in all_q):9.3f}"
              f"{mean(v['delta_norm'] for v in all_q):9.3f}{mean(v['w_norm'] for v in all_q):9.2f}"
              f"{mean(v['amplification'] for v in all_q):8.2f}")
        report.setdefault("table7", {})[f"r={r}"] = {"middle": m, "mean": {
            key: mean(v[key] for v in all_q) for key in ("w_on_delta", "w_on_own_top", "w_on_random", "delta_norm",
                                                          "w_norm", "amplification")}}
    for r, p in PAPER_TABLE7.items():
        print(f"{'the paper, GPT-3, r=' + str(r):<32}{p['w_on_delta']:13.2f}{p['w_on_own_top']:9.2f}"
              f"{p['w_on_random']:9.2f}{p['delta_norm']:9.2f}{PAPER_W_NORM:9.2f}{PAPER_AMPLIFICATION[r]:8.1f}")
    print("the paper: ΔW correlates with W more than a random matrix does (dWq column > random), but amplifies "
          "directions W does not emphasise (dWq column << Wq column), by a large factor at low rank")

    print("\n== the spectrum of each ΔW (share of ‖ΔW‖_F² in the top directions, effective rank), mean over layers")
    for label, result in (("r=8", ranks), ("r=64", seeds64)):
        for kind, per_layer in by_kind(result, "modules").items():
            rowsk = list(per_layer.values())
            print(f"{kind + ', ' + label:<14} top1 {mean(v['top1'] for v in rowsk):.3f}  top4 "
                  f"{mean(v['top4'] for v in rowsk):.3f}  effective rank {mean(v['effective_rank'] for v in rowsk):.2f}")
            report.setdefault("spectrum", {}).setdefault(kind, {})[label] = {
                key: mean(v[key] for v in rowsk) for key in ("top1", "top2", "top4", "effective_rank")}

    written = plot_inspection(ranks, args.out / "r8_vs_r64") + plot_inspection(seeds64, args.out / "r64_seeds")
    (args.out / "lora_analysis.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\nwritten: " + ", ".join(str(p) for p in written + [args.out / "lora_analysis.json"]))


if __name__ == "__main__":
    main()
