"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

A pretrained linear layer h = W0 x + b, with W0 of shape d×k (out×in), is frozen. Next to it we train
a low-rank update ΔW = B A, with A: r×k and B: d×r and r much smaller than d and k (paper, eq. 3):

    h = W0 x + b + (alpha / r) · B A x

Only r·(d + k) numbers are trained instead of d·k. A starts random and B starts at zero, so B A = 0
and the model at step 0 is exactly the pretrained one (paper, section 4.1).

This file knows nothing of model files: `apply_lora` swaps `nn.Linear` modules, found by name, for
`LoRALinear` modules that keep the same `weight` and `bias`, so every existing state-dict name stays;
of a model it reads only the output heads it declares ("all-linear" leaves those alone).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .names import CLASSIFIER_NAMES, check_regex, find_saved, find_targets, owners, replace_module


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank path: h = W0 x + b + (alpha/r) · B(A(dropout(x))).

    Shapes: weight W0 is (d, k) = (out_features, in_features); lora_A.weight is (r, k); lora_B.weight
    is (d, r). A is initialised Kaiming-uniform (as `nn.Linear` is), B with zeros, so the layer starts
    equal to the base layer. `use_rslora` scales by alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r.

    The LoRA path is computed as x -> A -> B, never as a d×k product B·A added to W0: autograd then
    needs no d×k weight gradient, which is the work LoRA exists to avoid. W0 gets no gradient at all,
    only the input gets one through it.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_lora_hyperparameters(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        if r > min(self.in_features, self.out_features):  # B·A has rank min(d, k) at most: more r adds nothing
            raise ConfigError(f"LoRA rank r={r} is above min(d, k) = {min(self.in_features, self.out_features)} of "
                              f"this {self.out_features}x{self.in_features} layer")
        # The base layer's own parameters under their own names: the model's state-dict names stay those
        # of the checkpoint, so loading, saving merged weights and PEFT's adapter keys need no renaming.
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        # A quantized base (quant.Int8Linear) brings its own function and state, e.g. the weight scales.
        self.base_linear = getattr(type(base), "linear", None)
        for name in getattr(base, "carried", ()):
            value = getattr(base, name)
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if lora_dtype is None:  # train the adapter in fp32 unless the base is already fp32/fp64
            lora_dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        # Initialised on the CPU, from its RNG, then moved: the same seed gives the same adapter on any device.
        device = base.weight.device
        factory = dict(device="meta" if device.type == "meta" else "cpu", dtype=lora_dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.merged = False
        self.disabled = False  # see adapter_disabled(): the base layer alone
        self.reset_lora_parameters()
        self.lora_A.to(device)
        self.lora_B.to(device)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:  # cast once here, not once in each path below
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.merged or self.disabled:
            return self.base(x)
        if self.base_linear is None and (autocast or x.dtype == self.weight.dtype == self.lora_A.weight.dtype):
            return LoRAFunction.apply(x, self.dropout(x), self.weight, self.bias, self.lora_A.weight,
                                      self.lora_B.weight, self.scaling)
        # The same sum through autograd's own modules: an int8 base, or activations of another dtype
        # than the adapter's (bf16 activations into an fp32 adapter, without autocast).
        out = self.base(x)
        if not autocast:
            x = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(self.dropout(x)))
        return out + (lora * self.scaling).to(out.dtype)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: W0 x + b (or the quantized base's own product)."""
        return F.linear(x, self.weight, self.bias) if self.base_linear is None else self.base_linear(self, x)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha/r) · B A, shape (d, k), in fp32 or the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into W0 so inference costs one matmul. Explicit: never done by .eval()."""
        if self.base_linear is not None:
            raise ConfigError("cannot merge into an int8 base weight: the update would be rounded away. Load the "
                              "base model in floating point (without load_in_8bit) and merge there, as "
                              "`minilora merge` does")
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of W0 (exact up to floating-point rounding)."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}")


class LoRAFunction(torch.autograd.Function):
    """h = x W0^T + b + s · (x_d A^T) B^T with its gradients written out; x_d is x after LoRA's dropout.

    With g = dL/dh, xa = x_d A^T (N×r) and gb = s · g B (N×r), the backward pass is
        dL/dB = s · g^T xa  (d×r)      dL/dA = gb^T x_d  (r×k)
        dL/dx = g W0 (+ gb A when x_d is x; else dL/dx_d = gb A)      W0, b: frozen, no gradient.
    Autograd through nn.Linear finds the same numbers, but takes dL/dB as a transposed (d×N)·(N×r)
    product, which MKL runs several times slower than the (r×N)·(N×d) one here, and keeps the two
    paths' outputs and input gradients as separate tensors to add; here the LoRA term is accumulated
    into the base output (and dL/dx) by the matmul itself. All in x's dtype, as autocast would have it."""

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_A, lora_B, scaling):
        dtype, k = x.dtype, x.shape[-1]
        x2 = x.reshape(-1, k)
        xd2 = x2 if x_d is x else x_d.reshape(-1, k)
        w, a, b = weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        xa = xd2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, xa, w, a, b)
        ctx.scaling, ctx.same_input, ctx.dtypes = scaling, x_d is x, (lora_A.dtype, lora_B.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xd2, xa, w, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        gb = (b.t() @ g.t()).t().mul_(ctx.scaling)  # = s·g B; as (r×d)(d×N), ~2x faster than (N×d)(d×r) in MKL
        grad_A = (gb.t() @ xd2).to(ctx.dtypes[0])
        grad_B = (xa.t() @ g).mul_(ctx.scaling).t().to(ctx.dtypes[1])
        shape = (*grad_out.shape[:-1], xd2.shape[-1])
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ w
            if ctx.same_input:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (gb @ a).view(shape)
        return grad_x, grad_xd, None, None, grad_A, grad_B, None


def check_lora_hyperparameters(r: object, alpha: object, dropout: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"LoRA alpha must be a positive finite number, got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")


@dataclass
class LoRAConfig:
    """LoRA's settings, in one place: what apply_lora takes, a recipe's [lora] section, and what an
    adapter file records (adapter.py maps these names to PEFT's). Kept on the model as `lora_config`.

    targets: module-name suffixes (["q_proj", "v_proj"], ["c_attn"]), one regex string over full
    names (r".*\\.h\\.[0-5]\\.attn\\.c_attn"), or "all-linear" (every linear layer but the output heads).
    modules_to_save: suffixes of modules trained in full and saved with the adapter (a classifier head)."""
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False  # scale by alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r

    def __post_init__(self) -> None:
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        targets = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        self.targets = "all-linear" if targets in (["all-linear"], ["all_linear"], "all_linear") else targets  # as PEFT
        if not (isinstance(self.targets, str) or isinstance(self.targets, list) and self.targets
                and all(isinstance(t, str) for t in self.targets)):
            raise ConfigError("LoRA targets must be a list of module names, a regex string or 'all-linear', "
                              f"got {self.targets!r}")
        if isinstance(self.targets, str):
            check_regex(self.targets, "LoRA target regex")
        saved = self.modules_to_save or []
        if not isinstance(saved, (list, tuple)) or not all(isinstance(t, str) for t in saved):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(saved)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")


def apply_lora(model: nn.Module, targets: list[str] | str | LoRAConfig, r: int = LoRAConfig.r,
               alpha: float = LoRAConfig.alpha, dropout: float = LoRAConfig.dropout,
               modules_to_save: list[str] | None = None, use_rslora: bool = LoRAConfig.use_rslora) -> nn.Module:
    """Freeze `model` and swap the targeted linear layers for LoRALinear, in place; returns the model.

    The settings are LoRAConfig's (see there), given one by one or as a whole LoRAConfig in place of
    `targets` (a recipe's [lora] section, an adapter's settings)."""
    config = targets if isinstance(targets, LoRAConfig) else \
        LoRAConfig(targets, r, alpha, dropout, modules_to_save or [], use_rslora)
    if lora_modules(model):
        raise ConfigError(f"the model already carries LoRA layers ({len(lora_modules(model))}): remove_lora(model) first")
    chosen = find_targets(model, config.targets, exclude=LoRALinear)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        # keep the model's train/eval mode: a new module starts in training mode, dropout on
        replace_module(model, name, LoRALinear(base, config.r, config.alpha, config.dropout,
                                               config.use_rslora).train(base.training))
    for t in config.modules_to_save:
        found = find_saved(model, [t])
        if not found and t in CLASSIFIER_NAMES and getattr(model, "task_type", None) == "SEQ_CLS":
            continue  # another family's name for the classifier (PEFT lists both)
        if not found:
            raise ConfigError(f"modules_to_save entry {t!r} matches no module of {type(model).__name__}")
        for n, m in found:
            if isinstance(m, LoRALinear) or not all(p.is_floating_point() for p in m.parameters()):
                raise ConfigError(f"modules_to_save entry {t!r}: {n} is adapted by LoRA or quantized, not trainable")
            for p in m.parameters():
                p.requires_grad_(True)
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapter_disabled(model: nn.Module):
    """Run the base model alone inside the block (to compare with the adapted one)."""
    layers = [m for _, m in lora_modules(model)]
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable a merged adapter: unmerge_lora(model) first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA layer's ΔW into its W0; refused where W0 is shared (a head tied to the embeddings)."""
    holders = owners(model)
    tied = [", ".join(holders[id(m.weight)]) for _, m in lora_modules(model) if len(holders[id(m.weight)]) > 1]
    if tied:
        raise ConfigError(f"a LoRA layer's weight is tied ({tied[0]}): merging it would change both")
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Swap every LoRALinear back for a plain nn.Linear (merged first unless merge=False); in place."""
    if merge:
        merge_lora(model)
    for name, m in lora_modules(model):
        if m.base_linear is not None and not merge:
            raise ConfigError(f"{name}: removing LoRA from an int8 base is not supported; reload the base model")
        if not merge:
            m.unmerge()  # the base layer as it was, even after merge_lora
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        replace_module(model, name, linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
