"""What a run leaves to look at: its metrics.jsonl read back, and loss.svg (the training loss, the
evaluation loss and the learning rate against the step, drawn here without a plotting library), plus
loss.png where matplotlib is installed. A GRPO run's curves are its mean reward and the held-out
reward instead (its loss, a policy gradient's surrogate, is about 0 whatever it learns). Each file is
written whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import MiniLoraError
from ..formats.atomic import write_file


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


def curves(history: list[dict[str, Any]]) -> tuple[str, str]:
    """The training and evaluation series a run's plot draws: ("reward", "eval_reward") for GRPO, else the losses."""
    return ("reward", "eval_reward") if any("reward" in h for h in history) else ("loss", "eval_loss")


def loss_svg(history: list[dict[str, Any]], width: int = 640, height: int = 320) -> str | None:
    """The training loss, the evaluation loss (dashed) and the learning rate (dotted, on its own scale
    from 0 to its peak) against the step, as a small SVG drawn here: no plotting library needed. For
    GRPO, the reward and the evaluation's reward in their place."""
    main, held_out = curves(history)
    series = {key: [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))
                    and not isinstance(h.get(key), bool) and math.isfinite(h[key])] for key in (main, held_out, "lr")}
    points = series[main] + series[held_out]
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
           f'<text x="{pad}" y="{pad - 12}">{main} {y0:.3f} .. {y1:.3f}, steps {x0} .. {x1}, lr up to {peak:.3g}</text>']
    styles = {main: ('stroke="#1f77b4"', y0, y1), held_out: ('stroke="#d62728" stroke-dasharray="6 4"', y0, y1),
              "lr": ('stroke="#7f7f7f" stroke-dasharray="2 3"', 0, peak)}
    for key, s in series.items():
        style, low, high = styles[key]
        if s:
            path = " ".join(f"{sx(x):.1f},{sy(y, low, high):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke-width="2" {style} points="{path}"><title>{key}</title></polyline>')
    out.append(f'<text x="{width - pad - 230}" y="{height - 12}" fill="#1f77b4">{main}</text>'
               f'<text x="{width - pad - 170}" y="{height - 12}" fill="#d62728">{held_out}</text>'
               f'<text x="{width - pad - 80}" y="{height - 12}" fill="#7f7f7f">lr</text></svg>')
    return "\n".join(out)


def plot_run(run: str | os.PathLike) -> list[Path]:
    """loss.svg beside a run's metrics.jsonl (and loss.png where matplotlib is installed); the files
    written. Each is written whole or not at all (a full disk or a read-only folder is a WriteError
    naming the file, and a plot already there is kept as it was)."""
    run = Path(run)
    history = read_metrics(run / "metrics.jsonl")
    svg = loss_svg(history)
    if svg is None:
        return []
    written = [write_file(run / "loss.svg", lambda f: f.write(svg.encode("utf-8")))]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return written
    fig, ax = plt.subplots(figsize=(8, 4))
    main, held_out = curves(history)
    for key, style in ((main, "-"), (held_out, "--")):
        pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(main)
    lr = [(h["step"], h["lr"]) for h in history if isinstance(h.get("lr"), (int, float))]
    if lr:
        twin = ax.twinx()
        twin.plot(*zip(*lr), ":", color="gray", label="lr")
        twin.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    try:
        written.append(write_file(run / "loss.png", lambda f: fig.savefig(f, format="png", dpi=100)))
    finally:
        plt.close(fig)
    return written


def plot_at_end(run: str | os.PathLike, adapter: str | os.PathLike | None = None) -> list[Path]:
    """plot_run at the end of a training run, which a plot never fails: the adapter is saved by then,
    so a plot that cannot be drawn (a full disk, a read-only folder, a broken matplotlib) is a warning
    naming the file and where the adapter is, and `minilora plot RUN` can draw it later."""
    try:
        return plot_run(run)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the run's results are safe
        why = str(e) if isinstance(e, MiniLoraError) else f"{Path(run) / 'loss.svg'}: not drawn ({type(e).__name__}: {e})"
        saved = f"; the adapter was saved at {adapter}" if adapter is not None else ""
        warnings.warn(f"{why}. The loss plot was left out{saved} (`minilora plot {run}` draws it later)", stacklevel=2)
        return []
