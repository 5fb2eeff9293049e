"""The contract between the training loop and what it minimises: the `Objective` protocol.

The loop never asks which task it trains. It hands an objective each micro-batch and adds up what
comes back; it hands it the evaluation data and logs the scores. So a new objective (DPO, GRPO, ...)
is one new file with a class of this shape, and one line in OBJECTIVES (objectives/__init__.py).
An objective that samples its own data from the model (GRPO) is a `RolloutObjective` as well.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

from ...data.batching import batches
from ...data.records import Example
from .. import distributed

# A bare loss function: (model, batch) -> (summed loss, count), what train(loss_fn=...) takes
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@runtime_checkable
class Objective(Protocol):
    """What training minimises and evaluation reports.

    `loss` returns sums, not means: the loss summed over what it covers (target tokens, examples,
    pairs) and how many that was. The loop backpropagates each micro-batch's sum and divides the
    gradients once by the count of the whole step, over every micro-batch and every rank, so that
    accumulation gives exactly the gradient of one big batch. Its metrics are further sums over the
    same count (a reward margin, say), which the loop logs as their means beside the loss; their names
    are declared in `metrics`, so that every rank sums the same ones even when it had no micro-batch.

    `evaluate` scores a whole dataset (each rank its share under torchrun) and returns the metrics
    named in `eval_metrics`, which train() checks best_metric against before the first step.
    """

    metrics: ClassVar[tuple[str, ...]]       # the keys of loss()'s metrics
    eval_metrics: ClassVar[tuple[str, ...]]  # the keys of evaluate()'s result

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(summed loss, count, {name: summed value}) of one micro-batch; the loss keeps its graph."""
        ...

    def evaluate(self, model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        """The scores of `model` over `data`, as {name: value} with the names of eval_metrics."""
        ...


@runtime_checkable
class RolloutObjective(Protocol):
    """An objective that makes its own micro-batches from the step's prompts by sampling the model
    (GRPO): each step the loop hands `rollouts` this rank's share of the step's prompt rows, then
    hands `loss` each micro-batch it returned. A step's batch_size counts completions, so a step
    takes batch_size / completions_per_prompt prompts. `step_metrics` are the step's, over every rank
    (rollouts sums them across ranks), logged as they are."""

    metrics: ClassVar[tuple[str, ...]]
    step_metrics: ClassVar[tuple[str, ...]]
    eval_metrics: ClassVar[tuple[str, ...]]
    completions_per_prompt: int

    def rollouts(self, model: nn.Module, rows: list, micro_batch_size: int, step: int) -> tuple[list, dict[str, float]]:
        """(micro-batches for loss(), the step's metrics); called on every rank, with rows or none."""
        ...

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int, dict[str, float]]:
        ...

    def evaluate(self, model: nn.Module, data: list, pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        ...


class LossFnObjective:
    """The shared half of an objective built on a bare loss function: `loss` is `self.loss_fn`'s
    (sum, count) with no further metrics. CausalLM and Classification are this plus their evaluate()."""

    loss_fn: LossFn

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        loss, count = self.loss_fn(model, batch)
        return loss, count, {}


def rank_batches(model: nn.Module, data: list[Example], pad_id: int, micro_batch_size: int,
                 bf16: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of `data` (every world-th example under torchrun) in batches on the model's
    device, each run under bf16 autocast where asked, the model in eval mode meanwhile (its mode restored
    after): what every objective's evaluate() loops over before summing across the ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = distributed.rank_and_world()
    try:
        for batch in batches(data, list(range(rank, len(data), world)), micro_batch_size, pad_id, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                yield batch
    finally:
        model.train(was_training)
