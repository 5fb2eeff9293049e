"""The parameter report: the LoRA paper's arithmetic, d·k frozen vs r·(d+k) trained, per module and in
total. "all params" counts every parameter of the model, LoRA's included, once: PEFT's
print_trainable_parameters counts the same, plus a frozen copy it keeps of each modules_to_save module.

It reads only module shapes, so it works on a model built on the `meta` device from config.json alone.
And what a training run shows as it goes: a progress bar that moves per micro-batch (tokens/s, loss,
lr, time left), or, with the bar off, a line per logged step and evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from ..names import find_saved, kept_in_float, matches
from ..quant.base import QuantizedLinear
from ..quant.ggml import GGMLEmbedding
from .config import lora_state
from .inject import lora_modules
from .layers import LoRALinear, is_adapter_tensor


@dataclass
class ReportRow:
    pattern: str     # module name with layer numbers replaced by "*"
    count: int       # how many modules share the pattern
    d: int           # out_features
    k: int           # in_features
    r: int
    frozen: int      # d·k per module (the weight the update stands in for)
    trainable: int   # r·(d+k) per module (+ d with DoRA: the magnitudes)


@dataclass
class ParamReport:
    rows: list[ReportRow]
    saved_modules: list[tuple[str, int]]  # (modules_to_save pattern, trainable parameters in all of them)
    total: int       # every parameter of the model, LoRA included (as PEFT counts "all params")
    trainable: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{'module':<46} {'count':>5} {'d x k':>13} {'r':>3} {'frozen d*k':>12} {'trained r*(d+k)':>16}"]
        for row in self.rows:
            lines.append(f"{row.pattern:<46} {row.count:>5} {f'{row.d}x{row.k}':>13} {row.r:>3} "
                         f"{row.frozen:>12,} {row.trainable:>16,}")
        for pattern, n in self.saved_modules:
            lines.append(f"{pattern + ' (trained in full)':<46} {'':>5} {'':>13} {'':>3} {'':>12} {n:>16,}")
        lora_total = sum(row.count * row.trainable for row in self.rows)
        frozen_targets = sum(row.count * row.frozen for row in self.rows)
        lines.append(f"LoRA: {lora_total:,} trained in place of {frozen_targets:,} in the targeted layers")
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {self.percent:.4f}")
        return "\n".join(lines)


def packed_elements(module: nn.Module) -> float:
    """Logical weights per stored element of the module's `weight`: 1 for a float layer, 2 for NF4's
    two codes a byte, a ggml type's values per byte (a quantized base, or a LoRA layer over one)."""
    if isinstance(module, (QuantizedLinear, GGMLEmbedding)) or isinstance(module, LoRALinear) and module.quantized:
        return module.packed_elements
    return 1


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def param_report(model: nn.Module) -> ParamReport:
    """Count parameters as logical elements (an int8 weight counts d·k, not its bytes)."""
    groups: dict[tuple, ReportRow] = {}
    for name, m in lora_modules(model):
        # an embedding table V×d stands in for a linear layer: d = embedding_dim, k = num_embeddings
        d, k = (m.embedding_dim, m.num_embeddings) if hasattr(m, "num_embeddings") else (m.out_features, m.in_features)
        key = (_pattern(name), d, k, m.r)
        row = groups.setdefault(key, ReportRow(key[0], 0, d, k, m.r, d * k, m.r * (d + k) + (d if m.use_dora else 0)))
        row.count += 1
    saved: dict[str, int] = {}
    state = lora_state(model)
    for t in state.config.modules_to_save if state is not None else []:
        for n, mod in find_saved(model, [t]):
            saved[_pattern(n)] = saved.get(_pattern(n), 0) + sum(p.numel() for p in mod.parameters())
    total, trainable, seen = 0, 0, set()
    for module in model.modules():  # each parameter once, a packed 4-bit weight as its d·k logical elements
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = round(p.numel() * (packed_elements(module) if name == "weight" else 1))
            total, trainable = total + n, trainable + (n if p.requires_grad else 0)
    return ParamReport(list(groups.values()), list(saved.items()), total, trainable)


# Bytes of a frozen d×k linear weight stored each way, as minilora holds it in memory: int8 adds an fp32
# scale per row; NF4 holds half a byte per weight, the 8-bit code of each block of 64's absmax, one fp32
# scale per 256 blocks and an fp32 offset (double quantization).
FORMATS = ("fp32", "bf16", "int8", "nf4")


def base_bytes(d: int, k: int, fmt: str) -> int:
    n, blocks = d * k, -(-d * k // 64)
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * d,
            "nf4": n // 2 + blocks + 4 * -(-blocks // 256) + 4}[fmt]


def memory_report(model: nn.Module) -> str:
    """memory_rows as a table, in MB."""
    rows = memory_rows(model)
    lines = [f"{'base weights':<46} {'count':>5} " + " ".join(f"{f + ' MB':>10}" for f in FORMATS)]
    for pattern, (count, *sizes) in rows.items():
        lines.append(f"{pattern:<46} {count:>5} " + " ".join(f"{b / 1e6:>10.2f}" for b in sizes))
    totals = [sum(r[1 + i] for r in rows.values()) for i in range(len(FORMATS))]
    lines.append(f"{'total':<46} {'':>5} " + " ".join(f"{t / 1e6:>10.2f}" for t in totals))
    return "\n".join(lines)


def memory_rows(model: nn.Module) -> dict[str, list]:
    """{layer pattern: [count, bytes in each of FORMATS]}: the base weights per layer type, from the model's shapes alone
    (a model built on `meta` from config.json will do). The linear layers that 8-bit/4-bit loading
    quantizes change with the format; the rest (embeddings, norms, output and task heads) stay fp32 in
    the int8/nf4 columns, as load_model keeps them. LoRA's own tensors are not base weights."""
    keep = kept_in_float(model)
    rows: dict[str, list] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or is_adapter_tensor(name) or id(weight) in seen:  # a tied head is counted once
            continue
        seen.add(id(weight))
        bias = module._parameters.get("bias")
        extra = bias.numel() if bias is not None else 0
        d, k = getattr(module, "out_features", None), getattr(module, "in_features", None)
        linear = d is not None and k is not None and not matches(name, keep)  # what load_in_8bit/4bit quantize
        quantized = {"int8": linear, "nf4": linear and k % 2 == 0}  # NF4 packs two codes a byte: k even
        n = round(weight.numel() * packed_elements(module))  # logical elements of a packed weight
        sizes = [base_bytes(d, k, f) + extra * 4 if quantized.get(f) else (n + extra) * (2 if f == "bf16" else 4)
                 for f in FORMATS]
        row = rows.setdefault(_pattern(name), [0, *[0] * len(FORMATS)])
        row[0] += 1
        row[1:] = [t + s for t, s in zip(row[1:], sizes)]
    return rows
