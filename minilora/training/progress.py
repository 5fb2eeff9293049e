"""The parameter report: the LoRA paper's arithmetic, d·k frozen vs r·(d+k) trained, per module and in
total. "all params" counts every parameter of the model, LoRA's included, once: PEFT's
print_trainable_parameters counts the same, plus a frozen copy it keeps of each modules_to_save module.

It reads only module shapes, so it works on a model built on the `meta` device from config.json alone.
And what a training run shows as it goes: a progress bar that moves per micro-batch (tokens/s, loss,
lr, time left), or, with the bar off, a line per logged step and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError


def show_record(record: dict[str, Any], progress) -> None:
    """A step moves the progress bar (its loss and lr beside it); an evaluation is printed as a line."""
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if k not in ("epoch", "tokens")}
    if progress is not None:
        if "loss" in record:
            progress.update(record["step"] - progress.n)  # whole again after the micro-batches' fractions
            progress.last = f", loss={shown['loss']}, lr={shown['lr']}" + _rollout_part(record)
            _postfix(progress)
        else:
            progress.write(" ".join(f"{k}={v}" for k, v in shown.items()))
    else:  # no bar: every logged step (log_every) and evaluation as a line
        print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def _rollout_part(record: dict[str, Any]) -> str:
    """GRPO's step beside the bar: its mean reward, and its time split between sampling and training."""
    if "time/generation" not in record:
        return ""
    return (f", reward={record['reward']:.3g}, generation {record['time/generation']:.1f}s / training "
            f"{record['time/training']:.1f}s")


def micro_batch_done(progress, micro_batches: int) -> Callable[[int], None]:
    """Move the bar a micro-batch's share of a step, with the tokens per second so far beside it."""
    def done(tokens: int) -> None:
        progress.tokens = getattr(progress, "tokens", 0) + tokens
        progress.update(1 / micro_batches)
        _postfix(progress, refresh=False)
    return done


def _postfix(progress, refresh: bool = True) -> None:
    """Beside the bar: tokens per second so far, and the last logged step's loss and lr."""
    rate = getattr(progress, "tokens", 0) / max(1e-9, progress.format_dict["elapsed"])
    progress.set_postfix_str(f"{rate:.0f} tok/s" + getattr(progress, "last", ""), refresh=refresh)


def progress_bar(enabled: bool, total: int, initial: int, mininterval: float = 0.1):
    if not enabled:
        return None
    from tqdm import tqdm  # a dependency of huggingface-hub
    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                mininterval=mininterval, miniters=0,  # redrawn on any fraction of a step, at most every 0.1 s
                bar_format="{l_bar}{bar}| {n:.1f}/{total} steps [{elapsed}<{remaining}{postfix}]")


def event_writer(folder: Path, first_step: int = 1) -> Callable[[dict[str, Any]], None]:
    """TensorBoard event files in `folder` (report_to = "tensorboard"; the tensorboard package is an
    optional extra): every number of a logged record as a scalar at its step, "train/loss", "eval/loss".
    Events from `first_step` on that an earlier, interrupted run wrote are dropped (a resume redoes them)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise ConfigError('report_to = "tensorboard" needs the tensorboard package: pip install minilora[tensorboard]') \
            from None
    writer = SummaryWriter(log_dir=str(folder), purge_step=first_step if first_step > 1 else None)

    def write(record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                writer.add_scalar(name, value, record["step"])
        writer.flush()
    return write
