"""Sequence classification: the summed cross-entropy of the class logits, one class id per example;
evaluated as the mean loss, the accuracy and F1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.records import Example
from .. import distributed
from .base import LossFn, LossFnObjective, Objective, rank_batches


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the class logits (B, num_labels), and the number of examples."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()


@dataclass
class Classification(LossFnObjective, Objective):
    """A classifier: `loss_fn` (classification_loss unless given), counted in examples; evaluated from
    the class logits whatever loss_fn is: mean cross-entropy, accuracy, and F1 (of class 1 with two
    classes, macro-averaged over the classes that occur with more)."""

    loss_fn: LossFn = classification_loss
    metrics: ClassVar[tuple[str, ...]] = ()
    eval_metrics: ClassVar[tuple[str, ...]] = ("eval_loss", "eval_accuracy", "eval_f1")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        device = next(model.parameters()).device
        n_classes = model.config.num_labels
        total = torch.zeros(1, dtype=torch.float64, device=device)
        confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device)  # [gold, predicted]
        for batch in rank_batches(model, data, pad_id, micro_batch_size, bf16):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum")
            confusion.index_put_((batch["labels"], logits.argmax(-1)),
                                 torch.ones_like(logits[:, 0], dtype=torch.float64), accumulate=True)
        distributed.sum_across_ranks([total, confusion])
        tp = confusion.diagonal()
        fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
        seen = (tp + fp + fn) > 0  # macro F1 over the classes that occur in the labels or predictions
        f1 = torch.where(seen, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
        n = float(confusion.sum())
        return {"eval_loss": float(total) / n, "eval_accuracy": float(tp.sum()) / n,
                "eval_f1": float(f1[1]) if n_classes == 2 else float(f1[seen].mean())}
