"""What training minimises and evaluation reports: the summed loss of a batch with its count of targets
(next-token cross-entropy for a language model, through the fused head kernel where the head is
frozen; cross-entropy of the class logits for a classifier), and evaluation over a dataset (loss and
perplexity; loss, accuracy and F1). Under torchrun each rank evaluates its share and the sums meet.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.records import IGNORE
from ...kernels import LinearCrossEntropy

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    With a frozen plain output head (the usual LoRA case), the head and the loss are fused
    (`LinearCrossEntropy`): the (B, T, vocab) logits never exist at once, their gradient is computed
    while they do, instead of a second pass through a log-softmax backward, and positions without a
    target (padding, a prompt not trained on) cost no head matmul at all."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # token t predicts t+1
    head = getattr(model, "lm_head", None)
    quantized = hasattr(head, "rows")  # a head kept in blocks (tied to a GGUF embedding): read a block at a time
    if (type(head) is nn.Linear or quantized) and not head.weight.requires_grad and hasattr(model, "hidden_states") \
            and (head.bias is None or not head.bias.requires_grad):
        h, targets = model.hidden_states(ids, attention_mask=mask).flatten(0, 1), shifted.flatten()
        keep = targets != IGNORE  # no head work for padding and masked prompt positions
        loss = LinearCrossEntropy.apply(h[keep], head.weight, head.bias, targets[keep], IGNORE,
                                        head.rows if quantized else None)
    else:
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((shifted != IGNORE).sum())
