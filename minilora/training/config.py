"""TrainConfig: every setting of a training run in one dataclass (a recipe's [train] section), each
value checked by its type and range when the config is made, so that a bad value fails before
anything loads."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..fields import problem


@dataclass
class TrainConfig:
    output_dir: str = "runs/minilora"
    epochs: int = 1
    max_steps: int | None = None          # when set, overrides epochs
    micro_batch_size: int = 4             # examples per forward/backward pass
    batch_size: int | None = None         # examples per optimizer step (a multiple of micro_batch_size)
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    optim: str = "adamw_torch"            # adamw_torch | lorafa (LoRA-FA: A frozen, B's gradient projected); optimizers.py
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate over A's (the paper: 16); None: one rate
    loraplus_lr_embedding: float | None = None  # LoRA+: embedding adapters' learning rate (None: peft's 1e-6)
    warmup_steps: int = 0
    lr_schedule: str = "linear"           # linear | cosine | constant (after warmup)
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None         # steps; None = only per epoch (if eval_each_epoch)
    eval_each_epoch: bool = True
    eval_at_start: bool = False           # evaluate the untrained model first, as a baseline
    save_every: int | None = None         # steps
    save_each_epoch: bool = False
    keep_last: int | None = 3             # checkpoints kept; None keeps all
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir
    overwrite_output_dir: bool = False    # a fresh run into a folder holding another run deletes that run first
    best_metric: str | None = None        # e.g. "eval_loss" or "eval_accuracy"
    early_stopping_patience: int | None = None  # end the run after this many evaluations without a better best_metric
    load_best_at_end: bool = False
    bf16: bool | str = False              # bf16 autocast: true, false, or "auto" (on where bf16 products are fast)
    gradient_checkpointing: bool = False
    offload_activations: bool = False     # CUDA: the activations saved for the backward wait in CPU memory
    compile: bool = False                 # torch.compile on each transformer block (models/compile.py)
    fsdp: bool = False                    # under torchrun: FSDP2, the frozen base sharded over the ranks (fsdp.py)
    seed: int = 42
    log_every: int = 1
    progress: bool = True
    report_to: str | None = None          # "tensorboard": event files in output_dir/tensorboard as well
    pad_to: int | None = None             # pad every batch to this length; None pads per batch
    push_to_hub: bool = False             # after the run, upload the adapter with a model card (hub.py)
    hub_model_id: str | None = None       # where: "user-or-org/name"
    hub_private: bool = False
    # what is minimised: None lets the data decide (causal_lm, classification, or dpo for preference pairs)
    objective: str | None = None          # causal_lm | classification | dpo | simpo | orpo | grpo
    beta: float | None = None             # DPO's β (IPO's τ), SimPO's β, ORPO's λ (0.1); GRPO's KL weight (0)
    loss_type: str | None = None          # DPO: sigmoid (default) | ipo | hinge | robust; GRPO: dapo (default) |
                                          # grpo | dr_grpo | bnpo
    label_smoothing: float = 0.0          # DPO sigmoid (cDPO) and robust, SimPO: the chance a label is flipped
    gamma: float = 0.5                    # SimPO's target reward margin
    reference_adapter: str | None = None  # DPO: a named frozen adapter as the reference; None: adapters off
    precompute_ref_log_probs: bool = False  # DPO: the reference's log-probs computed once, before step 1
    max_length: int | None = None         # preference pairs: prompt + completion at most this many tokens
    max_prompt_length: int | None = None  # ... the prompt at most this many (cut from the left); GRPO's prompts too
    # GRPO (objectives/grpo.py), TRL's names; batch_size counts completions, num_generations per prompt
    num_generations: int = 8              # completions sampled per prompt: a group, whose mean reward is the baseline
    max_completion_length: int = 512      # new tokens per completion at most
    temperature: float = 1.0              # sampling temperature (> 0); log-probs are of logits / temperature
    top_k: int | None = None
    top_p: float = 1.0
    epsilon: float = 0.2                  # the clipped ratio's lower bound 1 - epsilon
    epsilon_high: float | None = None     # ... its upper bound 1 + epsilon_high (DAPO's clip-higher); None: epsilon
    scale_rewards: str | bool = "group"   # advantages divided by the std of the group | batch | none
    use_bias_correction_kl: bool = True   # the KL term times the ratio: an unbiased gradient (with beta > 0)
    reward_funcs: list[str] | None = None  # built-ins (exact_match, answer_format) or "module:function"
    reward_weights: list[float] | None = None  # one per reward function; None: all 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: from Python, "false" would count as true
            expected = problem(f.name, str(f.type), getattr(self, f.name))
            if expected and f.name != "bf16":  # bf16 says it better below
                raise ConfigError(f"{f.name} must be {expected}, got {getattr(self, f.name)!r}")
        if not self.output_dir or self.resume_from_checkpoint == "":
            raise ConfigError("output_dir and resume_from_checkpoint must not be empty")
        self.adam_betas = tuple(self.adam_betas)
        self.batch_size = self.batch_size or self.micro_batch_size
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        optional = ("max_steps", "eval_every", "save_every", "keep_last", "pad_to", "max_length", "max_prompt_length")
        for name in ("epochs", "micro_batch_size", "batch_size", "log_every", *optional):
            value = getattr(self, name)
            if not (value is None and name in optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                              or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.report_to not in (None, "tensorboard"):
            raise ConfigError(f"report_to must be \"tensorboard\" or left out, got {self.report_to!r}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:  # on every rank, now
            raise ConfigError('report_to = "tensorboard" needs the tensorboard package: pip install minilora[tensorboard]')
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (\"user-or-org/name\")")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"lr_schedule must be linear, cosine or constant, got {self.lr_schedule!r}")
        if not _number(self.lr, 0, 1, low_open=True):  # AdamW moves each weight by about lr a step
            raise ConfigError(f"lr must be a positive number at most 1 (AdamW moves every weight by about lr each "
                              f"step; LoRA runs take 1e-5 to 1e-3), got {self.lr!r}")
        if self.max_grad_norm is not None and not _number(self.max_grad_norm, 0, math.inf, True, True):  # None: none
            raise ConfigError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm!r}")
        if not _number(self.weight_decay, 0, math.inf, high_open=True):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        self._check_the_optimizer()
        if len(self.adam_betas) != 2 or not all(_number(b, 0, 1, high_open=True) for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)!r}")
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):  # resolved by hardware.use_bf16
            raise ConfigError(f"bf16 must be true, false or \"auto\", got {self.bf16!r}")
        if self.load_best_at_end and not self.best_metric:
            raise ConfigError("load_best_at_end needs best_metric (e.g. 'eval_loss')")
        if self.early_stopping_patience is not None and (not self.best_metric or isinstance(self.early_stopping_patience, bool)
                                                         or self.early_stopping_patience <= 0):
            raise ConfigError("early_stopping_patience must be a positive number of evaluations, and needs best_metric "
                              f"(e.g. 'eval_loss'); got {self.early_stopping_patience!r}")
        self._check_the_objective()
        if self.fsdp and self.compile:
            raise ConfigError("compile with fsdp = true is not supported yet (FSDP2's hooks around compiled blocks are "
                              "untested here); turn one of them off")
        if self.fsdp and self.offload_activations:
            raise ConfigError("offload_activations with fsdp = true is not supported yet: FSDP2 already frees each block's "
                              "gathered weights; turn one of them off")
        if self.fsdp:
            from .fsdp import refuse_without_torchrun
            refuse_without_torchrun()

    def _check_the_optimizer(self) -> None:
        """optim, and LoRA+'s ratio and embedding rate (peft's names), where they mean something."""
        from .optimizers import OPTIMIZERS
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim {self.optim!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.loraplus_lr_ratio is not None and not _number(self.loraplus_lr_ratio, 0, math.inf, True, True):
            raise ConfigError(f"loraplus_lr_ratio must be a positive finite number (B's learning rate over A's; the "
                              f"LoRA+ paper takes 16), got {self.loraplus_lr_ratio!r}")
        if self.loraplus_lr_embedding is not None and self.loraplus_lr_ratio is None:
            raise ConfigError("loraplus_lr_embedding is a setting of LoRA+: set loraplus_lr_ratio too (B's learning "
                              "rate over A's, e.g. 16)")
        if self.loraplus_lr_embedding is not None and not _number(self.loraplus_lr_embedding, 0, 1, low_open=True):
            raise ConfigError(f"loraplus_lr_embedding must be a positive number at most 1, got "
                              f"{self.loraplus_lr_embedding!r}")
        if self.optim == "lorafa" and self.loraplus_lr_ratio is not None:
            raise ConfigError("loraplus_lr_ratio with optim \"lorafa\": LoRA-FA freezes A, so there is no ratio of "
                              "B's rate to A's; choose one")

    def _check_the_objective(self) -> None:
        """The objective's name and the settings that belong to it (TRL's names), refused where they do not."""
        from .objectives import DPO, OBJECTIVES, SETTINGS
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.objective == "grpo":
            self._check_grpo()
        else:
            if self.loss_type is not None and self.loss_type not in DPO.loss_types:
                raise ConfigError(f"loss_type {self.loss_type!r}: expected one of {', '.join(DPO.loss_types)} (DPO's)")
            if self.beta is not None and not _number(self.beta, 0, math.inf, low_open=True, high_open=True):
                raise ConfigError(f"beta must be a positive finite number, got {self.beta!r}")
        if not _number(self.label_smoothing, 0, 0.5, high_open=True):
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (the chance that a label is flipped), "
                              f"got {self.label_smoothing!r}")
        if not _number(self.gamma, 0, math.inf, high_open=True):
            raise ConfigError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.reference_adapter == "":
            raise ConfigError("reference_adapter must name an adapter (or be left out: the adapters switched off)")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        takes = SETTINGS.get(self.objective or "dpo", ())  # None: pairs, if any, train DPO
        for name in {n for settings in SETTINGS.values() for n in settings} - {"beta"}:
            if getattr(self, name) != defaults[name] and name not in takes:
                raise ConfigError(f"{name} is a setting of {', '.join(o for o, s in SETTINGS.items() if name in s)}, "
                                  f"not of objective {self.objective!r}")

    def _check_grpo(self) -> None:
        """GRPO's settings, by TRL's names and ranges."""
        from .objectives.grpo import LOSS_TYPES, SCALE_REWARDS
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)} (GRPO's)")
        if self.beta is not None and not _number(self.beta, 0, math.inf, high_open=True):
            raise ConfigError(f"beta must be a finite number >= 0 (GRPO's KL weight; 0 needs no reference), "
                              f"got {self.beta!r}")
        if isinstance(self.num_generations, bool) or self.num_generations < 2:
            raise ConfigError(f"num_generations must be an integer of at least 2 (advantages compare each completion "
                              f"with the others of its group), got {self.num_generations!r}")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"batch_size={self.batch_size} is not a multiple of num_generations="
                              f"{self.num_generations}: a step's batch counts completions, whole groups of one prompt's")
        if isinstance(self.max_completion_length, bool) or self.max_completion_length <= 0:
            raise ConfigError(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}")
        if not _number(self.temperature, 0, math.inf, low_open=True, high_open=True):
            raise ConfigError(f"temperature must be a positive finite number (GRPO samples; at 0 a group's completions "
                              f"would all be the same), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k <= 0):
            raise ConfigError(f"top_k must be a positive integer or left out, got {self.top_k!r}")
        if not _number(self.top_p, 0, 1, low_open=True):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("epsilon", "epsilon_high"):
            if getattr(self, name) is not None and not _number(getattr(self, name), 0, math.inf, high_open=True):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.scale_rewards not in (*SCALE_REWARDS, True, False):
            raise ConfigError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true/false), "
                              f"got {self.scale_rewards!r}")
        if not self.reward_funcs:
            raise ConfigError('objective "grpo" needs reward_funcs: built-ins (exact_match, answer_format) or '
                              '"module:function"')
        if self.reward_weights is not None and (len(self.reward_weights) != len(self.reward_funcs) or
                                                not all(_number(w, -math.inf, math.inf, True, True)
                                                        for w in self.reward_weights)):
            raise ConfigError(f"reward_weights must be {len(self.reward_funcs)} finite numbers, one per reward "
                              f"function, got {self.reward_weights!r}")


def _number(value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> bool:
    """Is value a real number (not a bool, not NaN) within [low, high], with open ends where asked?"""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
