"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

A pretrained linear layer h = W0 x + b, with W0 of shape d×k (out×in), is frozen. Next to it we train
a low-rank update ΔW = B A, with A: r×k and B: d×r and r much smaller than d and k (paper, eq. 3):

    h = W0 x + b + (alpha / r) · B A x

Only r·(d + k) numbers are trained instead of d·k. A starts random and B starts at zero, so B A = 0
and the model at step 0 is exactly the pretrained one (paper, section 4.1).

A layer holds its named adapters side by side (`adapters`: name -> LoRAAdapter, each with its own A,
B, scale and dropout); those named in `active_adapters` add their term to the frozen output, so the
base model alone is "no adapter active", not a copy. Variants live beside the plain adapter, each its
own class with its own term and merge:

DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024, arXiv:2402.09353, eq. 5) splits the
adapted weight into a magnitude per output row and a direction, and trains both:

    W' = m · (W0 + s·B A) / ||W0 + s·B A||_row        h = W' x + b

m (d numbers) starts as the row norms of W0, so W' = W0 at step 0; the norm is taken as a constant in
the backward pass (paper, section 4.3), so no d×k gradient is ever formed.

The layers keep the base layer's `weight` and `bias` as their own, so every existing state-dict name
stays; inject.py puts them on a model by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels import LoRAFunction
from ..quant.base import QuantizedLinear

# The names of an adapter's own tensors in a LoRA layer (as PEFT names them): anything else is the base's.
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def is_adapter_tensor(name: str) -> bool:
    """Is this state-dict name one of a LoRA layer's own tensors (model.layers.0.q_proj.adapters.default.lora_A.weight)?"""
    return any(part in ADAPTER_PARTS for part in name.split("."))


def scale(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), which keeps the update's size
    steady as r grows."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def adapter_dtype(base: torch.Tensor, lora_dtype: torch.dtype | None) -> torch.dtype:
    """Adapters train in fp32 unless asked otherwise or the base is already fp32/fp64."""
    return lora_dtype or (base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32)


class LoRAAdapter(nn.Module):
    """One adapter on one linear layer: ΔW = s · B A, with A (r×k) Kaiming-uniform (as nn.Linear is) and
    B (d×r) zero, so the layer starts equal to its base. Initialised on the CPU, from its RNG, then moved:
    the same seed gives the same adapter on any device."""

    use_dora = False

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, dtype: torch.dtype, device: torch.device, base: LoRALinear | None = None) -> None:
        super().__init__()
        check_lora_hyperparameters(r, alpha, dropout, min(in_features, out_features))
        self.r, self.alpha, self.use_rslora, self.scaling = r, alpha, use_rslora, scale(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device="meta" if device.type == "meta" else "cpu", dtype=dtype)
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device)
        self.lora_B.to(device)

    def forward(self, layer: LoRALinear, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The term this adapter adds to the frozen output `base` = W0 x + b: s · B(A(dropout(x)))."""
        if not torch.is_autocast_enabled(x.device.type):  # bf16 activations into an fp32 adapter
            x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d, k), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def fold(self, layer: LoRALinear, w: torch.Tensor, remember: bool = False) -> torch.Tensor:
        """The weight with this update merged in: W + ΔW (`remember`: for an exact unfold later)."""
        return w + self.delta_weight().to(w.dtype)

    def unfold(self, layer: LoRALinear, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight().to(w.dtype)

    def settings(self) -> tuple:
        """(r, alpha, use_rslora, dropout, use_dora): what an adapter file must agree with to load here."""
        return self.r, self.alpha, self.use_rslora, getattr(self.dropout, "p", 0.0), self.use_dora


class DoRAAdapter(LoRAAdapter):
    """DoRA's adapter (see the module's docstring): the plain A and B, plus the magnitude m (d,), which
    starts as the row norms of W0 (read from the layer it is made for, `base`)."""

    use_dora = True

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, dtype: torch.dtype, device: torch.device, base: LoRALinear | None = None) -> None:
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, dtype, device)
        norm = torch.empty(out_features, device=device) if device.type == "meta" else base.base_weight().norm(dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    def forward(self, layer: LoRALinear, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """DoRA's h = (m / n) ⊙ (W0 x + s·B A x) + b, n = ||W0 + s·B A|| per output row, held constant,
        written as the term it adds to base = W0 x + b, as PEFT computes it: with LoRA's dropout active
        in training, (m/n - 1) ⊙ W0 x_d + (m/n) ⊙ s·B A x_d uses the dropped-out x_d."""
        dropped = self.training and isinstance(self.dropout, nn.Dropout)
        x_d = self.dropout(x) if dropped else x
        # n is a constant (paper, section 4.3): no d×k gradient, ever. It needs W0 itself, so a quantized
        # base is dequantized whole here once per forward (as PEFT does), unlike its blockwise product.
        with torch.no_grad():
            n = (layer.base_weight() + self.delta_weight().to(torch.float32)).norm(dim=1)
        ratio = self.lora_magnitude_vector / n.to(self.lora_magnitude_vector.dtype)  # m / n, (d,)
        base_d = layer.base(x_d, bias=False) if dropped else base if layer.bias is None else base - layer.bias  # W0 x_d
        autocast = torch.is_autocast_enabled(x.device.type)
        lora = self.lora_B(self.lora_A(x_d if autocast else x_d.to(self.lora_A.weight.dtype))) * self.scaling
        # (m/n - 1) W0 x_d + (m/n) s B A x_d, grouped so that autograd keeps one (N, d) tensor for m's gradient
        return ratio * (base_d + lora) - base_d

    def fold(self, layer: LoRALinear, w: torch.Tensor, remember: bool = False) -> torch.Tensor:
        """(m / ||W + ΔW||) ⊙ (W + ΔW); with `remember`, the norm is kept (and moves with the layer) to
        unfold exactly."""
        merged = w + self.delta_weight().to(w.dtype)
        norm = merged.norm(dim=1)
        if remember:
            self.register_buffer("merged_norm", norm, persistent=False)
        return merged * (self.lora_magnitude_vector.to(w.dtype) / norm)[:, None]

    def unfold(self, layer: LoRALinear, w: torch.Tensor) -> torch.Tensor:
        w = w / (self.lora_magnitude_vector.to(w.dtype) / self.merged_norm)[:, None]
        return w - self.delta_weight().to(w.dtype)


class LoRALinear(nn.Module):
    """A frozen linear layer plus trainable low-rank paths: h = W0 x + b + Σ s · B(A(dropout(x))) over the
    active adapters (one, usually). Shapes: weight W0 is (d, k) = (out_features, in_features); each
    adapter's lora_A.weight is (r, k) and lora_B.weight (d, r). `lora_A`, `lora_B`, `r`, `scaling`, ...
    read the first active adapter's (PEFT's single-adapter view).

    The LoRA path is computed as x -> A -> B, never as a d×k product B·A added to W0: autograd then
    needs no d×k weight gradient, which is the work LoRA exists to avoid. W0 gets no gradient at all,
    only the input gets one through it. The base may be quantized (quant/base.QuantizedLinear): the
    layer then takes over its stored weight and state and computes W0 x with the base's own product.
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, lora_dtype: torch.dtype | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base layer's own parameters under their own names: the model's state-dict names stay those
        # of the checkpoint, so loading, saving merged weights and PEFT's adapter keys need no renaming.
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.set_base(base)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []   # folded into W0 now (merge), in merge order
        self.disabled = False                  # see inject.adapter_disabled(): the base layer alone
        self.rows = None                       # a mixed-adapter batch (mixed.py): (rows, {adapter: row indices})
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, use_dora, lora_dtype)

    def set_base(self, base: nn.Linear | QuantizedLinear) -> None:
        """Take over the frozen weight of `base` (and a quantized one's scales or codes, which its product
        reads); the bias stays. LoftQ (initialise.py) calls it again to swap a float W0 for its quantized Q."""
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.quantized: type[QuantizedLinear] | None = type(base) if isinstance(base, QuantizedLinear) else None
        if self.quantized is not None:
            self.packed_elements = base.packed_elements
            for name in base.state:
                value = getattr(base, name)
                if isinstance(value, torch.Tensor):
                    self.register_buffer(name, value, persistent=False)
                else:
                    setattr(self, name, value)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        """A fresh adapter beside the others, made the active one."""
        kind = DoRAAdapter if use_dora else LoRAAdapter
        self.adapters[name] = kind(self.in_features, self.out_features, r, alpha, dropout, use_rslora,
                                   adapter_dtype(self.weight, lora_dtype), self.weight.device, base=self)
        self.active_adapters = [name]

    @property
    def adapter(self) -> LoRAAdapter | None:
        """The first active adapter (None where none of this layer's adapters is active)."""
        return self.adapters[self.active_adapters[0]] if self.active_adapters else None

    @property
    def active(self) -> bool:
        return bool(self.active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # cast once here, not once in each path below
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.rows is not None and not self.disabled:
            return self._mixed(x)
        adapters = [] if self.disabled else [self.adapters[n] for n in self.active_adapters
                                             if n not in self.merged_adapters]
        if len(adapters) == 1 and self._fast(adapters[0], x):
            a = adapters[0]  # the same sum as below, its backward written out (kernels.LoRAFunction)
            x_d = a.dropout(x) if isinstance(a.dropout, nn.Dropout) and a.dropout.training else None  # None: x
            if self.quantized is None:
                return LoRAFunction.apply(x, x_d, self.weight, self.bias, a.lora_A.weight, a.lora_B.weight, a.scaling)
            return LoRAFunction.apply(x, x_d, None, None, a.lora_A.weight, a.lora_B.weight, a.scaling,
                                      self.quantized.blockwise(self))
        base = self.base(x)  # W0 x + b
        h = base
        for adapter in adapters:
            h = h + adapter(self, x, base).to(h.dtype)  # + s · B A dropout(x)  (DoRA: its own term)
        return h

    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b for the whole batch, then each adapter's term for its own rows only (mixed.py)."""
        base = self.base(x)
        h = base
        for name, idx in rows_of(self, x).items():  # the rows of one adapter go through A and B together
            term = self.adapters[name](self, x.index_select(0, idx), base.index_select(0, idx))
            h = h.index_add(0, idx, term.to(h.dtype))
        return h

    def _fast(self, adapter: LoRAAdapter, x: torch.Tensor) -> bool:
        """LoRAFunction computes one plain adapter, in one dtype (autocast's, or all alike), over a float
        base or, in eager mode, a blockwise one (NF4, ggml's blocks: their `blockwise`)."""
        if adapter.use_dora:
            return False
        if self.quantized is not None:
            return hasattr(self.quantized, "blockwise") and not torch.compiler.is_compiling() and (
                torch.is_autocast_enabled(x.device.type) or x.dtype == adapter.lora_A.weight.dtype)
        return torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype == adapter.lora_A.weight.dtype

    def base(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen layer alone: W0 x + b (or the quantized base's own product)."""
        if self.quantized is not None:
            out = self.quantized.product(self, x)
            return out if bias or self.bias is None else out - self.bias
        return F.linear(x, self.weight, self.bias if bias else None)

    def base_weight(self) -> torch.Tensor:
        """W0 in fp32 (a quantized base dequantized)."""
        return (self.weight if self.quantized is None else self.quantized.dequantize(self)).to(torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A of the first active adapter, shape (d, k), in the adapter's dtype."""
        return self.adapter.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into W0 so inference costs one matmul. Explicit: never done by .eval()."""
        if self.quantized is not None:
            raise ConfigError("cannot merge into a quantized (int8 or 4-bit) base weight: the update would be "
                              "rounded away. Load the base model in floating point (without load_in_8bit/"
                              "load_in_4bit) and merge there, as `minilora merge` does")
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        weight, todo = self.weight.to(wide), [n for n in self.active_adapters if n not in self.merged_adapters]
        for name in todo:
            weight = self.adapters[name].fold(self, weight, remember=True)
        if todo:
            self.weight.copy_(weight)
            self.merged_adapters += todo

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight this layer computes with now, as one matrix, without changing the layer (GGUF
        export reads it), in fp32 at least: W0 inside adapter_disabled, else what merge() stores."""
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.disabled:
            return weight
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                weight = self.adapters[name].fold(self, weight)
        return weight

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged updates back out of W0 (exact up to floating-point rounding)."""
        if not self.merged_adapters:
            return
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        for name in reversed(self.merged_adapters):
            weight = self.adapters[name].unfold(self, weight)
        self.weight.copy_(weight)
        self.merged_adapters = []

    def extra_repr(self) -> str:
        a = self.adapter
        lora = f"r={a.r}, alpha={a.alpha}, scaling={a.scaling:g}" + (", dora" if a.use_dora else "") \
            if a is not None else "no active adapter"
        return f"in_features={self.in_features}, out_features={self.out_features}, {lora}, merged={self.merged}"

    # The first active adapter's parts under the layer's own names (PEFT's single-adapter view).
    lora_A = property(lambda self: None if self.adapter is None else self.adapter.lora_A)
    lora_B = property(lambda self: None if self.adapter is None else self.adapter.lora_B)
    lora_magnitude_vector = property(lambda self: getattr(self.adapter, "lora_magnitude_vector", None))
    r = property(lambda self: self.adapter.r)
    alpha = property(lambda self: self.adapter.alpha)
    scaling = property(lambda self: self.adapter.scaling)
    use_rslora = property(lambda self: self.adapter.use_rslora)
    use_dora = property(lambda self: self.adapter.use_dora)
    dropout = property(lambda self: self.adapter.dropout)




def a_and_b(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's A (r×k) and B (d×r) tensors, a linear layer's or an embedding's."""
    if hasattr(adapter, "lora_embedding_A"):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def rows_of(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mixed batch's {adapter: row indices} in this layer, the batch checked to have one row per name."""
    size, rows = layer.rows
    if x.shape[0] != size:
        raise ConfigError(f"adapter_names gives {size} names, the batch has {x.shape[0]} rows: one name per row")
    return rows


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
