"""What training minimises: an objective turns a micro-batch into (summed loss, count, metrics) and
scores a dataset (the `Objective` protocol, base.py).

One file per objective; `train()` takes any object with the `Objective` interface, and OBJECTIVES
names the ones that ship, so that a recipe can one day say which to use by name.
"""

from __future__ import annotations

from ...data.records import Example
from .base import LossFn, Objective
from .causal_lm import CausalLM, causal_lm_loss
from .classify import Classification, classification_loss

OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM, "classification": Classification}

__all__ = ["OBJECTIVES", "CausalLM", "Classification", "LossFn", "Objective", "as_objective",
           "causal_lm_loss", "classification_loss", "objective_for"]


def objective_for(examples: list[Example], loss_fn: LossFn | None = None) -> Objective:
    """The objective the examples call for: one class id per example trains a classifier, per-token
    labels (or no examples at all, which train() refuses by name) a language model. A loss_fn takes
    the place of that objective's loss; its evaluation stays as it is (a language model's is the mean
    of that same loss, a classifier's the loss, accuracy and F1 of its logits)."""
    kind = OBJECTIVES["classification" if examples and isinstance(examples[0].labels, int) else "causal_lm"]
    return kind() if loss_fn is None else kind(loss_fn)


def as_objective(objective_or_loss_fn: Objective | LossFn | None) -> Objective:
    """An objective as it is; a bare loss function (model, batch) -> (summed loss, count) as the
    objective whose loss it is; None as next-token prediction."""
    if isinstance(objective_or_loss_fn, Objective):
        return objective_or_loss_fn
    return CausalLM(objective_or_loss_fn or causal_lm_loss)
