"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), eq. 7:

    L_DPO = -log σ( β [ log πθ(y_w|x) / π_ref(y_w|x)  -  log πθ(y_l|x) / π_ref(y_l|x) ] )

with log π(y|x) the log-probability of the completion summed over its tokens (TRL's semantics),
y_w the chosen completion, y_l the rejected one. Write h = log-ratio(chosen) - log-ratio(rejected):

    sigmoid  -(1 - ε) log σ(β h) - ε log σ(-β h)         ε = label_smoothing: conservative DPO (cDPO,
                                                          Mitchell 2023), labels flipped with probability ε
    robust   [-(1 - ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)   Chowdhury et al. 2024, eq. 8: unbiased
                                                          under labels flipped with probability ε < 1/2
    hinge    max(0, 1 - β h)                              the SLiC loss (Zhao et al. 2023), 1/β its margin
    ipo      (h / n - 1 / (2β))²                          IPO (Azar et al. 2023, eq. 17, β its τ); as TRL
                                                          computes it, each log-ratio divided by its
                                                          completion's token count n first

The implicit rewards, β · log-ratio, are the metrics: rewards/chosen, rewards/rejected, their margin and
how often the chosen one is higher (rewards/accuracies). At step 0 with a fresh adapter (B = 0) the
policy is the reference, h = 0, and the sigmoid loss is exactly ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from .base import Objective
from .preference import PreferenceObjective, pair_metrics


@dataclass
class DPO(PreferenceObjective, Objective):
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    loss_types: ClassVar[tuple[str, ...]] = ("sigmoid", "ipo", "hinge", "robust")

    def __post_init__(self) -> None:
        if self.loss_type not in self.loss_types:
            raise ConfigError(f"loss_type {self.loss_type!r}: DPO's loss types are {', '.join(self.loss_types)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (the probability that a label is flipped), "
                              f"got {self.label_smoothing!r}")

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ratios = logps - reference                          # (2B,): log πθ/π_ref of each completion
        chosen, rejected = ratios.chunk(2)
        h, b, eps = chosen - rejected, self.beta, self.label_smoothing
        if self.loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h)
        elif self.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(b * h) + eps * F.logsigmoid(-b * h)) / (1 - 2 * eps)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - b * h)
        else:  # ipo: per-token log-ratios
            n_chosen, n_rejected = counts.clamp(min=1).to(ratios.dtype).chunk(2)
            losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * b)) ** 2
        return losses, pair_metrics(b * chosen, b * rejected, logps)

