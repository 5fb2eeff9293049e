"""What an adapter learned, measured as the LoRA paper does in its section 7 (Hu et al. 2021), in float64.

  spectrum(ΔW)                 the singular values of ΔW = s·B·A: how much of ‖ΔW‖_F² the top 1, 2, 4
                               directions carry, and the effective rank exp(H(p)), p the singular values
                               normalised to sum 1 (Roy & Vetterli 2007): 1 for a rank-1 update, r for r
                               equal directions
  subspace_similarity(A1, A2)  the paper's eq. 4: φ(A1, A2, i, j) = ‖U1ⁱᵀ U2ʲ‖²_F / min(i, j), with Uⁱ the
                               top-i right-singular vectors of A (its rows' space), in [0, 1]; the grid
                               over i and j is the paper's Figure 3
  amplification(W, ΔW)         ‖Uᵀ W Vᵀ‖_F with U, V ΔW's top-r singular vectors (how much of W lies in
                               ΔW's subspace), against W's own top-r directions and a random subspace,
                               and ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F (the paper's Table 7: about 21.5 for r = 4 on
                               GPT-3's W_q)
  inspect(model)               per LoRA module: r, ‖ΔW‖_F, the energy shares, the effective rank, and
                               with the base's weights the projection and amplification
  inspect_adapter(folder)      the same from an adapter's files (minilora's or PEFT's), with a base model
                               (float or quantized: W dequantized) and another adapter to compare
  plot_inspection(result, dir) singular_values.png, similarity.png (the Figure 3 heatmaps) and
                               inspect.json with every number (matplotlib: the optional extra `plot`)

DoRA adapters are measured on their low-rank part s·B·A (the magnitudes aside: the result says
use_dora); LoRA on embeddings (lora_embedding_A/B) is left out and named. A zero ΔW (an adapter not
trained yet) has no subspace: its projection and amplification are None.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..formats.safetensors import check_tensor
from ..quant.base import QuantizedLinear
from .inject import lora_modules
from .layers import LoRALinear
from .peft_files import PREFIX, lora_config_from_peft, read_adapter, refuse_another_base

SHARES = (1, 2, 4)


def delta_weight(layer: LoRALinear) -> torch.Tensor:
    """ΔW = s · B A of a LoRA layer's active adapter, (d, k) float64."""
    return layer.scaling * (layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double())


def adapter_factors(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scale)} of an adapter folder (minilora's or PEFT's), read from its files alone;
    each pair checked against adapter_config.json's rank for it (the scale depends on it) and for
    finite values."""
    return factors_of(folder, *read_adapter(folder))


def factors_of(folder, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """adapter_factors() of an adapter already read (read_adapter's config and tensors)."""
    settings = lora_config_from_peft(config, Path(folder) / "adapter_config.json", list(tensors))
    out = {}
    for key, a in sorted(tensors.items(), key=lambda item: natural(item[0])):
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            r, alpha = settings.settings_for(module)
            where = f"{folder}: {key.removesuffix('.lora_A.weight')}"
            if b is None:
                raise CheckpointError(f"{where}: lora_A without its lora_B")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise CheckpointError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, expected (r, in) "
                                      f"and (out, r) with r = {r} as adapter_config.json gives for it")
            for part, tensor in (("lora_A", a), ("lora_B", b)):  # as load_adapter checks them
                check_tensor(f"{folder}", key.replace(".lora_A.", f".{part}."), tensor, floating=True)
            out[module] = (a.double(), b.double(), alpha / (r ** 0.5 if settings.use_rslora else r))
    return out


def natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def spectrum(delta: torch.Tensor) -> dict[str, float]:
    """‖ΔW‖_F, the share of ‖ΔW‖_F² in the top 1, 2 and 4 singular directions, and the effective rank."""
    s = torch.linalg.svdvals(delta.double())
    energy = s.square()
    total = float(energy.sum())
    out = {"norm": total ** 0.5}
    for k in SHARES:
        out[f"top{k}"] = float(energy[:k].sum()) / total if total else 0.0
    p = s / s.sum() if total else s
    p = p[p > 0]
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum())) if total else 0.0
    return out


def right_singular(a: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r × k) as rows, the largest singular value first: (r, k) float64."""
    return torch.linalg.svd(a.double(), full_matrices=False).Vh


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1ⁱᵀ U2ʲ‖²_F / min(i, j): U the right-singular vectors of A (r × k), top i and j."""
    u1, u2 = right_singular(a1)[:i].t(), right_singular(a2)[:j].t()
    return float((u1.t() @ u2).square().sum()) / min(i, j)


def similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> list[list[float]]:
    """φ for i = 1 .. rank(A1) and j = 1 .. rank(A2) (rows i, columns j): one SVD of each A, then every
    ‖U1ⁱᵀ U2ʲ‖²_F at once as the 2-D running sum of the squared overlaps (U1ᵀU2)²."""
    overlap = (right_singular(a1) @ right_singular(a2).t()).square().cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return (overlap / torch.minimum(i, j)).tolist()


def amplification(weight: torch.Tensor, delta: torch.Tensor, r: int | None = None,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """How W relates to ΔW's r-dimensional subspace: ‖Uᵀ W Vᵀ‖_F for ΔW's top-r singular vectors, W's own
    top-r directions and a random r-dimensional subspace; ‖ΔW‖_F; and the factor ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F."""
    w, d = weight.detach().double(), delta.detach().double().to(weight.device)
    r = r or int(torch.linalg.matrix_rank(d))
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    own_top = float(torch.linalg.svdvals(w)[:r].norm())  # ‖U_rᵀ W V_rᵀ‖_F for W's own top r: its top r σ
    proj = lambda left, right: float((left.t() @ w @ right.t()).norm())
    g = generator or torch.Generator().manual_seed(0)
    ru = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=torch.float64)).Q.to(w.device)
    rv = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64)).Q.t().to(w.device)
    delta_norm = float(d.norm())
    on_delta = proj(u[:, :r], vh[:r]) if delta_norm else None  # a zero ΔW has no subspace
    return {"r": r, "delta_norm": delta_norm, "w_on_delta": on_delta, "w_on_own_top": own_top,
            "w_on_random": proj(ru, rv), "w_norm": float(w.norm()),
            "amplification": delta_norm / on_delta if on_delta else None}


def measure(a: torch.Tensor, b: torch.Tensor, scale: float, weight: torch.Tensor | None = None) -> dict[str, float]:
    """One module's row: r, the spectrum of ΔW = scale · B A, and with the base `weight` the projection of W
    on ΔW's subspace and the amplification."""
    delta = scale * (b.detach().double() @ a.detach().double())
    row = {"r": a.shape[0], **spectrum(delta)}
    if weight is not None:
        row.update({k: v for k, v in amplification(weight, delta, a.shape[0]).items() if k != "r"})
    return row


def inspect(model: nn.Module, with_base: bool = False) -> dict[str, dict[str, float]]:
    """Per LoRA layer of `model` (its active adapter): measure(), with `with_base` on the base weight W
    (dequantized for an int8/4-bit base)."""
    return {name: measure(layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                          layer.base_weight() if with_base else None)
            for name, layer in lora_modules(model) if isinstance(layer, LoRALinear)}


def linear_weight(module: nn.Module) -> torch.Tensor:
    """W of a linear layer in float32: a LoRA layer's base, a quantized (int8, NF4, GGUF) one dequantized."""
    if isinstance(module, LoRALinear):
        return module.base_weight()
    if isinstance(module, QuantizedLinear):
        return module.dequantize().float()
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layers keep W as (in, out)
        return module.weight.detach().float().t()
    return module.weight.detach().float()


def embedding_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules of an adapter with LoRA on embeddings (lora_embedding_A/B), which are not measured."""
    return sorted({k.removeprefix(PREFIX).split(".lora_embedding_A")[0] for k in tensors if ".lora_embedding_A" in k})


def inspect_adapter(folder, base: nn.Module | None = None, compare=None) -> dict:
    """The section-7 measurements of an adapter folder: {"modules": {name: measure() row},
    "singular_values": {name: [σ1, σ2, ...] of ΔW}, "similarity": {name: φ grid} (with `compare`, another
    adapter's folder), "skipped": embedding modules}. With `base` (the model the adapter was trained on,
    in float or quantized) each row also has W's projection on ΔW's subspace and the amplification."""
    config, tensors = read_adapter(folder)
    if base is not None:
        refuse_another_base(base, folder)
    factors = factors_of(folder, config, tensors)
    if not factors:
        raise ConfigError(f"{folder}: no LoRA A/B pairs to inspect")
    for name in factors if base is not None else ():  # all present before any work
        try:
            base.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{folder}: module {name} of the adapter is not in the base model") from None
    result = {"modules": {}, "singular_values": {}, "similarity": {}, "skipped": embedding_modules(tensors),
              "use_dora": bool(config.get("use_dora"))}
    for name, (a, b, scale) in factors.items():
        w = None
        if base is not None:  # one float (dequantized) weight at a time: a 4-bit base stays 4-bit
            w = linear_weight(base.get_submodule(name))
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise ConfigError(f"{folder}: {name} is {b.shape[0]} x {a.shape[1]} in the adapter (B {tuple(b.shape)}, "
                                  f"A {tuple(a.shape)}) but {tuple(w.shape)} in the base model: another model's adapter?")
        result["modules"][name] = measure(a, b, scale, w)
        result["singular_values"][name] = torch.linalg.svdvals(scale * (b @ a)).tolist()[:a.shape[0]]
    if compare is not None:
        other = adapter_factors(compare)
        common = [n for n in factors if n in other]
        if not common:
            raise ConfigError(f"{compare}: no module in common with {folder}")
        for name in common:
            a1, a2 = factors[name][0], other[name][0]
            if a1.shape[1] != a2.shape[1]:
                raise ConfigError(f"{compare}: {name}'s A has {a2.shape[1]} columns, {a1.shape[1]} in {folder}: "
                                  "the adapters are of different models")
            result["similarity"][name] = similarity_grid(a1, a2)
    return result


def module_kind(name: str) -> tuple[str, int | None]:
    """("model.layers.*.self_attn.q_proj", 15) for model.layers.15.self_attn.q_proj: the module's pattern
    over the layers (so GPT-2's attn.c_proj and mlp.c_proj stay apart) and its layer number."""
    number = re.search(r"\.(\d+)(?=\.|$)", name)
    if number is None:
        return name, None
    return name[:number.start()] + ".*" + name[number.end():], int(number.group(1))


def short_kind(kind: str) -> str:
    """self_attn.q_proj for model.layers.*.self_attn.q_proj: a pattern's part after the layer number."""
    return kind.split(".*.", 1)[-1]


def plot_inspection(result: dict, folder) -> list[Path]:
    """Draw inspect_adapter()'s result into `folder`: singular_values.png (each module's σ_i / ‖ΔW‖_F, a
    panel per layer type, a line per layer), similarity.png with a compared adapter (φ(i, j) heatmaps of
    the first, middle and last layer of each type, as the paper's Figure 3) and inspect.json (all of it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError("plots are drawn with matplotlib, which is not installed here: "
                          "pip install 'minilora[plot]' (or matplotlib)") from None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: a file, not a folder for the plots")
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, list[tuple[int | None, str]]] = {}
    for name in result["singular_values"]:
        kind, layer = module_kind(name)
        kinds.setdefault(kind, []).append((layer, name))
    written = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False, layout="constrained")
    for ax, (kind, names) in zip(axes[0], kinds.items()):
        cmap = plt.get_cmap("viridis")
        for n, (layer, name) in enumerate(names):
            s = torch.tensor(result["singular_values"][name])
            if not s.norm():  # an untrained module: nothing to draw
                continue
            ax.plot(range(1, len(s) + 1), (s / s.norm()).tolist(), color=cmap(n / max(1, len(names) - 1)),
                    lw=1, marker="." if len(s) <= 16 else None, label=f"layer {layer}" if n in (0, len(names) - 1) else None)
        ax.set(title=short_kind(kind), xlabel="singular direction i", ylabel="σ_i / ‖ΔW‖_F", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("singular values of ΔW = s·B·A (first layer purple, last yellow)", fontsize=9)
    written.append(folder / "singular_values.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if result["similarity"]:
        by_kind: dict[str, list[str]] = {}
        for name in result["similarity"]:
            by_kind.setdefault(module_kind(name)[0], []).append(name)
        picks = {kind: list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]])) for kind, names in by_kind.items()}
        cols = max(map(len, picks.values()))
        fig, axes = plt.subplots(len(picks), cols, figsize=(3.8 * cols, 3.4 * len(picks)), squeeze=False,
                                 layout="constrained")
        for row, (kind, names) in zip(axes, picks.items()):
            for ax, name in zip(row, names):
                grid = result["similarity"][name]
                image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                                  extent=(0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5))
                ax.set(title=f"{short_kind(kind)}, layer {module_kind(name)[1]}", xlabel="j (compared adapter)",
                       ylabel="i (this adapter)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            for ax in row[len(names):]:
                ax.axis("off")
            fig.colorbar(image, ax=row.tolist())
        fig.suptitle("φ(A1, A2, i, j) = ‖U1ⁱᵀ U2ʲ‖²_F / min(i, j)  (LoRA paper, eq. 4 and Figure 3)", fontsize=9)
        written.append(folder / "similarity.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    written.append(folder / "inspect.json")
    written[-1].write_text(json.dumps(result, indent=1) + "\n")
    return written
