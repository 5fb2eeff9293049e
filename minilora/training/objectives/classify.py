"""What training minimises and evaluation reports: the summed loss of a batch with its count of targets
(next-token cross-entropy for a language model, through the fused head kernel where the head is
frozen; cross-entropy of the class logits for a classifier), and evaluation over a dataset (loss and
perplexity; loss, accuracy and F1). Under torchrun each rank evaluates its share and the sums meet.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the class logits (B, num_labels), and the number of examples."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()
