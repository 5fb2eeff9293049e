"""One step's gradient: the micro-batches' summed losses backpropagated, the gradients divided once by
the whole step's count (over every micro-batch and every rank); the data order of an epoch; the
learning rate's schedule. train() (loop.py) calls these each step; accumulate_gradients is the same
for a script that drives its own loop."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from . import distributed
from .objectives import LossFn, Objective, as_objective
from .objectives.base import LossFnObjective


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         loss_fn: Objective | LossFn | None = None, bf16: bool = False,
                         done: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Backpropagate every micro-batch's summed loss, then divide the gradients by the total count:
    the gradient of the mean loss over the whole batch. Returns (mean loss, count). loss_fn is an
    objective or a bare loss function (model, batch) -> (summed loss, count); causal_lm_loss unless given."""
    loss, count, _ = accumulate(model, micro_batches, as_objective(loss_fn), bf16, done)
    return loss, count


def accumulate(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
               bf16: bool = False, done: Callable[[int], None] | None = None,
               offload: bool = False) -> tuple[float, int, dict[str, float]]:
    """accumulate_gradients, with the objective's metrics as well: (mean loss, count, {name: mean}).
    offload: the activations the forward passes save, in CPU memory until the backward (offloaded).

    Running distributed, the micro-batches are this rank's share; gradients, loss, count and metrics
    are summed over the ranks before the division, so the result is the whole batch's on every rank."""
    device = next(model.parameters()).device
    total, count, sums = 0.0, 0, dict.fromkeys(objective.metrics, 0.0)
    for batch in micro_batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), offloaded(device, offload):
            loss, n, metrics = objective.loss(model, batch)
        _check_what_loss_returned(objective, loss, n, metrics, sums)
        loss.backward()
        total += float(loss.detach())
        count += n
        for name, value in metrics.items():
            sums[name] += float(value)
        if done is not None:
            done(_tokens(batch))  # the progress bar moves per micro-batch
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if distributed.rank_and_world()[1] > 1:
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # a rank with no micro-batch this step still takes part in the sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        summed = torch.tensor([total, count, *sums.values()], dtype=torch.float64, device=device)
        distributed.sum_across_ranks([p.grad for p in trainable] + [summed])
        grads, total, count = [p.grad for p in trainable], float(summed[0]), int(round(float(summed[1])))
        sums = dict(zip(sums, summed[2:].tolist()))
    for g in grads:
        g.div_(max(count, 1))
    return total / max(count, 1), count, {name: value / max(count, 1) for name, value in sums.items()}


def offloaded(device: torch.device, on: bool):
    """While the forward pass runs, every tensor autograd saves for the backward goes to pinned CPU memory and
    comes back to the GPU when the backward needs it (torch.autograd.graph.save_on_cpu): the GPU then holds
    one block's activations at a time, not the whole graph's; with gradient checkpointing, only the
    blocks' inputs are saved, and those move. The recomputation in the backward pass is not offloaded
    (the context is left by then). On a CPU the activations are in CPU memory already: nothing changes."""
    if not on or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def _tokens(batch: Any) -> int:
    """A micro-batch's tokens, padding aside: its attention mask's, or those it counts itself (a rollout's)."""
    return int(batch["attention_mask"].bool().sum()) if isinstance(batch, dict) else int(getattr(batch, "tokens", 0))


def _check_what_loss_returned(objective: Objective, loss: Any, n: Any, metrics: Any, sums: dict[str, float]) -> None:
    """An objective's (or a loss_fn's) result named where it is not (summed loss with its graph, count,
    metrics): not by a raw `backward` error deep in torch."""
    bare = isinstance(objective, LossFnObjective) and type(objective).loss is LossFnObjective.loss
    name = f"loss_fn {getattr(objective.loss_fn, '__name__', objective.loss_fn)!r}" if bare else \
        f"{type(objective).__name__}.loss"
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        got = f"a {type(loss).__name__}" if not isinstance(loss, torch.Tensor) else \
            (f"a tensor of shape {tuple(loss.shape)}" if loss.numel() != 1 else "a tensor with no graph (no grad)")
        raise ConfigError(f"{name} returned {got} as its loss; expected the summed loss as a one-element tensor that "
                          "keeps its graph (do not call .item() or detach it), then the count")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{name} returned the count {n!r}; expected a non-negative int (how many targets the summed "
                          "loss covers)")
    if not isinstance(metrics, dict) or metrics.keys() != sums.keys():
        raise ConfigError(f"{name} returned the metrics {sorted(metrics) if isinstance(metrics, dict) else metrics!r}, "
                          f"but its metrics attribute names {sorted(sums)}")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step`: linear warmup from 0, then linear or cosine decay to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = on
