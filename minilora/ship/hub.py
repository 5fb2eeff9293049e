"""Pushing an adapter (or a merged model folder) to the Hugging Face Hub, with a model card written from
the run that made it.

Through huggingface-hub's own client: the repo is created if missing (private if asked), then every
file of the folder goes up in one commit with the card (README.md) and the loss curve (loss.svg). The
token is the standard one (the HF_TOKEN variable, or the file `huggingface-cli login` writes), read by
that client; minilora never prints it or writes it anywhere. Offline (HF_HUB_OFFLINE) or without a
token, push fails before anything is sent, and the local folder is never changed: the card is made in
memory. While its files are read and sent, push holds the folder's lock shared (formats.atomic), so
that a save into the same folder fails at once, by name, instead of mixing two versions in one commit
(and a push while a save is writing fails so too).

The card: YAML metadata as the Hub reads it (base_model when the base is a Hub id, library_name: peft,
tags), the LoRA settings (adapter_config.json), and, when the folder sits in a run's output folder, the
training settings (the last checkpoint's trainer_state.json), the evaluations and the loss curve
(metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..formats.atomic import owning, recover
from ..formats.paths import read_json
from ..lora.peft_files import refuse_a_run_folder
from ..training.plots import loss_svg, read_metrics

CARD, CURVE = "README.md", "loss.svg"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_]|[.-](?=[A-Za-z0-9_])){0,95}"  # no leading/trailing or doubled . and -
REPO_ID = re.compile(f"{_PART}/{_PART}")
HUB_MODEL = re.compile(f"(?:{_PART}/)?{_PART}")  # gpt2, or user/name


def check_can_push(repo_id: str) -> None:
    """Refuse now, before a run or an upload starts, what cannot be pushed: a malformed repo id, the Hub
    switched off (HF_HUB_OFFLINE), no token."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"hub repo id {repo_id!r}: expected 'user-or-org/name'")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError("cannot push to the Hub: HF_HUB_OFFLINE is set")
    from huggingface_hub import get_token
    if not get_token():
        raise ConfigError("cannot push to the Hub: no token (set HF_TOKEN, or run `huggingface-cli login`)")


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False,
                commit_message: str | None = None) -> str:
    """Upload `folder` (an adapter, or a merged model's folder) to `repo_id` with a model card; returns
    the commit's URL. The folder's files are sent as they are; nothing is written locally but the
    lock file beside the folder, for the length of the push."""
    folder = Path(folder)
    recover(folder)  # a save killed between its two renames: the previous version back at its name
    if not folder.is_dir() or not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: not a folder with an adapter or model to push")
    refuse_a_run_folder(folder)  # its checkpoints' optimizer and RNG files are no model to publish
    check_can_push(repo_id)
    # optional: a folder whose lock cannot be made (read-only) is one no one can be saving into
    with owning(folder, "pushing it to the Hub", shared=True, optional=True, instead="nothing was pushed"):
        return _push(folder, repo_id, private, commit_message)


def _push(folder: Path, repo_id: str, private: bool, commit_message: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and not p.name.endswith(".partial")]  # no hidden files (.env, .git/), links or half-written files
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
    if not (folder / CARD).exists():  # a card of the folder's own is sent as it is
        card, curve = model_card(folder, repo_id)
        operations.append(CommitOperationAdd(CARD, card.encode("utf-8")))
        if curve is not None and not (folder / CURVE).exists():
            operations.append(CommitOperationAdd(CURVE, curve.encode("utf-8")))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise CheckpointError(f"{repo_id} exists and is public: a push with private=True does not make an existing "
                                  "repo private (change it on the Hub, or push to a new repo); nothing was uploaded")
        info = api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload {folder.name} with minilora")
    except CheckpointError:
        raise
    except Exception as e:  # the client's HTTP and connection errors (httpx, requests): a named error, no traceback
        raise CheckpointError(f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {e}") from None
    return str(info.commit_url)


# ---------------------------------------------------------------------------------------------
# The card

def model_card(folder: Path, repo_id: str) -> tuple[str, str | None]:
    """(README.md text, loss.svg text or None) for the adapter or model in `folder`."""
    config = read_json(folder / "adapter_config.json") if (folder / "adapter_config.json").is_file() else {}
    run = folder.parent
    history = read_metrics(run / "metrics.jsonl")
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
                    if p.parent.name.split("-")[-1].isdigit() else -1)
    settings = read_json(states[-1]).get("run", {}) if states else {}
    base = str(config.get("base_model_name_or_path") or "")
    hub_base = bool(HUB_MODEL.fullmatch(base)) and not Path(base).expanduser().exists() \
        and Path(base).suffix not in (".gguf", ".safetensors", ".bin", ".pt")
    task = str(config.get("task_type") or "CAUSAL_LM").lower().replace("_", "-")
    q = json.dumps  # a JSON string is a YAML string: no name is read as true, null or a mapping
    meta = (["---"] + ([f"base_model: {q(base)}"] if hub_base else [])
            + [f"library_name: {'peft' if config else 'minilora'}", "tags:", "- minilora", "- lora"]
            + ([f"- {q('base_model:adapter:' + base)}"] if hub_base else []) + [f"- {q(task)}", "---", ""])
    lines = meta + [f"# {repo_id.split('/')[-1]}", ""]
    if config:
        lines += [f"A LoRA adapter for `{base or 'its base model'}`, trained with minilora (LoRA in plain PyTorch). "
                  "It is in PEFT's format: `PeftModel.from_pretrained(base_model, repo)` loads it, as does "
                  "minilora's `load_adapter(model, folder)`.", "", "## LoRA", "", "| setting | value |", "|---|---|"]
        for key in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora", "modules_to_save",
                    "rank_pattern", "alpha_pattern", "task_type"):
            if config.get(key) not in (None, {}, []):
                lines.append(f"| {key} | {_cell(config[key])} |")
        lines.append("")
    if settings:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in settings.items() if not k.startswith("lora.") and k != "data"]
        lines.append("")
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    if evals:
        keys = [k for k in evals[-1] if k.startswith("eval_")]
        lines += ["## Evaluation", "", "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {h['step']} | " + " | ".join(f"{h[k]:.4f}" if isinstance(h.get(k), float) else str(h.get(k, ""))
                                                   for k in keys) + " |" for h in evals]
        lines.append("")
    curve = loss_svg(history)
    if curve is not None:
        lines += ["## Loss", "", f"![training and evaluation loss]({CURVE})", ""]
    return "\n".join(lines), curve


def _cell(value: Any) -> str:
    """A value as code in a markdown table cell (a | would end the cell)."""
    return "`" + json.dumps(value).replace("|", "\\|") + "`"
