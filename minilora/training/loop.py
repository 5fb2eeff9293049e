"""The training loop: one function, `train`, configured by one dataclass, `TrainConfig`, minimising
an objective (objectives/: next-token prediction, classification, ...) that it is handed or that the
examples call for. train() reads as its setup, then the loop; each part is a function below it, in
the order it runs.

Per optimizer step: `batch_size` examples, split into micro-batches of `micro_batch_size`; each
micro-batch's summed loss is backpropagated, and the gradients are divided once by the count of
targets (tokens, or examples for a classifier) in the whole step. That makes accumulation exactly one
big batch's gradient, however the targets fall among micro-batches (averaging each micro-batch's loss
first would not). That step is gradients.py's; the loop around it is this file.

The data order of epoch e is a permutation seeded by (seed, e), so a position (step) is all it
takes to find the next batch again. A checkpoint holds the adapter, the optimizer, the scheduler,
the RNG state and the step (checkpoint.py): resuming from one continues the very same loss curve.

Under torchrun the same function trains data-parallel (see distributed.py): each rank runs its share
of every step's micro-batches, the gradient sums meet in one all-reduce, rank 0 alone writes. With
fsdp = true the frozen base is sharded over the ranks as well (fsdp.py), to the same results.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import hardware
from ..data.batching import batches
from ..data.records import Example
from ..errors import CheckpointError, ConfigError, TrainingError
from ..kernels import frozen_weights_in
from ..lora.peft_files import load_adapter, save_adapter
from . import distributed, fsdp
from .checkpoint import (MetricsLog, checkpoint_folders, load_checkpoint, own_output_dir, resolve_resume, rotate,
                         run_fingerprint, save_checkpoint)
from .checks import refuse_what_would_go_wrong
from .config import TrainConfig
from .gradients import accumulate_gradients  # noqa: F401 (scripts and tests take it from here, beside train)
from .gradients import accumulate, epoch_order, lr_factor, set_gradient_checkpointing
from .optimizers import freeze_for, make_optimizer
from .objectives import LossFn, Objective, PreferenceObjective, RolloutObjective, objective_for
from .plots import plot_at_end
from .progress import event_writer, micro_batch_done, progress_bar, show_record


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per logged step or eval
    adapter_dir: Path | None = None
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False           # stopped on request (a signal): resume it
    early_stopped_at: int | None = None   # ended by early_stopping_patience: a finished run


def train(model: nn.Module, tokenizer, train_data: list[Example], eval_data: list[Example] | None = None,
          config: TrainConfig | None = None, loss_fn: LossFn | None = None,
          evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          should_stop: Callable[[], bool] | None = None, objective: Objective | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad (the LoRA ones after apply_lora).

    `objective` (objectives/) says what is minimised and how evaluation scores it. Left out, the
    examples decide: per-token labels train a language model (CausalLM: causal_lm_loss; loss and
    perplexity), one class id per example a classifier (Classification: classification_loss; loss,
    accuracy and F1); a loss_fn then takes the place of that objective's loss. evaluate_fn(model) ->
    metrics replaces the objective's evaluation. Writes output_dir/metrics.jsonl, checkpoint-<step>/
    folders, best/ (with best_metric), and the final adapter in output_dir/adapter/.

    should_stop() is asked after every step; when it says yes, the step's checkpoint is saved and
    training stops (result.stopped_early; resume with resume_from_checkpoint="latest"). The command
    line passes one that turns SIGINT/SIGTERM into a stop; train() itself installs no signal handler.

    Under torchrun (torch.distributed initialised, e.g. by distributed.init_from_env), each rank runs
    its share of every step's micro-batches; the batch, the schedule and the results are those of one
    process, and only rank 0 writes files.
    """
    cfg = config or TrainConfig()
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    if objective is not None and loss_fn is not None:
        raise ConfigError("train() takes an objective or a loss_fn (the loss of the examples' objective), not both")
    if objective is None:
        objective = objective_for(train_data, loss_fn, cfg)
    refuse_what_would_go_wrong(model, train_data, eval_data, cfg, pad_id, objective, evaluate_fn is not None)
    fsdp.refuse_what_cannot_shard(model, cfg, objective)
    if isinstance(objective, PreferenceObjective):  # the reference adapter, its log-probs: before the optimizer
        objective.prepare(model, [train_data, eval_data or []], pad_id, cfg.micro_batch_size,
                          hardware.use_bf16(cfg.bf16, next(model.parameters()).device))
    with contextlib.ExitStack() as held:  # the output folder and what the loop changes, until train returns
        run = _setup(model, train_data, cfg, held, getattr(objective, "completions_per_prompt", 1))
        if evaluate_fn is None and eval_data:
            shares = fsdp.with_empty_rows(eval_data, run.world) if cfg.fsdp else eval_data  # as many passes per rank

            def evaluate_fn(m: nn.Module) -> dict[str, float]:
                return objective.evaluate(m, shares, pad_id, cfg.micro_batch_size, run.bf16)
        _resume(run)
        _open_logs(run)
        if cfg.eval_at_start and evaluate_fn is not None and run.step == 0:
            run.log({"step": 0, "epoch": 0.0, **evaluate_fn(model)})
        _start_training(run, held)

        while run.step < run.total_steps:
            if _patience_spent(run):
                break
            record = _one_step(run, train_data, objective, pad_id)
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                run.log(record)
            end_of_epoch = run.step % run.steps_per_epoch == 0 or run.step == run.total_steps
            if evaluate_fn is not None and ((cfg.eval_every and run.step % cfg.eval_every == 0)
                                            or (cfg.eval_each_epoch and end_of_epoch)):
                _evaluate_and_keep_the_best(run, evaluate_fn)
            stop = distributed.any_rank(should_stop is not None and should_stop(), run.device)  # all ranks agree
            if (cfg.save_every and run.step % cfg.save_every == 0) or (cfg.save_each_epoch and end_of_epoch) or stop:
                _save_checkpoint(run)
            if stop:
                run.result.stopped_early = True
                break

        _end_of_run(run)
    return run.result


# ---------------------------------------------------------------------------------------------
# The run's setup, in the order train() calls it

@dataclass
class _Run:
    """What train() sets up once and its steps share; step, since_best and result change as it goes."""
    cfg: TrainConfig
    model: nn.Module
    out: Path
    device: torch.device
    rank: int
    world: int
    bf16: bool
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int
    fingerprint: dict[str, Any]           # what a checkpoint must match to be resumed (run_fingerprint)
    rows_per_step: int = 1                # examples (or GRPO's prompts) per step
    result: TrainResult = field(default_factory=TrainResult)
    step: int = 0
    since_best: int = 0                   # evaluations without a better best_metric
    metrics: MetricsLog | None = None
    board: Callable[[dict[str, Any]], None] | None = None  # TensorBoard scalars, on rank 0
    progress: Any = None                  # the progress bar, on rank 0
    first_loss: float | None = None       # this process's first step's loss, against which divergence is told
    stepped: bool = False                 # this process has taken a step
    smoothed_loss: float = 0.0
    warned_divergence: bool = False

    @property
    def main(self) -> bool:  # rank 0: the one that writes and prints
        return self.rank == 0

    @property
    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def log(self, record: dict[str, Any]) -> None:
        self.result.history.append(record)
        self.metrics.write(record)
        if self.board is not None:
            self.board(record)
        if self.main:
            show_record(record, self.progress)


def _setup(model: nn.Module, train_data: list[Example], cfg: TrainConfig, held: contextlib.ExitStack,
           per_row: int = 1) -> _Run:
    """Claim the output folder, start every rank from the same LoRA weights, build the optimizer and
    schedule. A step takes batch_size / per_row rows (a GRPO prompt row becomes per_row completions)."""
    rank, world = distributed.rank_and_world()
    out, device = Path(cfg.output_dir), next(model.parameters()).device
    _claim_output_folder(out, cfg, rank == 0, device, held)
    bf16 = hardware.use_bf16(cfg.bf16, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: call apply_lora first")
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ between ranks
    distributed.broadcast_from_main(params)  # every rank starts from rank 0's LoRA initialisation
    freeze_for(model, cfg)  # LoRA-FA: A stays as it starts (the same on every rank, from just above)
    fsdp.shard(model, cfg, bf16)  # with fsdp = true: from here on, each rank holds a slice of every weight
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(train_data) / (cfg.batch_size // per_row))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, total_steps)
    return _Run(cfg, model, out, device, rank, world, bf16, params, optimizer, scheduler, steps_per_epoch, total_steps,
                run_fingerprint(cfg, model, train_data, total_steps, bf16), rows_per_step=cfg.batch_size // per_row)


def _claim_output_folder(out: Path, cfg: TrainConfig, main: bool, device: torch.device,
                         held: contextlib.ExitStack) -> None:
    """Rank 0 writes, so rank 0 owns the folder (until train returns); all ranks agree on whether it could."""
    claim_error = None
    if main:
        try:
            resuming = cfg.resume_from_checkpoint == "latest" or cfg.resume_from_checkpoint is not None and \
                Path(cfg.resume_from_checkpoint).expanduser().resolve().parent == out.resolve()  # this run's own
            held.enter_context(own_output_dir(out, resuming, cfg.overwrite_output_dir))
        except CheckpointError as e:
            claim_error = e
    if distributed.any_rank(claim_error is not None, device):
        raise claim_error or CheckpointError(f"{out}: rank 0 could not take the output folder")


def _optimizer_and_schedule(model: nn.Module, cfg: TrainConfig, total_steps: int) \
        -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer cfg.optim names (optimizers.py), and the warmup-then-decay schedule of lr_factor."""
    optimizer = make_optimizer(model, cfg)
    if cfg.warmup_steps >= total_steps:
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is not shorter than the run ({total_steps} steps): the "
                      "learning rate never reaches its peak", stacklevel=5)  # the caller of train()'s caller
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
    return optimizer, scheduler


def _resume(run: _Run) -> None:
    """From resume_from_checkpoint: the adapter, optimizer, schedule and RNG, the step and the best so far."""
    if run.cfg.resume_from_checkpoint:
        folder = resolve_resume(run.cfg.resume_from_checkpoint, run.out)
        state = load_checkpoint(folder, run.model, run.optimizer, run.scheduler, run.fingerprint)
        run.step, run.result.best_metric, run.result.best_step = state["step"], state.get("best_metric"), \
            state.get("best_step")
        run.since_best = state.get("since_best", 0)


def _open_logs(run: _Run) -> None:
    """metrics.jsonl (after a resume, cut back to the checkpoint's step) and, if asked, TensorBoard's events."""
    run.metrics = MetricsLog(run.out, run.step if run.cfg.resume_from_checkpoint else None)
    if run.cfg.report_to == "tensorboard" and run.main:
        run.board = event_writer(run.out / "tensorboard", run.step + 1)


def _start_training(run: _Run, held: contextlib.ExitStack) -> None:
    """Training mode, gradient checkpointing, bf16 frozen weights and the progress bar, until train returns."""
    set_gradient_checkpointing(run.model, run.cfg.gradient_checkpointing)
    run.model.train()
    if run.cfg.compile:  # each block compiled in place at its first call: the first step waits for it
        if not hasattr(run.model, "compile_blocks"):
            raise ConfigError(f"compile = true needs one of minilora's models; {type(run.model).__name__} has no blocks")
        run.model.compile_blocks()
    if run.bf16 and not run.cfg.fsdp:  # the frozen linear weights cast to bf16 once (FSDP: once a gather)
        held.enter_context(frozen_weights_in(run.model, torch.bfloat16))
    run.progress = progress_bar(run.cfg.progress and run.main, run.total_steps, run.step)
    if run.progress is not None:
        held.callback(run.progress.close)


# ---------------------------------------------------------------------------------------------
# The loop's parts, in the order of one step

def _patience_spent(run: _Run) -> bool:
    """early_stopping_patience evaluations without a better best_metric (also right after a resume)."""
    if not (run.cfg.early_stopping_patience and run.since_best >= run.cfg.early_stopping_patience):
        return False
    if run.main:  # the run ends as a finished one: its adapter (the best, with load_best_at_end) is saved
        print(f"early stopping at step {run.step}: {run.since_best} evaluations without a better "
              f"{run.cfg.best_metric} than {run.result.best_metric:.4g} (step {run.result.best_step})", flush=True)
    run.result.early_stopped_at = run.step
    return True


def _one_step(run: _Run, train_data: list[Example], objective: Objective, pad_id: int) -> dict[str, Any]:
    """The step's batch (its place in the epoch's seeded order), its gradient, one optimizer step; its
    record. A RolloutObjective (GRPO) makes the step's micro-batches itself, from this rank's prompts."""
    cfg, started = run.cfg, time.perf_counter()
    epoch, i = divmod(run.step, run.steps_per_epoch)
    order = epoch_order(len(train_data), cfg.seed, epoch)[i * run.rows_per_step:(i + 1) * run.rows_per_step]
    step_metrics: dict[str, float] = {}
    if isinstance(objective, RolloutObjective):
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            micro, step_metrics = objective.rollouts(run.model, [train_data[j] for j in order[run.rank::run.world]],
                                                     cfg.micro_batch_size, run.step)
        step_metrics["time/generation"] = time.perf_counter() - started
    else:
        micro = batches(train_data, order, cfg.micro_batch_size, pad_id, run.device, cfg.pad_to,
                        shard=(0, 1) if cfg.fsdp else (run.rank, run.world))  # FSDP takes its share itself
    step = fsdp.accumulate if cfg.fsdp else functools.partial(accumulate, offload=cfg.offload_activations)
    loss, count, metrics = step(run.model, micro, objective, run.bf16,
                                None if run.progress is None else micro_batch_done(run.progress, len(micro)))
    metrics.update(step_metrics)
    if step_metrics:
        metrics["time/training"] = time.perf_counter() - started - step_metrics["time/generation"]
    if not math.isfinite(loss):
        raise TrainingError(f"step {run.step + 1}: the loss is {loss}; training stopped. {_last_good(run)}")
    grad_norm = fsdp.clip_grad_norm(run.params, cfg.max_grad_norm or float("inf"))  # over every rank's slices
    if not math.isfinite(grad_norm):  # the weights are left as the last step made them
        raise TrainingError(f"step {run.step + 1}: the gradient's norm is {grad_norm} (the loss, {loss:.4g}, is "
                            f"finite); training stopped before the update.{_half_hint(run)} {_last_good(run)}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    if not _all_finite(run.params):
        raise TrainingError(f"step {run.step + 1}: its update made LoRA weights NaN or infinite (lr={lr:.3g}); "
                            f"training stopped, nothing of this step saved.{_half_hint(run)} {_last_good(run)}")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if cfg.compile and run.main and not run.stepped:
        print(f"compile = true: the first step took {time.perf_counter() - started:.1f} s, compiling included", flush=True)
    run.stepped = True
    if not step_metrics:  # a policy-gradient loss is no likelihood: it has no scale to diverge from
        _warn_if_diverging(run, loss)
    return {"step": run.step, "epoch": run.epoch, "loss": loss, **metrics, "lr": lr, "grad_norm": grad_norm,
            "tokens": count}


def _all_finite(params: list[nn.Parameter]) -> bool:
    """No NaN or inf in any of them, in one fused pass and one sync (x * 0 is 0 unless x is NaN or inf,
    so no finite value can overflow the test)."""
    return bool(torch.stack(torch._foreach_norm(torch._foreach_mul(params, 0.0))).sum() == 0)


def _half_hint(run: _Run) -> str:
    """Why float16 LoRA weights go wrong, where they are float16 (model.half() after apply_lora)."""
    if any(p.dtype == torch.float16 for p in run.params):
        return (" The trainable weights are float16, whose range AdamW's update overflows (its eps, 1e-8, is 0 "
                "there): keep the LoRA weights in float32 and use bf16 = true (autocast) for speed.")
    return ""


def _last_good(run: _Run) -> str:
    last = checkpoint_folders(run.out)
    return f"The last good checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}"


def _warn_if_diverging(run: _Run, loss: float) -> None:
    """Once a run, a warning when the loss, smoothed over about ten steps (one batch's noise is no
    divergence), climbs past twice that of this process's first step and one nat more: the learning
    rate is too high for this model and data, most often."""
    if run.first_loss is None:
        run.first_loss = run.smoothed_loss = loss
        return
    run.smoothed_loss = 0.9 * run.smoothed_loss + 0.1 * loss
    if not run.warned_divergence and run.smoothed_loss > 2 * run.first_loss + 1:
        run.warned_divergence = True
        warnings.warn(f"step {run.step}: the loss ({loss:.4g}, {run.smoothed_loss:.4g} over the last steps) is more "
                      f"than twice the first step's ({run.first_loss:.4g}): the run is diverging; lower lr (now "
                      f"{run.cfg.lr:g}) or set max_grad_norm", stacklevel=4)


def _evaluate_and_keep_the_best(run: _Run, evaluate_fn: Callable[[nn.Module], dict[str, float]]) -> None:
    """Evaluate and log; with best_metric, a better score saves the adapter to best/ and resets the patience."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):  # as the weights are
        scores = evaluate_fn(run.model)
    run.model.train()
    run.log({"step": run.step, "epoch": run.epoch, **scores})
    metric, result = run.cfg.best_metric, run.result
    if metric:
        if metric not in scores:
            raise ConfigError(f"best_metric {metric!r} is not among the metrics: {', '.join(scores)}")
        run.since_best += 1
        if _better(metric, scores[metric], result.best_metric):
            result.best_metric, result.best_step, run.since_best = scores[metric], run.step, 0
            with fsdp.whole_adapter(run.model):  # (FSDP) gathered on every rank, saved by rank 0
                if run.main:
                    save_adapter(run.model, run.out / "best", extra={"best_step": run.step, metric: result.best_metric})


def _save_checkpoint(run: _Run) -> None:
    """checkpoint-<step>/: what an exact resume needs; the oldest beyond keep_last are removed."""
    save_checkpoint(run.out / f"checkpoint-{run.step}", run.model, run.optimizer, run.scheduler,
                    {"step": run.step, "best_metric": run.result.best_metric, "best_step": run.result.best_step,
                     "since_best": run.since_best, "run": run.fingerprint})
    rotate(run.out, run.cfg.keep_last)


def _end_of_run(run: _Run) -> None:
    """A finished run (not one stopped on request) saves its adapter (the best, with load_best_at_end) and plots."""
    distributed.barrier()  # rank 0's files are complete before any rank reads them or returns
    if not run.result.stopped_early:
        with fsdp.whole_adapter(run.model):
            if run.cfg.load_best_at_end and run.result.best_step is not None:
                load_adapter(run.model, run.out / "best")
            run.result.adapter_dir = save_adapter(run.model, run.out / "adapter") if run.main else run.out / "adapter"
        if run.main:
            plot_at_end(run.out, run.result.adapter_dir)  # loss.svg (and .png): a plot never fails the run
        distributed.barrier()
    fsdp.gather_for_the_caller(run.model)  # (FSDP) as the caller handed it: whole, on every rank
    run.model.eval()


# ---------------------------------------------------------------------------------------------
# Helpers

def _better(metric: str, new: float, old: float | None) -> bool:
    lower_is_better = "loss" in metric or "perplexity" in metric
    return old is None or (new < old if lower_is_better else new > old)
