"""What DPO, SimPO and ORPO share: the log-probability of each completion under the policy (and the
reference), one forward pass for a micro-batch's chosen and rejected rows, TRL's metrics, and
evaluation as held-out preference accuracy. Each loss is its own file (dpo.py, simpo.py, orpo.py):
a subclass that says how per-pair log-probabilities become per-pair losses and rewards.

The reference, for the objectives that have one, costs no second model: by default it is the same
model with every adapter disabled (lora.inject.adapter_disabled), or, with `reference_adapter`, the
model with that named frozen adapter active alone (an SFT adapter, say, from which the policy starts).
With `precompute_ref_log_probs` its log-probabilities are computed once, before the first step, and
kept on the pairs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn as nn

from ...data.batching import batches
from ...data.preferences import PreferencePair
from ...data.records import IGNORE
from ...errors import ConfigError
from ...lora.adapters import add_adapter, set_adapter
from ...lora.config import lora_state
from ...lora.inject import adapter_disabled, all_lora_layers
from .. import distributed
from .base import rank_batches

# TRL's names; each is summed over the pairs of a micro-batch, and the loop logs its mean
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's completion tokens, their count), both (rows,): token t+1
    scored by the logits at t, where labels are not -100. Only the completion positions go through
    the output head (the prompt's and the padding's logits are never made)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # token t predicts t+1
    keep = targets != IGNORE
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(model, "hidden_states") and getattr(model, "final_logit_softcap", None) is None:
        logits = head(model.hidden_states(ids, attention_mask=mask)[keep]).float()  # (kept tokens, vocab)
    else:
        logits = model(ids, attention_mask=mask)[keep].float()
    token_logps = logits.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    logps = torch.zeros(len(ids), dtype=token_logps.dtype, device=ids.device).index_add(0, rows, token_logps)
    return logps, keep.sum(1)


@dataclass
class PreferenceObjective:
    """The shared half of DPO, SimPO and ORPO. A subclass sets `uses_reference` and writes
    `pair_losses`; `loss` is the summed per-pair loss of a micro-batch, counted in pairs."""

    beta: float = 0.1
    reference_adapter: str | None = None
    precompute_ref_log_probs: bool = False
    uses_reference: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = PAIR_METRICS
    eval_metrics: ClassVar[tuple[str, ...]] = ("eval_loss", *(f"eval_{m}" for m in PAIR_METRICS))

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) and per-pair metrics {name: (B,)} from the 2B rows' summed log-probs,
        completion token counts and (with a reference) the reference's summed log-probs."""
        raise NotImplementedError

    # -- the reference ---------------------------------------------------------------------

    def prepare(self, model: nn.Module, data: list[list[PreferencePair]], pad_id: int, micro_batch_size: int,
                bf16: bool) -> None:
        """Before the first step: the reference adapter checked (the policy made a copy of it where it
        is itself the active adapter), and, with precompute_ref_log_probs, the reference's log-probs
        of every pair computed and kept on it."""
        if self.reference_adapter is not None and self.uses_reference:
            policy_from_reference(model, self.reference_adapter)
        if not (self.precompute_ref_log_probs and self.uses_reference):
            return
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for pairs in data:
                for i in range(0, len(pairs), micro_batch_size):
                    chunk = pairs[i:i + micro_batch_size]
                    batch = batches(chunk, list(range(len(chunk))), len(chunk), pad_id, device)[0]
                    batch.pop("reference_logps", None)  # computed afresh: a resumed run keeps none of them
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logps = self.reference_logps(model, batch).tolist()
                    for j, p in enumerate(chunk):
                        p.reference_logps = (logps[j], logps[len(chunk) + j])
        finally:
            model.train(was_training)

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model as the reference: every adapter off, or the reference adapter alone."""
        if self.reference_adapter is None:
            with adapter_disabled(model):
                yield model
            return
        active = list(lora_state(model).active)
        set_adapter(model, self.reference_adapter)
        try:
            yield model
        finally:
            set_adapter(model, active)

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in batch:
            return batch["reference_logps"]
        with self.reference(model):
            return completion_logps(model, batch)[0].double()

    # -- the Objective interface -----------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        # the reference first, so that switching adapters never touches a graph already built
        reference = self.reference_logps(model, batch) if self.uses_reference else None
        logps, counts = completion_logps(model, batch)
        losses, metrics = self.pair_losses(logps, counts, None if reference is None else reference.to(logps.dtype))
        return losses.sum(), len(losses), {m: float(metrics[m].detach().sum()) for m in self.metrics}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: list[PreferencePair], pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        """Over the held-out pairs: the mean loss and the mean of each metric (rewards/accuracies is
        the held-out preference accuracy), as eval_<name>."""
        device = next(model.parameters()).device
        sums = torch.zeros(len(self.metrics) + 2, dtype=torch.float64, device=device)  # loss, metrics, pairs
        for batch in rank_batches(model, data, pad_id, micro_batch_size, bf16):
            loss, n, metrics = self.loss(model, batch)
            sums += torch.tensor([float(loss), *(metrics[m] for m in self.metrics), n], dtype=torch.float64,
                                 device=device)
        distributed.sum_across_ranks([sums])
        n = max(float(sums[-1]), 1.0)
        return dict(zip(self.eval_metrics, (float(s) / n for s in sums[:-1])))


def policy_from_reference(model: nn.Module, reference: str) -> None:
    """The reference adapter must exist on the model. Where it is itself the active adapter (the SFT
    adapter just loaded), the policy becomes a trainable copy of it, "policy", made active; the
    reference stays as it is, frozen."""
    state = lora_state(model)
    known = state.adapters if state is not None else {}
    if reference not in known:
        raise ConfigError(f"reference_adapter {reference!r}: no adapter of that name on the model (it has "
                          f"{', '.join(known) or 'none'}); load it with load_adapter(model, folder, adapter_name=...)")
    if reference not in state.active:
        return
    if state.active != [reference]:
        raise ConfigError(f"reference_adapter {reference!r} is active beside {', '.join(state.active)}: the reference "
                          "must be an adapter apart from the one trained")
    name = "policy"
    add_adapter(model, name, known[reference])
    with torch.no_grad():
        for _, layer in all_lora_layers(model):
            if reference in layer.adapters:
                theirs = dict(layer.adapters[reference].named_parameters())
                for key, mine in layer.adapters[name].named_parameters():
                    mine.copy_(theirs[key])


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics from the rewards and the (2B,) log-probs it reports (chosen rows first)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    logps_chosen, logps_rejected = logps.detach().chunk(2)
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": logps_chosen, "logps/rejected": logps_rejected}
