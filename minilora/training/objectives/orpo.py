"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"),
eqs. 4-7: supervised fine-tuning on the chosen completion plus an odds-ratio term, no reference:

    odds(y|x) = P(y|x) / (1 - P(y|x))          P(y|x) = exp(avg log πθ(y|x)), per-token average
    L_ORPO = L_SFT(y_w)  -  β log σ( log odds(y_w|x) / odds(y_l|x) )

computed in log space as TRL's ORPOTrainer does (its oracle): log odds ratio = (c - r) - (log(1 - e^c)
- log(1 - e^r)) for the average log-probs c, r. L_SFT here is the paper's: the mean negative
log-likelihood of the chosen completion's tokens (TRL's scores the chosen prompt too), and it is
per pair, as every loss here: the loop averages pairs. The rewards are β · avg log πθ(y|x); the
metrics add nll_loss, log_odds_ratio (log σ of the log odds ratio) and log_odds_chosen (the log odds
ratio), as TRL names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Objective
from .preference import PAIR_METRICS, PreferenceObjective, pair_metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation on either side of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass
class ORPO(PreferenceObjective, Objective):
    uses_reference: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = (*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")
    eval_metrics: ClassVar[tuple[str, ...]] = ("eval_loss", *(f"eval_{m}" for m in metrics))

    def pair_losses(self, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        average = logps / counts.clamp(min=1).to(logps.dtype)
        chosen, rejected = average.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        losses = -chosen - self.beta * ratio
        return losses, {**pair_metrics(self.beta * chosen, self.beta * rejected, average),
                        "nll_loss": -chosen.detach(), "log_odds_ratio": ratio.detach(),
                        "log_odds_chosen": log_odds.detach()}
