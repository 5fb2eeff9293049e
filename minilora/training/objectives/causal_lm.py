"""Next-token prediction: the summed cross-entropy of each target token given the tokens before it,
through the fused head kernel where the head is frozen; evaluated as the mean loss per target token
and its perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.records import IGNORE, Example
from ...kernels import LinearCrossEntropy
from ...quant.base import QuantizedLinear
from .. import distributed
from ..fsdp_head import TiedHead, gathered
from .base import LossFn, LossFnObjective, Objective, rank_batches


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    With a frozen plain output head (the usual LoRA case), the head and the loss are fused
    (`LinearCrossEntropy`): the (B, T, vocab) logits never exist at once, their gradient is computed
    while they do, instead of a second pass through a log-softmax backward, and positions without a
    target (padding, a prompt not trained on) cost no head matmul at all. A model whose logits are
    soft-capped (Gemma 2's final_logit_softcap) takes them from its forward instead."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # token t predicts t+1
    head = getattr(model, "lm_head", None)
    quantized = isinstance(head, QuantizedLinear)  # a head kept in blocks (tied to a GGUF embedding): read by rows
    if (type(head) in (nn.Linear, TiedHead) or quantized) and not head.weight.requires_grad and hasattr(model, "hidden_states") \
            and (head.bias is None or not head.bias.requires_grad) and getattr(model, "final_logit_softcap", None) is None:
        h, targets = model.hidden_states(ids, attention_mask=mask).flatten(0, 1), shifted.flatten()
        keep = targets != IGNORE  # no head work for padding and masked prompt positions
        with gathered(head):  # (FSDP) the head's weight whole while the loss reads it
            loss = LinearCrossEntropy.apply(h[keep], head.weight, head.bias, targets[keep], IGNORE,
                                            head.rows if quantized else None)
    else:
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((shifted != IGNORE).sum())


@dataclass
class CausalLM(LossFnObjective, Objective):
    """Language modelling: `loss_fn` (causal_lm_loss unless given) over the per-token labels, counted
    in target tokens; evaluated as the mean of that same loss per target token, and its perplexity."""

    loss_fn: LossFn = causal_lm_loss
    metrics: ClassVar[tuple[str, ...]] = ()
    eval_metrics: ClassVar[tuple[str, ...]] = ("eval_loss", "eval_perplexity")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        device = next(model.parameters()).device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, target tokens
        for batch in rank_batches(model, data, pad_id, micro_batch_size, bf16):
            loss, n = self.loss_fn(model, batch)
            sums += torch.stack([loss.detach().double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
        distributed.sum_across_ranks([sums])
        loss = float(sums[0]) / max(float(sums[1]), 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
