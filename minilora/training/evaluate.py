"""Evaluation over a dataset, as functions for a caller with a model and data but no objective object:
the mean loss and perplexity of a language model, the loss, accuracy and F1 of a classifier. The
work is the objectives' own (objectives/causal_lm.py, objectives/classify.py), so that train() and
these give the same numbers. Under torchrun each rank evaluates its share and the sums meet.
"""

from __future__ import annotations

import torch.nn as nn

from ..data.records import Example
from .objectives import CausalLM, Classification, LossFn, causal_lm_loss


def evaluate(model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
             loss_fn: LossFn | None = None, bf16: bool = False) -> dict[str, float]:
    """Mean loss per target token over `data` (causal_lm_loss unless loss_fn is given), and its perplexity."""
    return CausalLM(loss_fn or causal_lm_loss).evaluate(model, data, pad_id, micro_batch_size, bf16)


def evaluate_classification(model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
                            bf16: bool = False) -> dict[str, float]:
    """Mean loss, accuracy, and F1 (of class 1 with two classes, macro-averaged with more)."""
    return Classification().evaluate(model, data, pad_id, micro_batch_size, bf16)
