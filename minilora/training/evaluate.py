"""What training minimises and evaluation reports: the summed loss of a batch with its count of targets
(next-token cross-entropy for a language model, through the fused head kernel where the head is
frozen; cross-entropy of the class logits for a classifier), and evaluation over a dataset (loss and
perplexity; loss, accuracy and F1). Under torchrun each rank evaluates its share and the sums meet.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batching import batches
from ..data.records import Example
from . import distributed
from .objectives.causal_lm import LossFn, causal_lm_loss


@torch.no_grad()
def evaluate(model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
             loss_fn: LossFn | None = None, bf16: bool = False) -> dict[str, float]:
    """Mean loss per target token over `data`, and its perplexity."""
    loss_fn = loss_fn or causal_lm_loss
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = distributed.rank_and_world()  # each rank evaluates every world-th example
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
    for batch in batches(data, list(range(rank, len(data), world)), micro_batch_size, pad_id, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_fn(model, batch)
        sums += torch.stack([loss.detach().double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
    distributed.sum_across_ranks([sums])
    model.train(was_training)
    loss = float(sums[0]) / max(float(sums[1]), 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate_classification(model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
                            bf16: bool = False) -> dict[str, float]:
    """Mean loss, accuracy, and F1 (of class 1 with two classes, macro-averaged with more)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = distributed.rank_and_world()  # each rank evaluates every world-th example
    n_classes = model.config.num_labels
    total = torch.zeros(1, dtype=torch.float64, device=device)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device)  # [gold, predicted]
    for batch in batches(data, list(range(rank, len(data), world)), micro_batch_size, pad_id, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        total += F.cross_entropy(logits, batch["labels"], reduction="sum")
        confusion.index_put_((batch["labels"], logits.argmax(-1)), torch.ones_like(logits[:, 0], dtype=torch.float64),
                             accumulate=True)
    distributed.sum_across_ranks([total, confusion])
    model.train(was_training)
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    seen = (tp + fp + fn) > 0  # macro F1 over the classes that occur in the labels or predictions
    f1 = torch.where(seen, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    n = float(confusion.sum())
    return {"eval_loss": float(total) / n, "eval_accuracy": float(tp.sum()) / n,
            "eval_f1": float(f1[1]) if n_classes == 2 else float(f1[seen].mean())}
