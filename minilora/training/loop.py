"""The training loop: one function, `train`, configured by one dataclass, `TrainConfig`.

Per optimizer step: `batch_size` examples, split into micro-batches of `micro_batch_size`; each
micro-batch's summed loss is backpropagated, and the gradients are divided once by the number of
target tokens in the whole step. That makes accumulation exactly one big batch's gradient, however
the tokens fall among micro-batches (averaging each micro-batch's loss first would not).

The data order of epoch e is a permutation seeded by (seed, e), so a position (step) is all it
takes to find the next batch again. A checkpoint holds the adapter, the optimizer, the scheduler,
the RNG state and the step (checkpoint.py): resuming from one continues the very same loss curve.

Under torchrun the same function trains data-parallel (see distributed.py): each rank runs its share
of every step's micro-batches, the gradient sums meet in one all-reduce, rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import hardware
from ..data.batching import batches
from ..data.records import Example, target_count
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from ..fields import problem
from ..kernels import frozen_weights_in
from ..lora.peft_files import load_adapter, save_adapter
from . import distributed
from .checkpoint import (
    MetricsLog,
    checkpoint_folders,
    load_checkpoint,
    own_output_dir,
    resolve_resume,
    rotate,
    run_fingerprint,
    save_checkpoint,
)
from .evaluate import evaluate, evaluate_classification
from .objectives.causal_lm import LossFn, causal_lm_loss
from .objectives.classify import classification_loss
from .plots import plot_run
from .progress import event_writer, micro_batch_done, progress_bar, show_record


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
    seed: int = 42
    log_every: int = 1
    progress: bool = True
    report_to: str | None = None          # "tensorboard": event files in output_dir/tensorboard as well
    pad_to: int | None = None             # pad every batch to this length; None pads per batch
    push_to_hub: bool = False             # after the run, upload the adapter with a model card (hub.py)
    hub_model_id: str | None = None       # where: "user-or-org/name"
    hub_private: bool = False

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
        optional = ("max_steps", "eval_every", "save_every", "keep_last", "pad_to")
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
        for name in ("lr", "max_grad_norm"):  # None: no clipping
            value = getattr(self, name)
            if not (value is None and name == "max_grad_norm") and not _number(value, 0, math.inf, True, True):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if not _number(self.weight_decay, 0, math.inf, high_open=True):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
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
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad (the LoRA ones after apply_lora).

    The examples decide the task: per-token labels train a language model (causal_lm_loss; evaluation
    gives loss and perplexity), one class id per example a classifier (classification_loss; loss,
    accuracy and F1). loss_fn and evaluate_fn(model) -> metrics replace those defaults. Writes
    output_dir/metrics.jsonl, checkpoint-<step>/ folders, best/ (with best_metric), and the final
    adapter in output_dir/adapter/.

    should_stop() is asked after every step; when it says yes, the step's checkpoint is saved and
    training stops (result.stopped_early; resume with resume_from_checkpoint="latest"). The command
    line passes one that turns SIGINT/SIGTERM into a stop; train() itself installs no signal handler.

    Under torchrun (torch.distributed initialised, e.g. by distributed.init_from_env), each rank runs
    its share of every step's micro-batches; the batch, the schedule and the results are those of one
    process, and only rank 0 writes files.
    """
    cfg = config or TrainConfig()
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    _refuse_what_would_go_wrong(model, train_data, eval_data, cfg, pad_id, evaluate_fn is not None)
    rank, world = distributed.rank_and_world()
    main = rank == 0
    out = Path(cfg.output_dir)
    device = next(model.parameters()).device
    with contextlib.ExitStack() as held:  # the output folder and what the loop changes, until train returns
        claim_error = None
        if main:  # rank 0 writes, so rank 0 owns the folder; all ranks agree on whether it could
            try:
                resuming = cfg.resume_from_checkpoint == "latest" or cfg.resume_from_checkpoint is not None and \
                    Path(cfg.resume_from_checkpoint).expanduser().resolve().parent == out.resolve()  # this run's own
                held.enter_context(own_output_dir(out, resuming, cfg.overwrite_output_dir))
            except CheckpointError as e:
                claim_error = e
        if distributed.any_rank(claim_error is not None, device):
            raise claim_error or CheckpointError(f"{out}: rank 0 could not take the output folder")
        bf16 = hardware.use_bf16(cfg.bf16, device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters: call apply_lora first")
        torch.manual_seed(cfg.seed + rank)  # dropout masks differ between ranks
        distributed.broadcast_from_main(params)  # every rank starts from rank 0's LoRA initialisation
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],  # no decay on biases and norms
            lr=cfg.lr, betas=cfg.adam_betas)
        steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        if cfg.warmup_steps >= total_steps:
            warnings.warn(f"warmup_steps={cfg.warmup_steps} is not shorter than the run ({total_steps} steps): the "
                          "learning rate never reaches its peak", stacklevel=3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
        run = run_fingerprint(cfg, model, train_data, total_steps, bf16)
        classifier = isinstance(train_data[0].labels, int)
        loss_fn = loss_fn or (classification_loss if classifier else causal_lm_loss)
        if evaluate_fn is None and eval_data:
            def evaluate_fn(m: nn.Module) -> dict[str, float]:
                if classifier:
                    return evaluate_classification(m, eval_data, pad_id, cfg.micro_batch_size, bf16)
                return evaluate(m, eval_data, pad_id, cfg.micro_batch_size, loss_fn, bf16)

        result, step, since_best = TrainResult(), 0, 0  # since_best: evaluations without a better best_metric
        if cfg.resume_from_checkpoint:
            folder = resolve_resume(cfg.resume_from_checkpoint, out)
            state = load_checkpoint(folder, model, optimizer, scheduler, run)
            step, result.best_metric, result.best_step = state["step"], state.get("best_metric"), state.get("best_step")
            since_best = state.get("since_best", 0)
        metrics = MetricsLog(out, step if cfg.resume_from_checkpoint else None)  # after a resume: its own steps
        progress = None
        board = event_writer(out / "tensorboard", step + 1) if cfg.report_to == "tensorboard" and main else None

        def log(record: dict[str, Any]) -> None:
            result.history.append(record)
            metrics.write(record)
            if board is not None:
                board(record)
            if main:
                show_record(record, progress)

        if cfg.eval_at_start and evaluate_fn is not None and step == 0:
            log({"step": 0, "epoch": 0.0, **evaluate_fn(model)})
        set_gradient_checkpointing(model, cfg.gradient_checkpointing)
        model.train()
        if bf16:  # the frozen linear weights cast to bf16 once, not per micro-batch
            held.enter_context(frozen_weights_in(model, torch.bfloat16))
        progress = progress_bar(cfg.progress and main, total_steps, step)
        if progress is not None:
            held.callback(progress.close)
        while step < total_steps:
            if cfg.early_stopping_patience and since_best >= cfg.early_stopping_patience:  # (also right after a resume)
                if main:  # the run ends as a finished one: its adapter (the best, with load_best_at_end) is saved
                    print(f"early stopping at step {step}: {since_best} evaluations without a better "
                          f"{cfg.best_metric} than {result.best_metric:.4g} (step {result.best_step})", flush=True)
                result.early_stopped_at = step
                break
            epoch, i = divmod(step, steps_per_epoch)
            order = epoch_order(len(train_data), cfg.seed, epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            micro = batches(train_data, order, cfg.micro_batch_size, pad_id, device, cfg.pad_to, shard=(rank, world))
            loss, count = accumulate_gradients(model, micro, loss_fn, bf16,
                                               None if progress is None else micro_batch_done(progress, len(micro)))
            if not math.isfinite(loss):
                last = checkpoint_folders(out)
                raise TrainingError(f"step {step + 1}: the loss is {loss}; training stopped. The last good "
                                    f"checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens": count}
            if step % cfg.log_every == 0 or step == total_steps:
                log(record)
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if evaluate_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                            or (cfg.eval_each_epoch and end_of_epoch)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # as the weights are
                    scores = evaluate_fn(model)
                model.train()
                log({"step": step, "epoch": round(step / steps_per_epoch, 4), **scores})
                if cfg.best_metric:
                    if cfg.best_metric not in scores:
                        raise ConfigError(f"best_metric {cfg.best_metric!r} is not among the metrics: {', '.join(scores)}")
                    since_best += 1
                    if _better(cfg.best_metric, scores[cfg.best_metric], result.best_metric):
                        result.best_metric, result.best_step, since_best = scores[cfg.best_metric], step, 0
                        if main:
                            save_adapter(model, out / "best", extra={"best_step": step, cfg.best_metric: result.best_metric})
            stop = distributed.any_rank(should_stop is not None and should_stop(), device)  # all ranks agree
            if (cfg.save_every and step % cfg.save_every == 0) or (cfg.save_each_epoch and end_of_epoch) or stop:
                save_checkpoint(out / f"checkpoint-{step}", model, optimizer, scheduler,
                                {"step": step, "best_metric": result.best_metric, "best_step": result.best_step,
                                 "since_best": since_best, "run": run})
                rotate(out, cfg.keep_last)
            if stop:
                result.stopped_early = True
                break

        distributed.barrier()  # rank 0's files are complete before any rank reads them or returns
        if not result.stopped_early:
            if cfg.load_best_at_end and result.best_step is not None:
                load_adapter(model, out / "best")
            result.adapter_dir = save_adapter(model, out / "adapter") if main else out / "adapter"
            if main:
                plot_run(out)  # loss.svg (and loss.png with matplotlib) beside metrics.jsonl
            distributed.barrier()
        model.eval()
    return result


# ---------------------------------------------------------------------------------------------
# One step: the batch, its micro-batches, the summed gradients, the learning rate

def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn | None = None,
                         bf16: bool = False, done: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Backpropagate every micro-batch's summed loss, then divide the gradients by the total count:
    the gradient of the mean loss over the whole batch. Returns (mean loss, count).

    Running distributed, the micro-batches are this rank's share; gradients, loss and count are summed
    over the ranks before the division, so the result is the whole batch's on every rank."""
    loss_fn = loss_fn or causal_lm_loss
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in micro_batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_fn(model, batch)
        loss.backward()
        total += float(loss.detach())
        count += n
        if done is not None:
            done(int(batch["attention_mask"].bool().sum()))  # the progress bar moves per micro-batch
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if distributed.rank_and_world()[1] > 1:
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # a rank with no micro-batch this step still takes part in the sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        distributed.sum_across_ranks([p.grad for p in trainable] + [sums])
        grads, total, count = [p.grad for p in trainable], float(sums[0]), int(round(float(sums[1])))
    for g in grads:
        g.div_(max(count, 1))
    return total / max(count, 1), count


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


# ---------------------------------------------------------------------------------------------
# Helpers

def _refuse_what_would_go_wrong(model: nn.Module, train_data: list[Example], eval_data: list[Example] | None,
                                cfg: TrainConfig, pad_id: int, custom_eval: bool) -> None:
    """What would fail late (after hours) or train wrongly, refused before anything is written."""
    if not train_data:
        raise ConfigError("train_data is empty")
    if not any(target_count(e) for e in train_data):
        raise DataError("train_data has no token to learn: every label is -100 (ignored) once token t is set to "
                        "predict token t+1; check the cutoff and the prompt masking")
    kinds = {isinstance(e.labels, int) for e in [*train_data, *(eval_data or [])]}
    if len(kinds) > 1:
        raise DataError("the examples mix class ids (classification) and token labels (language modelling)")
    if eval_data and not any(target_count(e) for e in eval_data):
        raise DataError("eval_data has no token to evaluate: every label is -100 once shifted")
    untrained = [n for n, p in model.named_parameters() if n in getattr(model, "fresh_tensors", []) and not p.requires_grad]
    if untrained:
        raise ConfigError(f"the classification head starts untrained ({', '.join(untrained)}) and would stay so: "
                          "give its modules to apply_lora's modules_to_save")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ConfigError("the model's LoRA layers are merged into the base weights: unmerge_lora(model) first")
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
    known = ("eval_loss", "eval_accuracy", "eval_f1") if classes is not None else ("eval_loss", "eval_perplexity")
    if cfg.best_metric and not custom_eval and cfg.best_metric not in known:
        raise ConfigError(f"best_metric {cfg.best_metric!r} is not among the metrics evaluation gives: {', '.join(known)}")
    if cfg.resume_from_checkpoint not in (None, "latest"):
        resolve_resume(cfg.resume_from_checkpoint, Path(cfg.output_dir))  # a checkpoint folder, or a named error


def _better(metric: str, new: float, old: float | None) -> bool:
    lower_is_better = "loss" in metric or "perplexity" in metric
    return old is None or (new < old if lower_is_better else new > old)


def _number(value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> bool:
    """Is value a real number (not a bool, not NaN) within [low, high], with open ends where asked?"""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return False
    return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
