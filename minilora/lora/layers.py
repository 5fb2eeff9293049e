"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685), and DoRA.

A pretrained linear layer h = W0 x + b, with W0 of shape d×k (out×in), is frozen. Next to it we train
a low-rank update ΔW = B A, with A: r×k and B: d×r and r much smaller than d and k (paper, eq. 3):

    h = W0 x + b + (alpha / r) · B A x

Only r·(d + k) numbers are trained instead of d·k. A starts random and B starts at zero, so B A = 0
and the model at step 0 is exactly the pretrained one (paper, section 4.1).

DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024, arXiv:2402.09353, eq. 5) splits the
adapted weight into a magnitude per output row and a direction, and trains both:

    W' = m · (W0 + s·B A) / ||W0 + s·B A||_row        h = W' x + b

m (d numbers) starts as the row norms of W0, so W' = W0 at step 0; the norm is taken as a constant in
the backward pass (paper, section 4.3), so no d×k gradient is ever formed.

This file holds the layers only: `LoRALinear` (with DoRA as an option) and `LoRAEmbedding`; each keeps
the base layer's `weight` and `bias` as its own, so every existing state-dict name stays. inject.py
puts them on a model by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels import LoRAFunction

# The names of an adapter's own tensors in a LoRA layer (as PEFT names them): anything else is the base's.
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def is_adapter_tensor(name: str) -> bool:
    """Is this state-dict name one of a LoRA layer's own tensors (model.layers.0.q_proj.lora_A.weight)?"""
    return any(part in ADAPTER_PARTS for part in name.split("."))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank path: h = W0 x + b + s · B(A(dropout(x))), with
    s = alpha/r (or alpha/sqrt(r) with `use_rslora`, Kalajdzievski 2023); with `use_dora`, DoRA's
    magnitude and direction (see the module's docstring and dora()).

    Shapes: weight W0 is (d, k) = (out_features, in_features); lora_A.weight is (r, k); lora_B.weight
    is (d, r); lora_magnitude_vector is (d,). A is initialised Kaiming-uniform (as `nn.Linear` is), B
    with zeros, so the layer starts equal to the base layer.

    The LoRA path is computed as x -> A -> B, never as a d×k product B·A added to W0: autograd then
    needs no d×k weight gradient, which is the work LoRA exists to avoid. W0 gets no gradient at all,
    only the input gets one through it.
    """
    is_linear = True  # a target for a second named adapter (inject.add_adapter)
    # what one adapter is, on this layer: several named adapters swap these (inject.set_adapter)
    slot = ("lora_A", "lora_B", "lora_magnitude_vector", "r", "alpha", "scaling", "use_rslora", "use_dora", "dropout")

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base layer's own parameters under their own names: the model's state-dict names stay those
        # of the checkpoint, so loading, saving merged weights and PEFT's adapter keys need no renaming.
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        # A quantized base (quant.Int8Linear) brings its own function and state, e.g. the weight scales.
        self.base_linear = getattr(type(base), "linear", None)
        self.base_dequantize = getattr(type(base), "dequantize", None)
        for name in getattr(base, "carried", ()):
            value = getattr(base, name)
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)
        self.merged = False
        self.disabled = False  # see adapter_disabled(): the base layer alone
        self.stored: dict[str, dict] = {}  # named adapters other than the active one
        self.new_adapter(r, alpha, dropout, use_rslora, use_dora, lora_dtype)

    def new_adapter(self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        """Fresh A (random), B (zero) and, for DoRA, m = the row norms of W0: the active adapter."""
        check_lora_hyperparameters(r, alpha, dropout, min(self.in_features, self.out_features))
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if lora_dtype is None:  # train the adapter in fp32 unless the base is already fp32/fp64
            lora_dtype = self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32
        # Initialised on the CPU, from its RNG, then moved: the same seed gives the same adapter on any device.
        device = self.weight.device
        factory = dict(device="meta" if device.type == "meta" else "cpu", dtype=lora_dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device)
        self.lora_B.to(device)
        self.lora_magnitude_vector = None
        if use_dora:
            norm = torch.empty(self.out_features, device=device) if device.type == "meta" else \
                self.base_weight().norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(lora_dtype))

    @property
    def active(self) -> bool:
        """Does the layer carry an adapter now? (Not when the active named adapter skips this layer.)"""
        return self.lora_A is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:  # cast once here, not once in each path below
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.merged or self.disabled or not self.active:
            return self.base(x)
        if self.use_dora:
            return self.dora(x, autocast)
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

    def dora(self, x: torch.Tensor, autocast: bool) -> torch.Tensor:
        """DoRA's h = (m / n) ⊙ (W0 x + s·B A x) + b, n = ||W0 + s·B A|| per output row, held constant.
        Written as the base output plus a correction, as PEFT computes it: with LoRA's dropout active
        in training, the correction (m/n - 1) ⊙ W0 x_d + (m/n) ⊙ s·B A x_d uses the dropped-out x_d."""
        out = self.base(x)
        dropped = self.training and isinstance(self.dropout, nn.Dropout)
        x_d = self.dropout(x) if dropped else x
        # n is a constant (paper, section 4.3): no d×k gradient, ever. It needs W0 itself, so a quantized
        # base is dequantized whole here once per forward (as PEFT does), unlike its blockwise product.
        with torch.no_grad():
            n = (self.base_weight() + self.delta_weight().to(torch.float32)).norm(dim=1)
        ratio = self.lora_magnitude_vector / n.to(self.lora_magnitude_vector.dtype)  # m / n, (d,)
        base_d = self.base(x_d, bias=False) if dropped else out if self.bias is None else out - self.bias  # W0 x_d
        lora = self.lora_B(self.lora_A(x_d if autocast else x_d.to(self.lora_A.weight.dtype))) * self.scaling
        # out + (m/n - 1) W0 x_d + (m/n) s B A x_d, grouped so that autograd keeps one (N, d) tensor for m's gradient
        return out + (ratio * (base_d + lora) - base_d).to(out.dtype)

    def base(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen layer alone: W0 x + b (or the quantized base's own product)."""
        if self.base_linear is not None:
            out = self.base_linear(self, x)
            return out if bias or self.bias is None else out - self.bias
        return F.linear(x, self.weight, self.bias if bias else None)

    def base_weight(self) -> torch.Tensor:
        """W0 in fp32 (an int8 base dequantized)."""
        return (self.weight if self.base_dequantize is None else self.base_dequantize(self)).to(torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d, k), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W0 so inference costs one matmul. Explicit: never done by .eval().
        LoRA: W0 + ΔW. DoRA: (m / n) ⊙ (W0 + ΔW), n kept to undo it exactly."""
        if self.base_linear is not None:
            raise ConfigError("cannot merge into a quantized (int8 or 4-bit) base weight: the update would be "
                              "rounded away. Load the base model in floating point (without load_in_8bit/"
                              "load_in_4bit) and merge there, as `minilora merge` does")
        if self.merged or not self.active:
            return
        if self.use_dora:  # the norm of the unmerged weight, kept (and moved with the layer) to unmerge exactly
            wide = torch.promote_types(self.weight.dtype, torch.float32)
            self.register_buffer("merged_norm", (self.weight.to(wide) + self.delta_weight().to(wide)).norm(dim=1),
                                 persistent=False)
        self.weight.copy_(self._folded())
        self.merged = True

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight this layer computes with now, as one matrix, without changing the layer (GGUF
        export reads it), in fp32 at least: W0 inside adapter_disabled, else what merge() stores."""
        return self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)) if self.disabled else self._folded()

    def _folded(self) -> torch.Tensor:
        """LoRA W0 + ΔW; DoRA (m / ‖W0 + ΔW‖) ⊙ (W0 + ΔW); W0 itself where no adapter acts or it is merged."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        if self.merged or not self.active:
            return self.weight.to(wide)
        merged = self.weight.to(wide) + self.delta_weight().to(wide)
        if self.use_dora:
            merged *= (self.lora_magnitude_vector.to(wide) / merged.norm(dim=1))[:, None]
        return merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of W0 (exact up to floating-point rounding)."""
        if not self.merged:
            return
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        weight = self.weight.to(wide)
        if self.use_dora:
            weight /= (self.lora_magnitude_vector.to(wide) / self.merged_norm)[:, None]
        self.weight.copy_(weight - self.delta_weight().to(wide))
        self.merged = False

    def extra_repr(self) -> str:
        lora = f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}" + (", dora" if self.use_dora else "") \
            if self.active else "no active adapter"
        return f"in_features={self.in_features}, out_features={self.out_features}, {lora}, merged={self.merged}"


class LoRAEmbedding(nn.Module):
    """A frozen embedding table plus a low-rank update, as PEFT has it: the row of token i is
    W0[i] + s · (B A)ᵀ[i] = W0[i] + s · B · A[:, i]. So the lookup goes into A (r×V) first, then through
    B (d×r): r·(V + d) numbers trained instead of V·d. A starts at zero and B random (PEFT's choice for
    embeddings, the reverse of linear layers), so the table starts unchanged. LoRA's dropout is not
    used (a dropped token id means nothing); neither is DoRA (refused)."""
    slot = ("lora_embedding_A", "lora_embedding_B", "r", "alpha", "scaling", "use_rslora")
    use_dora, is_embedding = False, True

    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.merged, self.disabled, self.stored = False, False, {}
        self.new_adapter(r, alpha, use_rslora=use_rslora)

    def new_adapter(self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        check_lora_hyperparameters(r, alpha, 0.0, min(self.num_embeddings, self.embedding_dim))
        if use_dora:
            raise ConfigError("DoRA on an embedding layer is not supported: leave the embeddings out of the targets")
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dtype = lora_dtype or (self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32)
        device = self.weight.device
        where = "meta" if device.type == "meta" else "cpu"  # CPU's RNG, then moved (as LoRALinear)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, dtype=dtype, device=where).to(device))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, dtype=dtype, device=where))
        nn.init.normal_(self.lora_embedding_B)
        self.lora_embedding_B.data = self.lora_embedding_B.data.to(device)

    @property
    def active(self) -> bool:
        return self.lora_embedding_A is not None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        if self.merged or self.disabled or not self.active:
            return out
        after_a = F.embedding(ids, self.lora_embedding_A.t(), self.padding_idx)  # (..., r): a lookup into A
        return out + (after_a @ self.lora_embedding_B.t() * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · (B A)ᵀ, shape (V, d), the update of every row of the table."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged and self.active:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in fp32 at least, without changing the layer (W0 where no adapter acts now)."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        if self.merged or not self.active or self.disabled:
            return self.weight.to(wide)
        return self.weight.to(wide) + self.delta_weight().to(wide)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def check_lora_hyperparameters(r: object, alpha: object, dropout: object, most: int | None = None) -> None:
    """r a positive integer (at most min(d, k) of the layer, `most`: B·A has no higher rank), alpha
    positive and finite, dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got r={r!r}")
    if most is not None and r > most:
        raise ConfigError(f"LoRA rank r={r} is above min(d, k) = {most} of this layer: a higher r adds nothing")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"LoRA alpha must be a positive finite number, got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")
