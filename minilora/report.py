"""The parameter report: the LoRA paper's arithmetic, d·k frozen vs r·(d+k) trained, per module and in
total. "all params" counts every parameter of the model, LoRA's included, once: PEFT's
print_trainable_parameters counts the same, plus a frozen copy it keeps of each modules_to_save module.

It reads only module shapes, so it works on a model built on the `meta` device from config.json alone.
And what a training run shows as it goes: a progress bar that moves per micro-batch (tokens/s, loss,
lr, time left), or, with the bar off, a line per logged step and evaluation.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .errors import ConfigError
from .inject import lora_modules
from .lora import is_adapter_tensor
from .names import find_saved, kept_in_float, matches


@dataclass
class ReportRow:
    pattern: str     # module name with layer numbers replaced by "*"
    count: int       # how many modules share the pattern
    d: int           # out_features
    k: int           # in_features
    r: int
    frozen: int      # d·k per module (the weight the update stands in for)
    trainable: int   # r·(d+k) per module (+ d with DoRA: the magnitudes)


@dataclass
class ParamReport:
    rows: list[ReportRow]
    saved_modules: list[tuple[str, int]]  # (modules_to_save pattern, trainable parameters in all of them)
    total: int       # every parameter of the model, LoRA included (as PEFT counts "all params")
    trainable: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"{'module':<46} {'count':>5} {'d x k':>13} {'r':>3} {'frozen d*k':>12} {'trained r*(d+k)':>16}"]
        for row in self.rows:
            lines.append(f"{row.pattern:<46} {row.count:>5} {f'{row.d}x{row.k}':>13} {row.r:>3} "
                         f"{row.frozen:>12,} {row.trainable:>16,}")
        for pattern, n in self.saved_modules:
            lines.append(f"{pattern + ' (trained in full)':<46} {'':>5} {'':>13} {'':>3} {'':>12} {n:>16,}")
        lora_total = sum(row.count * row.trainable for row in self.rows)
        frozen_targets = sum(row.count * row.frozen for row in self.rows)
        lines.append(f"LoRA: {lora_total:,} trained in place of {frozen_targets:,} in the targeted layers")
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {self.percent:.4f}")
        return "\n".join(lines)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def param_report(model: nn.Module) -> ParamReport:
    """Count parameters as logical elements (an int8 weight counts d·k, not its bytes)."""
    groups: dict[tuple, ReportRow] = {}
    for name, m in lora_modules(model):
        # an embedding table V×d stands in for a linear layer: d = embedding_dim, k = num_embeddings
        d, k = (m.embedding_dim, m.num_embeddings) if hasattr(m, "num_embeddings") else (m.out_features, m.in_features)
        key = (_pattern(name), d, k, m.r)
        row = groups.setdefault(key, ReportRow(key[0], 0, d, k, m.r, d * k, m.r * (d + k) + (d if m.use_dora else 0)))
        row.count += 1
    saved: dict[str, int] = {}
    for t in getattr(getattr(model, "lora_config", None), "modules_to_save", []):
        for n, mod in find_saved(model, [t]):
            saved[_pattern(n)] = saved.get(_pattern(n), 0) + sum(p.numel() for p in mod.parameters())
    total, trainable, seen = 0, 0, set()
    for module in model.modules():  # each parameter once, a packed 4-bit weight as its d·k logical elements
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = round(p.numel() * (getattr(module, "packed_elements", 1) if name == "weight" else 1))
            total, trainable = total + n, trainable + (n if p.requires_grad else 0)
    return ParamReport(list(groups.values()), list(saved.items()), total, trainable)


# Bytes of a frozen d×k linear weight stored each way, as minilora holds it in memory: int8 adds an fp32
# scale per row; NF4 holds half a byte per weight, the 8-bit code of each block of 64's absmax, one fp32
# scale per 256 blocks and an fp32 offset (double quantization).
FORMATS = ("fp32", "bf16", "int8", "nf4")


def base_bytes(d: int, k: int, fmt: str) -> int:
    n, blocks = d * k, -(-d * k // 64)
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * d,
            "nf4": n // 2 + blocks + 4 * -(-blocks // 256) + 4}[fmt]


def memory_report(model: nn.Module) -> str:
    """memory_rows as a table, in MB."""
    rows = memory_rows(model)
    lines = [f"{'base weights':<46} {'count':>5} " + " ".join(f"{f + ' MB':>10}" for f in FORMATS)]
    for pattern, (count, *sizes) in rows.items():
        lines.append(f"{pattern:<46} {count:>5} " + " ".join(f"{b / 1e6:>10.2f}" for b in sizes))
    totals = [sum(r[1 + i] for r in rows.values()) for i in range(len(FORMATS))]
    lines.append(f"{'total':<46} {'':>5} " + " ".join(f"{t / 1e6:>10.2f}" for t in totals))
    return "\n".join(lines)


def memory_rows(model: nn.Module) -> dict[str, list]:
    """{layer pattern: [count, bytes in each of FORMATS]}: the base weights per layer type, from the model's shapes alone
    (a model built on `meta` from config.json will do). The linear layers that 8-bit/4-bit loading
    quantizes change with the format; the rest (embeddings, norms, output and task heads) stay fp32 in
    the int8/nf4 columns, as load_model keeps them. LoRA's own tensors are not base weights."""
    keep = kept_in_float(model)
    rows: dict[str, list] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or is_adapter_tensor(name) or id(weight) in seen:  # a tied head is counted once
            continue
        seen.add(id(weight))
        bias = module._parameters.get("bias")
        extra = bias.numel() if bias is not None else 0
        d, k = getattr(module, "out_features", None), getattr(module, "in_features", None)
        linear = d is not None and k is not None and not matches(name, keep)  # what load_in_8bit/4bit quantize
        quantized = {"int8": linear, "nf4": linear and k % 2 == 0}  # NF4 packs two codes a byte: k even
        n = round(weight.numel() * getattr(module, "packed_elements", 1))  # logical elements of a packed weight
        sizes = [base_bytes(d, k, f) + extra * 4 if quantized.get(f) else (n + extra) * (2 if f == "bf16" else 4)
                 for f in FORMATS]
        row = rows.setdefault(_pattern(name), [0, *[0] * len(FORMATS)])
        row[0] += 1
        row[1:] = [t + s for t, s in zip(row[1:], sizes)]
    return rows


# ---------------------------------------------------------------------------------------------
# What a training run shows: its progress bar and its logged lines

def show_record(record: dict[str, Any], progress) -> None:
    """A step moves the progress bar (its loss and lr beside it); an evaluation is printed as a line."""
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if k not in ("epoch", "tokens")}
    if progress is not None:
        if "loss" in record:
            progress.update(record["step"] - progress.n)  # whole again after the micro-batches' fractions
            progress.last = f", loss={shown['loss']}, lr={shown['lr']}"
            _postfix(progress)
        else:
            progress.write(" ".join(f"{k}={v}" for k, v in shown.items()))
    else:  # no bar: every logged step (log_every) and evaluation as a line
        print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl that have a step (a last line cut short by a crash, or anything
    else, is left out)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def loss_svg(history: list[dict[str, Any]], width: int = 640, height: int = 320) -> str | None:
    """The training loss, the evaluation loss (dashed) and the learning rate (dotted, on its own scale
    from 0 to its peak) against the step, as a small SVG drawn here: no plotting library needed."""
    series = {key: [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))
                    and not isinstance(h.get(key), bool) and math.isfinite(h[key])] for key in ("loss", "eval_loss", "lr")}
    points = series["loss"] + series["eval_loss"]
    if len(points) < 2:
        return None
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y1 = y1 if y1 > y0 else y0 + 1
    peak = max((lr for _, lr in series["lr"]), default=0) or 1
    pad = 40
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1) * (width - 2 * pad)
    sy = lambda y, low, high: height - pad - (y - low) / (high - low) * (height - 2 * pad)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{pad}" y="{pad - 12}">loss {y0:.3f} .. {y1:.3f}, steps {x0} .. {x1}, lr up to {peak:.3g}</text>']
    styles = {"loss": ('stroke="#1f77b4"', y0, y1), "eval_loss": ('stroke="#d62728" stroke-dasharray="6 4"', y0, y1),
              "lr": ('stroke="#7f7f7f" stroke-dasharray="2 3"', 0, peak)}
    for key, s in series.items():
        style, low, high = styles[key]
        if s:
            path = " ".join(f"{sx(x):.1f},{sy(y, low, high):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke-width="2" {style} points="{path}"><title>{key}</title></polyline>')
    out.append(f'<text x="{width - pad - 190}" y="{height - 12}" fill="#1f77b4">loss</text>'
               f'<text x="{width - pad - 150}" y="{height - 12}" fill="#d62728">eval_loss</text>'
               f'<text x="{width - pad - 80}" y="{height - 12}" fill="#7f7f7f">lr</text></svg>')
    return "\n".join(out)


def plot_run(run: Path) -> list[Path]:
    """loss.svg beside a run's metrics.jsonl (and loss.png where matplotlib is installed); the files written."""
    history = read_metrics(Path(run) / "metrics.jsonl")
    svg = loss_svg(history)
    if svg is None:
        return []
    (Path(run) / "loss.svg").write_text(svg)
    written = [Path(run) / "loss.svg"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return written
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, style in (("loss", "-"), ("eval_loss", "--")):
        pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr = [(h["step"], h["lr"]) for h in history if isinstance(h.get("lr"), (int, float))]
    if lr:
        twin = ax.twinx()
        twin.plot(*zip(*lr), ":", color="gray", label="lr")
        twin.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(Path(run) / "loss.png", dpi=100)
    plt.close(fig)
    return written + [Path(run) / "loss.png"]


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
