"""What would fail late (after hours) or train wrongly, refused before a run writes anything: the
data, the model's heads and vocabulary, and the settings that depend on both."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch.nn as nn

from ..data.preferences import PreferencePair
from ..data.prompts import PromptRow
from ..data.records import Example, target_count
from ..errors import ConfigError, DataError
from .checkpoint import resolve_resume
from .config import TrainConfig
from .objectives import (
    Classification,
    CausalLM,
    Objective,
    PreferenceObjective,
    RolloutObjective,
    causal_lm_loss,
    classification_loss,
)


def refuse_an_untrained_head(model: nn.Module, key: str | None = None) -> None:
    """A classification head the loader initialised fresh (the checkpoint had none) must be trained,
    or the classifier guesses. run_recipe asks right after apply_lora, naming its recipe key; train()
    asks again for callers of the library, who name its modules in apply_lora's modules_to_save."""
    provenance = getattr(model, "provenance", None)  # None for a model built from a config (or any nn.Module)
    fresh = provenance.fresh_tensors if provenance is not None else ()
    untrained = [n for n, p in model.named_parameters() if n in fresh and not p.requires_grad]
    if untrained:
        where, fix = (f"{key}: ", f"list {', '.join(model.task_head)} there") if key else \
            ("", "give its modules to apply_lora's modules_to_save")
        raise ConfigError(f"{where}the classification head starts untrained ({', '.join(untrained)}) and would "
                          f"stay so: {fix}")


def refuse_what_would_go_wrong(model: nn.Module, train_data: list[Example], eval_data: list[Example] | None,
                                cfg: TrainConfig, pad_id: int, objective: Objective, custom_eval: bool) -> None:
    """What would fail late (after hours) or train wrongly, refused before anything is written."""
    if not train_data:
        raise ConfigError("train_data is empty")
    refuse_pairs_without_a_preference_objective(train_data, eval_data, objective)
    refuse_a_rollout_that_cannot_run(model, train_data, eval_data, cfg, objective)
    train_data, eval_data = as_rows(train_data), as_rows(eval_data) if eval_data else eval_data
    if not any(target_count(e) for e in train_data):
        raise DataError("train_data has no token to learn: every label is -100 (ignored) once token t is set to "
                        "predict token t+1; check the cutoff and the prompt masking")
    kinds = {isinstance(e.labels, int) for e in [*train_data, *(eval_data or [])]}
    if len(kinds) > 1:
        raise DataError("the examples mix class ids (classification) and token labels (language modelling)")
    if eval_data and not any(target_count(e) for e in eval_data):
        raise DataError("eval_data has no token to evaluate: every label is -100 once shifted")
    refuse_an_untrained_head(model)
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ConfigError("the model's LoRA layers are merged into the base weights: unmerge_lora(model) first")
    if any(getattr(m, "disabled", False) for m in model.modules()):
        raise ConfigError("train() inside adapter_disabled(model): the LoRA layers are switched off, so nothing would "
                          "train; call train() outside that block")
    refuse_a_forward_without_a_mask(model, objective, custom_eval or not eval_data)
    rows = getattr(getattr(model, "input_embeddings", None), "num_embeddings", None)
    classes = getattr(getattr(model, "config", None), "num_labels", None) if isinstance(train_data[0].labels, int) else None
    for i, e in enumerate(e for data in (train_data, eval_data or []) for e in data):
        if rows is not None and not all(0 <= t < rows for t in e.input_ids):
            raise DataError(f"example {i} holds token id {max(e.input_ids)}, beyond the model's {rows} embeddings: "
                            "the tokenizer does not belong to this model")
        if classes is not None and not (isinstance(e.labels, int) and 0 <= e.labels < classes):
            raise DataError(f"example {i} has class {e.labels!r}, but the model has {classes} classes (0 to {classes - 1})")
        if cfg.pad_to is not None and len(e.input_ids) > cfg.pad_to:
            raise ConfigError(f"pad_to={cfg.pad_to} is shorter than example {i} ({len(e.input_ids)} tokens): raise "
                              "pad_to or lower the cutoff")
    if rows is not None and not 0 <= pad_id < rows:
        raise ConfigError(f"the pad token id {pad_id} is beyond the model's {rows} embeddings")
    if cfg.best_metric and not eval_data and not custom_eval:
        raise ConfigError(f"best_metric={cfg.best_metric!r} needs evaluation data")
    if cfg.best_metric and not custom_eval and cfg.best_metric not in objective.eval_metrics:
        raise ConfigError(f"best_metric {cfg.best_metric!r} is not among the metrics evaluation gives: "
                          f"{', '.join(objective.eval_metrics)}")
    if cfg.resume_from_checkpoint not in (None, "latest"):
        resolve_resume(cfg.resume_from_checkpoint, Path(cfg.output_dir))  # a checkpoint folder, or a named error


def refuse_pairs_without_a_preference_objective(train_data: list, eval_data: list | None,
                                                objective: Objective) -> None:
    """Preference pairs train a preference objective (DPO, SimPO, ORPO) and nothing else does; the two
    kinds of data are not mixed."""
    data = [*train_data, *(eval_data or [])]
    pairs = sum(isinstance(e, PreferencePair) for e in data)
    if pairs not in (0, len(data)):
        raise DataError("the data mix preference pairs (prompt, chosen, rejected) and single examples")
    wants = isinstance(objective, PreferenceObjective)
    if wants and not pairs:
        raise DataError(f"{type(objective).__name__} trains on preference pairs (prompt, chosen, rejected: "
                        "data.preferences.build_pairs), but the data are single examples")
    if pairs and not wants:
        raise ConfigError(f"the data are preference pairs, but the objective is {type(objective).__name__}: use "
                          "objective = \"dpo\", \"simpo\" or \"orpo\"")


def refuse_a_rollout_that_cannot_run(model: nn.Module, train_data: list, eval_data: list | None, cfg: TrainConfig,
                                     objective: Objective) -> None:
    """Prompt rows train an objective that samples (GRPO) and nothing else does; its steps are whole
    groups; every prompt with max_completion_length new tokens fits the model's context."""
    data = [*train_data, *(eval_data or [])]
    prompts, wants = sum(isinstance(e, PromptRow) for e in data), isinstance(objective, RolloutObjective)
    if prompts not in (0, len(data)):
        raise DataError("the data mix prompt-only rows and examples with a completion")
    if wants and not prompts:
        raise DataError(f"{type(objective).__name__} samples its completions from prompts (data.prompts.build_prompts: "
                        "records with a \"prompt\"), but the data hold completions already")
    if prompts and not wants:
        raise ConfigError(f"the data are prompts without completions, but the objective is {type(objective).__name__}: "
                          "use objective = \"grpo\" (which samples them)")
    if not wants:
        return
    G = objective.completions_per_prompt
    if cfg.batch_size % G:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of num_generations={G}: a step's batch "
                          "counts completions, whole groups of one prompt's")
    context, new = getattr(model, "max_length", None), getattr(objective, "max_completion_length", 0)
    longest = max(data, key=lambda e: len(e.prompt_ids))
    if context is not None and len(longest.prompt_ids) + new > context:
        raise DataError(f"{longest.where or 'a prompt'}: its {len(longest.prompt_ids)} tokens and "
                        f"max_completion_length={new} run past the model's context of {context} tokens: shorten the "
                        "prompt (max_prompt_length) or max_completion_length")


def as_rows(data: list) -> list[Example]:
    """The rows a model reads: each preference pair's chosen and rejected sequences, other examples as they are."""
    return [row for e in data for row in (e.rows() if isinstance(e, PreferencePair) else (e,))]


def refuse_a_forward_without_a_mask(model: nn.Module, objective: Objective, own_evaluation: bool) -> None:
    """The shipped objectives call model(input_ids, attention_mask=mask) (a padded batch needs its mask);
    a user's nn.Module whose forward cannot take that is named now, not by a TypeError at step 1. A
    loss_fn of the caller's own calls the model as it likes (and, with evaluate_fn, so does evaluation)."""
    calls = isinstance(objective, (CausalLM, Classification)) and (
        objective.loss_fn in (causal_lm_loss, classification_loss) or
        isinstance(objective, Classification) and not own_evaluation)
    if not calls or hasattr(model, "hidden_states"):  # minilora's own models take the mask
        return
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C extension): let the call decide
        return
    if not any(p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in params):
        raise ConfigError(f"{type(model).__name__}.forward{inspect.signature(model.forward)} takes no attention_mask, "
                          "which training passes (model(input_ids, attention_mask=mask), the mask 0 on padding): "
                          "give forward an attention_mask=None parameter, or train() a loss_fn that calls the model "
                          "as it needs")
