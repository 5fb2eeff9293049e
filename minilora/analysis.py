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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .adapter import PREFIX, lora_config_from_peft, read_adapter
from .inject import lora_modules
from .lora import LoRALinear

SHARES = (1, 2, 4)


def delta_weight(layer: LoRALinear) -> torch.Tensor:
    """ΔW = s · B A of a LoRA layer's active adapter, (d, k) float64."""
    return layer.scaling * (layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double())


def adapter_factors(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A, B, scale)} of an adapter folder (minilora's or PEFT's), read from its files alone."""
    config, tensors = read_adapter(folder)
    settings = lora_config_from_peft(config, Path(folder) / "adapter_config.json", list(tensors))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            r, alpha = settings.settings_for(module)
            out[module] = (a.double(), b.double(), alpha / (r ** 0.5 if settings.use_rslora else r))
    return out


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


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1ⁱᵀ U2ʲ‖²_F / min(i, j): U the right-singular vectors of A (r × k), top i and j."""
    u1 = torch.linalg.svd(a1.double(), full_matrices=False).Vh[:i].t()
    u2 = torch.linalg.svd(a2.double(), full_matrices=False).Vh[:j].t()
    return float((u1.t() @ u2).square().sum()) / min(i, j)


def similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> list[list[float]]:
    """φ for i = 1 .. rank(A1) and j = 1 .. rank(A2) (rows i, columns j)."""
    return [[subspace_similarity(a1, a2, i, j) for j in range(1, a2.shape[0] + 1)] for i in range(1, a1.shape[0] + 1)]


def amplification(weight: torch.Tensor, delta: torch.Tensor, r: int | None = None,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """How W relates to ΔW's r-dimensional subspace: ‖Uᵀ W Vᵀ‖_F for ΔW's top-r singular vectors, W's own
    top-r directions and a random r-dimensional subspace; ‖ΔW‖_F; and the factor ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F."""
    w, d = weight.detach().double(), delta.detach().double()
    r = r or int(torch.linalg.matrix_rank(d))
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
    proj = lambda left, right: float((left.t() @ w @ right.t()).norm())
    g = generator or torch.Generator().manual_seed(0)
    ru = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=torch.float64)).Q.to(w.device)
    rv = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64)).Q.t().to(w.device)
    delta_norm = float(d.norm())
    on_delta = proj(u[:, :r], vh[:r])
    return {"r": r, "delta_norm": delta_norm, "w_on_delta": on_delta, "w_on_own_top": proj(uw[:, :r], vhw[:r]),
            "w_on_random": proj(ru, rv), "w_norm": float(w.norm()),
            "amplification": delta_norm / on_delta if on_delta else float("inf")}


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
