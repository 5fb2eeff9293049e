"""What training minimises: an objective turns a micro-batch into (summed loss, count, metrics) and
scores a dataset (the `Objective` protocol, base.py).

One file per objective; `train()` takes any object with the `Objective` interface, and OBJECTIVES
names the ones that ship, so that a recipe's [train] objective (TrainConfig.objective) says which by
name. Preference tuning (dpo.py, simpo.py, orpo.py) shares preference.py: log-probabilities of
completions, the reference, TRL's metrics.
"""

from __future__ import annotations

from typing import Any

from ...data.preferences import PreferencePair
from ...data.records import Example
from ...errors import ConfigError
from .base import LossFn, Objective, RolloutObjective
from .causal_lm import CausalLM, causal_lm_loss
from .classify import Classification, classification_loss
from .dpo import DPO
from .grpo import GRPO
from .orpo import ORPO
from .preference import PreferenceObjective
from .simpo import SimPO

OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM, "classification": Classification, "dpo": DPO,
                               "simpo": SimPO, "orpo": ORPO, "grpo": GRPO}
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
# the TrainConfig fields each objective takes (TRL's names)
SETTINGS = {"dpo": ("beta", "loss_type", "label_smoothing", "reference_adapter", "precompute_ref_log_probs"),
            "simpo": ("beta", "gamma", "label_smoothing"), "orpo": ("beta",),
            "grpo": ("beta", "loss_type", "num_generations", "max_completion_length", "temperature", "top_k", "top_p",
                     "epsilon", "epsilon_high", "scale_rewards", "use_bias_correction_kl", "reward_funcs",
                     "reward_weights")}

__all__ = ["GRPO", "OBJECTIVES", "CausalLM", "Classification", "DPO", "LossFn", "ORPO", "Objective",
           "PreferenceObjective", "RolloutObjective", "SimPO", "as_objective", "build_objective", "causal_lm_loss", "classification_loss", "objective_for"]


def objective_for(examples: list[Example] | list[PreferencePair], loss_fn: LossFn | None = None,
                  config: Any = None) -> Objective:
    """The objective a TrainConfig names (config.objective), or else the one the examples call for:
    preference pairs train DPO (with the config's beta, loss_type, ...), one class id per example a
    classifier, per-token labels (or no examples at all, which train() refuses by name) a language
    model. A loss_fn takes the place of a language model's or a classifier's loss; its evaluation
    stays as it is (a language model's is the mean of that same loss, a classifier's the loss,
    accuracy and F1 of its logits)."""
    pairs = bool(examples) and isinstance(examples[0], PreferencePair)
    name = getattr(config, "objective", None) or ("dpo" if pairs else "classification"
                                                  if examples and isinstance(examples[0].labels, int) else "causal_lm")
    if name == "grpo":
        raise ConfigError("objective 'grpo' samples completions from the model as it trains: give train() "
                          "objective=minilora.generate.grpo_objective(tokenizer, config) (a recipe builds it itself)")
    if name in PREFERENCE_OBJECTIVES:
        if loss_fn is not None:
            raise ConfigError(f"objective {name!r} has its own loss: give train() no loss_fn")
        return build_objective(name, config)
    return OBJECTIVES[name]() if loss_fn is None else OBJECTIVES[name](loss_fn)


def build_objective(name: str, config: Any = None) -> Objective:
    """OBJECTIVES[name], with the settings of `config` (a TrainConfig) that objective takes."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    if name == "grpo":
        raise ConfigError("objective 'grpo' is built with its sampler and reward functions: "
                          "minilora.generate.grpo_objective(tokenizer, config)")
    return OBJECTIVES[name](**settings_of(name, config))


def settings_of(name: str, config: Any = None) -> dict[str, Any]:
    """The settings of `config` (a TrainConfig) that objective `name` takes, those left unset (None)
    out, so that the objective's own defaults hold (DPO's beta 0.1, GRPO's 0)."""
    return {k: v for k in SETTINGS.get(name, ()) if config is not None and (v := getattr(config, k)) is not None}


def as_objective(objective_or_loss_fn: Objective | LossFn | None) -> Objective:
    """An objective as it is; a bare loss function (model, batch) -> (summed loss, count) as the
    objective whose loss it is; None as next-token prediction."""
    if isinstance(objective_or_loss_fn, Objective):
        return objective_or_loss_fn
    return CausalLM(objective_or_loss_fn or causal_lm_loss)
