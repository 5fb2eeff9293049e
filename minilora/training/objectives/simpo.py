"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"),
eq. 6: no reference model; the reward is the length-normalised log-probability of a completion,

    L_SimPO = -log σ( β/|y_w| log πθ(y_w|x)  -  β/|y_l| log πθ(y_l|x)  -  γ )

with |y| the completion's token count and γ the target reward margin. As TRL computes it (CPOTrainer,
loss_type="simpo", its oracle): h = avg log πθ(y_w|x) - avg log πθ(y_l|x) - γ/β, and with
label_smoothing ε the loss is -(1 - ε) log σ(β h) - ε log σ(-β h). The rewards it reports are
β · avg log πθ(y|x), and logps/chosen, logps/rejected the per-token averages.
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
class SimPO(PreferenceObjective, Objective):
    gamma: float = 0.5
    label_smoothing: float = 0.0
    uses_reference: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        average = logps / counts.clamp(min=1).to(logps.dtype)  # (2B,): per-token log-probability
        chosen, rejected = average.chunk(2)
        h, b, eps = chosen - rejected - self.gamma / self.beta, self.beta, self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h)
        return losses, pair_metrics(b * chosen, b * rejected, average)
