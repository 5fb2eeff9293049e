"""Training checkpoints: output_dir/checkpoint-<step>/ folders, the run's metrics log, resume, and the
output folder a run owns.

A run owns its output folder: it holds a lock on it for its whole life (a second run into the same
folder fails at once, naming the process), and a fresh run never writes over another run's
checkpoints or adapter (it refuses, unless told to resume or to overwrite).

A checkpoint holds the adapter (PEFT's files), the optimizer, the scheduler, every rank's RNG state and
trainer_state.json (the step, the best metric so far, and the run's fingerprint). Each is written to a
temporary folder and renamed into place, trainer_state.json last, so a folder with its final name is
complete: a crash at any moment leaves the previous checkpoint loadable. Resuming restores all of it,
and refuses a checkpoint whose fingerprint (batch sizes, schedule, seed, data size...) differs from the
run's, since the loss curve would then not continue. Under FSDP (fsdp.py) the adapter is gathered whole
and each rank's optimizer slice is a file of its own, in the same atomic folder: such a checkpoint is
resumed by an FSDP run of the same number of processes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder check below still applies
    fcntl = None

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, WriteError
from ..formats.atomic import make_folder, recover, write_atomically
from ..formats.paths import read_json
from ..lora.config import lora_state
from ..lora.peft_files import load_adapter, write_adapter_files
from . import distributed, fsdp

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".minilora.lock"


def previous_run(output_dir: Path) -> list[str]:
    """What of another run the folder holds: checkpoints, the final adapter, the best one."""
    found = [p.name for p in checkpoint_folders(output_dir)]
    return found + [name for name in ("adapter", "best") if (output_dir / name).is_dir()]


@contextlib.contextmanager
def own_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> Iterator[None]:
    """Hold output_dir for a run: lock it (another run holding it is an error naming its process), and
    unless the run resumes, refuse a folder that holds another run's checkpoints or adapter, or with
    `overwrite` delete that run's files (checkpoints, adapter/, best/, metrics.jsonl, loss.svg/png,
    tensorboard/) first."""
    make_folder(output_dir)
    try:
        lock = open(output_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise WriteError(f"{output_dir / LOCK_FILE}: cannot create the run's lock file ({e.strerror or e})") from None
    with lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise CheckpointError(f"{output_dir}: another run is training into this folder (process {holder}); "
                                      "wait for it to end, or choose another output_dir") from None
        try:  # unbuffered: a disk too full for the pid fails here, by name, and not again on close
            os.ftruncate(lock.fileno(), 0)
            os.write(lock.fileno(), f"{os.getpid()}\n".encode())
        except OSError as e:
            raise WriteError(f"{output_dir / LOCK_FILE}: cannot write the run's lock file ({e.strerror or e}); the "
                             "run did not start") from None
        found = previous_run(output_dir)
        if found and not resuming:
            if not overwrite:
                raise CheckpointError(
                    f"{output_dir} holds another run ({', '.join(found)}), which a fresh run would overwrite. "
                    "Resume it (resume_from_checkpoint = \"latest\", --train.resume_from_checkpoint latest), or "
                    "delete it and start afresh (overwrite_output_dir = true, --train.overwrite_output_dir true), "
                    "or choose another output_dir")
            for name in found:
                shutil.rmtree(output_dir / name)
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
            for name in ("loss.svg", "loss.png"):  # drawn from that run's metrics
                (output_dir / name).unlink(missing_ok=True)
            shutil.rmtree(output_dir / "tensorboard", ignore_errors=True)  # and its TensorBoard events
        elif not resuming and (output_dir / METRICS_FILE).exists():  # a log with nothing saved: kept, aside
            (output_dir / METRICS_FILE).rename(output_dir / f"{METRICS_FILE}.{int(time.time())}.old")
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once its final name exists; one that a
    process killed while replacing it left aside is put back first)."""
    out = Path(output_dir)
    for aside in out.glob(".checkpoint-*.old-*") if out.is_dir() else ():
        try:
            recover(aside.with_name(aside.name[1:].rpartition(".old-")[0]))
        except CheckpointError:
            pass  # it cannot be put back (a read-only folder): not a checkpoint at its name, so not listed
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (p / STATE_FILE).is_file()] if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def run_fingerprint(config: Any, model: nn.Module, train_data: list, total_steps: int, bf16: bool) -> dict[str, Any]:
    """What must be the same for a checkpoint to be resumed exactly: the TrainConfig's batch sizes,
    schedule and optimizer settings, the LoRA settings, the training examples in their order (a digest
    of their token ids and labels), bf16 and the number of processes. As JSON would give it back."""
    data = hashlib.sha256()
    for example in train_data:
        data.update(np.asarray(example.input_ids, dtype=np.int64).tobytes() + b"|")
        data.update(np.asarray(example.labels, dtype=np.int64).tobytes() + b";")
    state = lora_state(model)
    lora = state.config if state is not None else None
    run = dict(batch_size=config.batch_size, micro_batch_size=config.micro_batch_size, seed=config.seed,
               lr=config.lr, lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps, total_steps=total_steps,
               weight_decay=config.weight_decay, adam_betas=config.adam_betas, max_grad_norm=config.max_grad_norm,
               optim=config.optim, loraplus_lr_ratio=config.loraplus_lr_ratio,
               loraplus_lr_embedding=config.loraplus_lr_embedding,
               bf16=bf16, processes=distributed.rank_and_world()[1], n_train=len(train_data),
               data=data.hexdigest()[:16], **{f"lora.{k}": v for k, v in
                                              (dataclasses.asdict(lora) if lora is not None else {}).items()},
               **({"fsdp": True} if getattr(config, "fsdp", False) else {}))  # absent without: old ones match
    return json.loads(json.dumps(run))


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Called on every rank: rank 0 writes the folder, with every rank's RNG state (dropout differs by rank).
    Under FSDP (fsdp.py) the adapter is gathered whole, and each rank's optimizer slice has its own file."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ranks = distributed.gather_objects(rng)
    optimizers = {"optimizer.pt": optimizer.state_dict()} if not fsdp.is_sharded(model) else \
        {optimizer_file(r): s for r, s in enumerate(distributed.gather_to_main(fsdp.optimizer_shard(optimizer)) or [])}
    with fsdp.whole_adapter(model):  # (FSDP) on every rank
        if not distributed.is_main():
            return folder

        def write(tmp: Path) -> None:
            write_adapter_files(tmp, model)
            for name, obj in (*optimizers.items(), ("scheduler.pt", scheduler.state_dict()),
                              ("rng.pt", {**rng, "ranks": ranks} if len(ranks) > 1 else rng)):
                buffer = io.BytesIO()  # serialised in memory, written by Python: a full disk is an OSError naming it
                torch.save(obj, buffer)
                (tmp / name).write_bytes(buffer.getvalue())
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # written last
        return write_atomically(folder, write)


def optimizer_file(rank: int | None = None) -> str:
    """optimizer.pt, or under FSDP rank r's slice of it: optimizer-rank<r>.pt."""
    return "optimizer.pt" if rank is None else f"optimizer-rank{rank}.pt"


def _refuse_another_layout(folder: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """An FSDP checkpoint holds one optimizer slice per rank, cut for its number of processes: resumed
    by that number only, and by an FSDP run only (and a data-parallel one by a data-parallel run)."""
    file, was, now = folder / STATE_FILE, saved.get("processes"), expected.get("processes")
    if bool(saved.get("fsdp")) != bool(expected.get("fsdp")):
        kind = ("an FSDP run (one optimizer slice per rank)", "fsdp = false") if saved.get("fsdp") else \
            ("a run without FSDP (one optimizer state for all ranks)", "fsdp = true")
        raise CheckpointError(f"{file}: written by {kind[0]}, but this run has {kind[1]}; resume it with the "
                              "setting it was written with")
    if saved.get("fsdp") and was != now:
        raise CheckpointError(f"{file}: written by an FSDP run of {was} processes, but this run has {now}: each "
                              f"rank's optimizer state is a slice cut for {was} (optimizer-rank0.pt ...), so resume "
                              f"it with {was} processes (torchrun --nnodes x --nproc_per_node = {was})")


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore a checkpoint into the model, optimizer, scheduler and RNG; returns trainer_state.json.
    Refused, naming each difference, when the checkpoint's fingerprint is not `expected`."""
    state = read_json(folder / STATE_FILE)
    saved = state.get("run")
    step = state.get("step")
    if not isinstance(saved, dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{folder / STATE_FILE}: expected a non-negative integer \"step\" and a \"run\" object")
    _refuse_another_layout(folder, saved, expected)
    wrong = [f"{k}: " + (f"checkpoint {saved[k]!r} vs now {v!r}" if k in saved else "not recorded in the checkpoint")
             for k, v in expected.items() if saved.get(k) != v]
    if wrong:
        why = " (the training examples or their order differ)" if "data" in saved and saved["data"] != expected["data"] else ""
        raise CheckpointError(f"{folder}: cannot resume, the run's settings changed ({'; '.join(wrong)}){why}")
    if step > expected.get("total_steps", step):
        raise CheckpointError(f"{folder / STATE_FILE}: step {step} is beyond the run's {expected['total_steps']} steps")
    for key, kind in (("best_metric", (int, float)), ("best_step", int)):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)):
            raise CheckpointError(f"{folder / STATE_FILE}: {key} is {value!r}, expected a finite number or null")
    rank = distributed.rank_and_world()[0]
    mine = optimizer_file(rank if expected.get("fsdp") else None)
    optimizer_state, scheduler_state, rng = (_read(folder, name) for name in (mine, "scheduler.pt", "rng.pt"))
    if expected.get("fsdp"):  # this rank's slices, made DTensors again: checked below as the parameters
        optimizer_state = fsdp.as_sharded(optimizer, optimizer_state, folder / mine)
    rng = rng.get("ranks", [rng])[rank] if isinstance(rng, dict) and len(rng.get("ranks", [rng])) > rank else None
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), torch.Tensor) and rng["cpu"].dtype == torch.uint8
            and rng["cpu"].shape == torch.get_rng_state().shape):
        raise CheckpointError(f"{folder / 'rng.pt'}: not the random-number state of this run's rank {rank} "
                              f"(expected a uint8 tensor of {torch.get_rng_state().numel()} bytes under 'cpu')")
    _check_states(folder, optimizer, optimizer_state, scheduler_state, step, expected)
    with fsdp.whole_adapter(model):  # (FSDP) every rank loads it whole, then keeps its slices
        load_adapter(model, folder)
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder}: optimizer or scheduler state does not fit this run ({e})") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _check_states(folder: Path, optimizer, optimizer_state: Any, scheduler_state: Any, step: int,
                  run: dict[str, Any]) -> None:
    """The optimizer state is this run's: moments of the parameters' shapes, counted to the checkpoint's
    step, and the run's lr, betas and weight decay; the scheduler is at the step, from the run's lr."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    file = folder / optimizer_file(distributed.rank_and_world()[0] if run.get("fsdp") else None)
    try:
        for i, moments in optimizer_state["state"].items():
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[i].shape:
                    raise CheckpointError(f"{file}: {key} of parameter {i} has shape {tuple(value.shape)}, the "
                                          f"parameter {tuple(params[i].shape)}")
                if key == "step" and float(value) != step:
                    raise CheckpointError(f"{file}: parameter {i} has taken {float(value):g} steps, the checkpoint {step}")
        if len(optimizer_state["param_groups"]) != len(optimizer.param_groups):
            raise CheckpointError(f"{file}: {len(optimizer_state['param_groups'])} parameter groups, this run's "
                                  f"optimizer {len(optimizer.param_groups)}")
        for group, mine in zip(optimizer_state["param_groups"], optimizer.param_groups):  # this run's, just made
            settings, want = ({"initial lr": g.get("initial_lr"), "betas": list(g["betas"]),
                               "weight_decay": g["weight_decay"]} for g in (group, mine))
            wrong = [f"{k} {settings[k]!r}, the run {want[k]!r}" for k in settings if settings[k] != want[k]]
            if wrong:
                raise CheckpointError(f"{file}: not this run's optimizer settings ({'; '.join(wrong)})")
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, RuntimeError):
        raise CheckpointError(f"{file}: not the optimizer state of this run's parameters") from None
    last = scheduler_state.get("_last_lr") if isinstance(scheduler_state, dict) else None
    if last is not None and [g.get("lr") for g in optimizer_state["param_groups"]] != list(last):
        raise CheckpointError(f"{file}: learning rates {[g.get('lr') for g in optimizer_state['param_groups']]}, "
                              f"not the schedule's {list(last)} at step {step}")
    base = [g["initial_lr"] for g in optimizer.param_groups]
    if isinstance(scheduler_state, dict) and scheduler_state.get("base_lrs", base) != base:
        runs = f"lr is {base[0]}" if len(set(base)) == 1 else f"are {base}"  # LoRA+: B's is A's times the ratio
        raise CheckpointError(f"{folder / 'scheduler.pt'}: base learning rates {scheduler_state['base_lrs']}, the run's "
                              f"{runs}")
    if not isinstance(scheduler_state, dict) or scheduler_state.get("last_epoch") != step:
        found = scheduler_state.get("last_epoch") if isinstance(scheduler_state, dict) else scheduler_state
        raise CheckpointError(f"{folder / 'scheduler.pt'}: the schedule is at step {found!r}, the checkpoint at {step}")


def _read(folder: Path, name: str) -> Any:
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint, {name} is missing")
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding more than tensors and plain data
        raise CheckpointError(f"{file}: not a readable checkpoint file, truncated or corrupt ({type(e).__name__})") from None


def rotate(output_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest keep_last checkpoints (the best model lives apart, in best/)."""
    if keep_last is not None and distributed.is_main():
        for old in checkpoint_folders(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(value: str, output_dir: Path) -> Path:
    """The checkpoint folder that `resume_from_checkpoint` names: a folder, or "latest" in output_dir."""
    if value == "latest":
        found = checkpoint_folders(output_dir)
        if not found:
            raise CheckpointError(f"{output_dir}: no checkpoint to resume from")
        return found[-1]
    folder = Path(os.path.expanduser(value))
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder}: " + ("a file; give the checkpoint's folder" if folder.is_file() else
                                               f"not a checkpoint folder (no {STATE_FILE})"))
    return folder


class MetricsLog:
    """output_dir/metrics.jsonl: one JSON record per logged step or evaluation, appended a whole line at
    a time. A fresh run starts it empty; a resumed one first drops what came after its step (and a
    partial last line a crash left), so that the file reads as one uninterrupted run. Rank 0 alone
    writes; on other ranks every call does nothing."""

    def __init__(self, output_dir: Path, resumed_step: int | None = None) -> None:
        self.file = output_dir / METRICS_FILE if distributed.is_main() else None
        if self.file is None:
            return
        keep = []
        if resumed_step is not None and self.file.exists():
            for line in self.file.read_text(encoding="utf-8", errors="replace").split("\n"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # blank, or a line a crash cut short
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resumed_step:
                    keep.append(line)
        self._write("".join(line + "\n" for line in keep), "w")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self._write(json.dumps(record) + "\n", "a")  # one write: a line is whole or, after a crash, cut short

    def _write(self, text: str, mode: str) -> None:
        try:
            with open(self.file, mode, encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise CheckpointError(f"{self.file}: {e.strerror or e} while writing the metrics log") from None
