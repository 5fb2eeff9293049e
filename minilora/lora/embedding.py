"""LoRA on an embedding table, as PEFT has it: the lookup goes into A (r×V), then through B (d×r), so
r·(V + d) numbers train instead of V·d. Named adapters side by side, as LoRALinear holds them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import LoRALinear, adapter_dtype, check_lora_hyperparameters, rows_of, scale


class EmbeddingAdapter(nn.Module):
    """One adapter on an embedding table (PEFT's layout): A is r×V and starts at zero, B is d×r and starts
    random (the reverse of linear layers), so the table starts unchanged. No dropout (a dropped token id
    means nothing), no DoRA."""

    use_dora = False

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, alpha: float, use_rslora: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        check_lora_hyperparameters(r, alpha, 0.0, min(num_embeddings, embedding_dim))
        self.r, self.alpha, self.use_rslora, self.scaling = r, alpha, use_rslora, scale(r, alpha, use_rslora)
        where = "meta" if device.type == "meta" else "cpu"  # the CPU's RNG, then moved (as LoRAAdapter)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, dtype=dtype, device=where).to(device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, dtype=dtype, device=where))
        nn.init.normal_(self.lora_embedding_B)
        self.lora_embedding_B.data = self.lora_embedding_B.data.to(device)

    def forward(self, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.t(), padding_idx)  # (..., r): a lookup into A
        return after_a @ self.lora_embedding_B.t() * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · (B A)ᵀ, shape (V, d), the update of every row of the table."""
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def settings(self) -> tuple:
        return self.r, self.alpha, self.use_rslora, 0.0, False


class LoRAEmbedding(nn.Module):
    """A frozen embedding table plus low-rank updates, as PEFT has it: the row of token i is
    W0[i] + s · (B A)ᵀ[i] = W0[i] + s · B · A[:, i]. So the lookup goes into A (r×V) first, then through
    B (d×r): r·(V + d) numbers trained instead of V·d. Named adapters side by side, as LoRALinear."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, use_rslora: bool = False,
                 adapter_name: str = "default") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.rows = None  # a mixed-adapter batch (mixed.py)
        self.add_adapter(adapter_name, r, alpha, use_rslora=use_rslora)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        if use_dora:
            raise ConfigError("DoRA on an embedding layer is not supported: leave the embeddings out of the targets")
        self.adapters[name] = EmbeddingAdapter(self.num_embeddings, self.embedding_dim, r, alpha, use_rslora,
                                               adapter_dtype(self.weight, lora_dtype), self.weight.device)
        self.active_adapters = [name]

    adapter = LoRALinear.adapter
    active = LoRALinear.active
    merged = LoRALinear.merged

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        if self.disabled:
            return out
        if self.rows is not None:  # a mixed-adapter batch (mixed.py): each adapter adds to its own rows
            for name, idx in rows_of(self, ids).items():
                out = out.index_add(0, idx, self.adapters[name](ids.index_select(0, idx), self.padding_idx).to(out.dtype))
            return out
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = out + self.adapters[name](ids, self.padding_idx).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        return self.adapter.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                self.weight += self.adapters[name].delta_weight().to(self.weight.dtype)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in fp32 at least, without changing the layer (W0 where no adapter acts now)."""
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.disabled:
            return weight
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                weight = weight + self.adapters[name].delta_weight().to(weight.dtype)
        return weight

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self.weight -= self.adapters[name].delta_weight().to(self.weight.dtype)
        self.merged_adapters = []

    def extra_repr(self) -> str:
        a = self.adapter
        lora = f"r={a.r}, alpha={a.alpha}" if a is not None else "no active adapter"
        return f"{self.num_embeddings}, {self.embedding_dim}, {lora}, merged={self.merged}"

    lora_embedding_A = property(lambda self: None if self.adapter is None else self.adapter.lora_embedding_A)
    lora_embedding_B = property(lambda self: None if self.adapter is None else self.adapter.lora_embedding_B)
    r = LoRALinear.r
    alpha = LoRALinear.alpha
    scaling = LoRALinear.scaling
    use_rslora = LoRALinear.use_rslora
    use_dora = property(lambda self: False)


LoRALayer = (LoRALinear, LoRAEmbedding)
