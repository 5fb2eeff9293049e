"""The optimizer of a run (TrainConfig.optim), under the names the Hugging Face stack gives them.

    "adamw_torch"  torch's AdamW; weights decay, biases and norms do not. With `loraplus_lr_ratio`:
                   LoRA+ (Hayou et al. 2024): B learns `loraplus_lr_ratio` times faster than A (the
                   paper's λ = η_B/η_A, 16 in its runs), since with A and B at one rate a wide layer
                   learns features inefficiently; embedding adapters take `loraplus_lr_embedding`.
                   The parameter groups are peft's `create_loraplus_optimizer`'s, in its order.
    "lorafa"       LoRA-FA (Zhang et al. 2023): A stays frozen at its start, and B's gradient g is
                   replaced by the one that best matches full fine-tuning's,
                   g̃ = (1/s²) · g · (A Aᵀ)⁻¹ (eq. 8; s the LoRA scaling), so the activations saved for
                   A's gradient are never needed. peft's `create_lorafa_optimizer`: Adam as transformers'
                   AdamW computes it (eps 1e-6 added to √v, decay after the step).

The rest of the run is the same for each: one LambdaLR schedule scales every group's lr together.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..lora.embedding import LoRAEmbedding
from ..lora.inject import all_lora_layers
from ..lora.layers import a_and_b

OPTIMIZERS = ("adamw_torch", "lorafa")
PEFT_LR_EMBEDDING = 1e-6  # create_loraplus_optimizer's loraplus_lr_embedding when none is given


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters (LoRA-FA: call freeze_for first)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optim == "lorafa":
        return LoRAFA(_decay_groups([p for _, p in named], cfg.weight_decay), _pairs(model), lr=cfg.lr,
                      betas=cfg.adam_betas)
    if cfg.loraplus_lr_ratio is not None:
        return torch.optim.AdamW(loraplus_groups(model, named, cfg.lr, cfg.loraplus_lr_ratio,
                                                 PEFT_LR_EMBEDDING if cfg.loraplus_lr_embedding is None
                                                 else cfg.loraplus_lr_embedding, cfg.weight_decay),
                                 lr=cfg.lr, betas=cfg.adam_betas)
    return torch.optim.AdamW(_decay_groups([p for _, p in named], cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas)


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def loraplus_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], lr: float, ratio: float,
                    lr_embedding: float, weight_decay: float) -> list[dict]:
    """LoRA+'s four groups, as peft makes them: A and other matrices at lr; embedding adapters at
    lr_embedding; B and every vector (DoRA's magnitudes, biases, norms) at lr·ratio, decayed unless a
    bias or a LayerNorm's (transformers' rule; an RMSNorm's weight decays)."""
    embedding = {id(p) for _, m in all_lora_layers(model) if isinstance(m, LoRAEmbedding)
                 for p in m.adapters.parameters()}
    undecayed = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in named:
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.dim() == 1:
            groups["B_no_decay" if "bias" in name or id(p) in undecayed else "B"].append(p)
        else:
            groups["A"].append(p)
    return [{"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
            {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio}]


def _adapters(model: nn.Module):
    """(layer name, adapter name, adapter) of every adapter on the model."""
    return [(n, a, m.adapters[a]) for n, m in all_lora_layers(model) for a in m.adapters]


def freeze_for(model: nn.Module, cfg) -> None:
    """LoRA-FA trains B alone: every trainable adapter's A is frozen (as peft's create_lorafa_optimizer
    does). DoRA's magnitude has no place in its derivation, so DoRA is refused."""
    if cfg.optim != "lorafa":
        return
    for layer, name, adapter in _adapters(model):
        if getattr(adapter, "use_dora", False) and adapter.lora_magnitude_vector.requires_grad:
            raise ConfigError(f"optim \"lorafa\" with DoRA ({layer}, adapter {name!r}) is not supported: LoRA-FA's "
                              "projection of B's gradient has no term for DoRA's magnitude")
    for _, _, adapter in _adapters(model):
        a, b = a_and_b(adapter)
        if b.requires_grad:
            a.requires_grad_(False)


def _pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A, B, s) of every adapter whose B trains."""
    return [(*a_and_b(adapter), adapter.scaling) for _, _, adapter in _adapters(model) if a_and_b(adapter)[1].requires_grad]


class LoRAFA(torch.optim.Optimizer):
    """Adam (transformers' AdamW form) in which each LoRA B's gradient is first projected, see above.
    `pairs` lists (A, B, s); the other parameters take plain Adam."""

    def __init__(self, groups: list[dict], pairs: list[tuple[nn.Parameter, nn.Parameter, float]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.pairs = {id(b): (a, s) for a, b, s in pairs}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if id(p) in self.pairs:  # g̃_B = (1/s²) g_B (A Aᵀ + δI)⁻¹, δ = 1e-8 as peft
                    a, s = self.pairs[id(p)]
                    a = a.float()
                    inverse = torch.linalg.pinv(a @ a.t() + 1e-8 * torch.eye(a.shape[0], device=a.device))
                    g = ((g.float() @ inverse) / s ** 2).to(g.dtype)
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
