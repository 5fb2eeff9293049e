"""The training loop: accumulation equals one big batch, the schedule equals its formula, resume
continues the same loss curve, checkpoints are atomic, frozen weights never move."""

import builtins
import json
import math
import os
import signal
import warnings
from pathlib import Path

import minilora.hardware
import pytest
import torch
from conftest import Tok, digests, examples, grads, lora_model
from minilora.data.batching import collate
from minilora.errors import CheckpointError, ConfigError
from minilora.formats.atomic import write_atomically
from minilora.hardware import use_bf16
from minilora.training.checkpoint import checkpoint_folders
from minilora.training.loop import TrainConfig, accumulate_gradients, lr_factor, train
from minilora.training.objectives.causal_lm import causal_lm_loss


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_accumulation_equals_one_big_batch(saved_tiny, kind):
    model = lora_model(saved_tiny, kind)
    data = examples(8)
    assert len({len(e.input_ids) for e in data}) > 3  # unequal lengths
    accumulate_gradients(model, [collate(data, 0)])
    big = grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [collate(data[i:i + 2], 0) for i in range(0, 8, 2)])
    small = grads(model)
    assert big.keys() == small.keys() and len(big) > 0
    for n in big:
        assert (big[n] - small[n]).abs().max().item() <= 1e-6, n


def test_accumulated_loss_is_the_token_mean(saved_tiny):
    model = lora_model(saved_tiny)
    data = examples(6)
    loss, count = accumulate_gradients(model, [collate(data[:1], 0), collate(data[1:], 0)])
    batch = collate(data, 0)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss - expected.item()) < 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_equals_the_formula(saved_tiny, tmp_path, schedule):
    model = lora_model(saved_tiny)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=10, micro_batch_size=2, batch_size=4, lr=1e-2,
                      warmup_steps=4, lr_schedule=schedule, progress=False)
    lrs = [h["lr"] for h in train(model, Tok, examples(8), None, cfg).history]
    assert lrs[0] == 0.0                                    # step 0: warmup starts at zero
    assert lrs[2] == pytest.approx(1e-2 * 2 / 4)            # halfway through warmup
    assert lrs[4] == pytest.approx(1e-2)                    # warmup end: the peak
    progress = (9 - 4) / (10 - 4)                           # the last step
    last = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    assert lrs[9] == pytest.approx(1e-2 * last)
    assert lr_factor(10, 4, 10, schedule) == pytest.approx(0.0)


def run(saved_tiny, out, **kw):
    model = lora_model(saved_tiny, dropout=0.1)  # dropout: resume must restore the RNG too
    cfg = TrainConfig(output_dir=str(out), epochs=3, micro_batch_size=2, batch_size=4, lr=5e-3, warmup_steps=2,
                      save_every=2, keep_last=2, progress=False, eval_every=3, **kw)
    return model, train(model, Tok, examples(10), examples(4, seed=1), cfg)


def losses(result):
    return {h["step"]: h["loss"] for h in result.history if "loss" in h}


def test_resume_after_stop_equals_uninterrupted(saved_tiny, tmp_path):
    model_a, full = run(saved_tiny, tmp_path / "a")
    assert not full.stopped_early
    # The second run is asked to stop after step 5 (as SIGTERM does from the CLI), saving a checkpoint;
    # then it resumes.
    model_b = lora_model(saved_tiny, dropout=0.1)
    cfg = TrainConfig(output_dir=str(tmp_path / "b"), epochs=3, micro_batch_size=2, batch_size=4, lr=5e-3,
                      warmup_steps=2, save_every=2, keep_last=2, progress=False, eval_every=3)
    asked = []
    stopped = train(model_b, Tok, examples(10), examples(4, seed=1), cfg,
                    should_stop=lambda: asked.append(1) or len(asked) == 5)
    assert len(asked) == 5  # asked once per step, and it stopped at once
    assert stopped.stopped_early and stopped.adapter_dir is None
    assert checkpoint_folders(tmp_path / "b")[-1].name == "checkpoint-5"
    model_c = lora_model(saved_tiny, dropout=0.1)
    torch.manual_seed(123)  # whatever the RNG is now, resume restores the checkpoint's
    cfg.resume_from_checkpoint = "latest"
    resumed = train(model_c, Tok, examples(10), examples(4, seed=1), cfg)
    assert not resumed.stopped_early
    a, c = losses(full), losses(resumed)
    assert sorted(c) == list(range(6, 10))
    for step in c:
        assert abs(a[step] - c[step]) <= 1e-6, step
    evals_a = [h for h in full.history if "eval_loss" in h]
    evals_c = [h for h in resumed.history if "eval_loss" in h]
    assert evals_c and all(abs(x["eval_loss"] - y["eval_loss"]) <= 1e-6 for x, y in zip(evals_a[-len(evals_c):], evals_c))
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert (p - q).abs().max().item() <= 1e-6, n
    # the metrics file of the resumed run reads as one uninterrupted run
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 10))
    # only the last K=2 checkpoints remain
    assert [f.name for f in checkpoint_folders(tmp_path / "b")] == ["checkpoint-6", "checkpoint-8"]


def test_crash_during_a_checkpoint_leaves_the_previous_one_loadable(saved_tiny, tmp_path, monkeypatch):
    """The disk fills while checkpoint-4 is being written (its adapter files already in its temporary
    folder, its optimizer state next): checkpoint-2 stays on disk as it was, not a file of it rewritten,
    no half checkpoint or temporary is left, and the run resumes from checkpoint-2."""
    import io
    seen = {}

    def full_disk_on(open_):
        def opener(file, mode="r", *a, **k):
            path = Path(file) if isinstance(file, (str, os.PathLike)) else None
            if (path is not None and any(c in mode for c in "wax+") and path.name == "optimizer.pt"
                    and path.parent.name.startswith(".checkpoint-4.tmp-")):
                kept = sorted((tmp_path / "checkpoint-2").iterdir())
                seen.update(files=digests(tmp_path / "checkpoint-2"),
                            stats={p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept},
                            written=sorted(p.name for p in path.parent.iterdir()))
                raise OSError(28, "No space left on device")
            return open_(file, mode, *a, **k)
        return opener
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", full_disk_on(builtins.open))
        m.setattr(io, "open", full_disk_on(io.open))
        with pytest.raises(CheckpointError, match=r"checkpoint-4: No space left on device while writing .*"
                                                  r"\.checkpoint-4\.tmp-\d+; the previous version, if any, is kept"):
            run(saved_tiny, tmp_path)
    assert "adapter_model.safetensors" in seen["written"]  # the disk filled in the middle of the checkpoint
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".minilora.lock", "checkpoint-2", "metrics.jsonl"]
    kept = tmp_path / "checkpoint-2"
    whole = {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
    assert whole <= set(seen["files"])
    assert digests(kept) == seen["files"]  # not a byte changed ...
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(kept.iterdir())} == seen["stats"]  # nor rewritten
    _, resumed = run(saved_tiny, tmp_path, resume_from_checkpoint="latest")
    assert min(losses(resumed)) == 3


def test_resume_with_changed_settings_is_refused(saved_tiny, tmp_path):
    run(saved_tiny, tmp_path)
    model = lora_model(saved_tiny)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=3, micro_batch_size=2, batch_size=2, lr=5e-3,
                      resume_from_checkpoint="latest", progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume, the run's settings changed \(batch_size: checkpoint 4 vs now 2"):
        train(model, Tok, examples(10), None, cfg)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-2"
    write_atomically(folder, lambda d: (d / "a.txt").write_text("good"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(CheckpointError, match="checkpoint-2: No space left on device while writing"):
        write_atomically(folder, crash)
    assert (folder / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # no temporary left behind


def test_only_lora_parameters_change(saved_tiny, tmp_path):
    model = lora_model(saved_tiny, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    train(model, Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path), max_steps=3, micro_batch_size=4,
                                                     lr=1e-2, weight_decay=0.1, progress=False))
    after = model.state_dict()
    for n in before:
        if "lora_" in n:
            assert not torch.equal(before[n], after[n]), n
        else:
            assert torch.equal(before[n], after[n]), n  # bit-identical


def test_best_model_is_loaded_at_the_end(saved_tiny, tmp_path):
    model = lora_model(saved_tiny)
    scores = iter([0.5, 0.9, 0.7, 0.6])  # peaks at the second evaluation
    seen = {}

    def evaluate_fn(m):
        score = next(scores)
        seen[score] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        return {"eval_accuracy": score}
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=4, micro_batch_size=4, lr=1e-2, eval_every=1,
                      best_metric="eval_accuracy", load_best_at_end=True, progress=False)
    result = train(model, Tok, examples(8), None, cfg, evaluate_fn=evaluate_fn)
    assert result.best_step == 2 and result.best_metric == 0.9
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, seen[0.9][n]), n
    assert json.loads((tmp_path / "best" / "minilora.json").read_text())["best_step"] == 2


def test_non_finite_loss_stops_with_the_step(saved_tiny, tmp_path):
    from minilora.errors import TrainingError
    model = lora_model(saved_tiny)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1: the loss is nan"):
        train(model, Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path), max_steps=2, progress=False))


def test_gradient_checkpointing_gives_the_same_gradients(saved_tiny):
    from minilora.training.loop import set_gradient_checkpointing
    model = lora_model(saved_tiny)
    batch = collate(examples(4), 0)
    accumulate_gradients(model, [batch])
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    set_gradient_checkpointing(model, True)
    model.train()
    accumulate_gradients(model, [batch])
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_autocast_trains(saved_tiny, tmp_path, monkeypatch, bf16):
    """bf16 = true: every training forward of a LoRA layer runs under CPU autocast to bf16 and gives bf16
    activations; bf16 = false: none does. Both train (the loss falls)."""
    monkeypatch.setattr(minilora.hardware, "matmul_is_fast", lambda dtype, device_type: True)  # no slow-bf16 warning
    model = lora_model(saved_tiny)
    layer = model.model.layers[0].self_attn.q_proj
    seen = []

    def record(module, inputs, output):
        if module.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))
    layer.register_forward_hook(record)
    result = train(model, Tok, examples(16), None, TrainConfig(output_dir=str(tmp_path), max_steps=6, micro_batch_size=8,
                                                               lr=2e-2, bf16=bf16, progress=False))
    assert len(seen) == 6  # one micro-batch in each of the 6 steps
    if bf16:
        assert set(seen) == {(True, torch.bfloat16, torch.bfloat16)}
    else:
        assert {(enabled, out) for enabled, _, out in seen} == {(False, torch.float32)}
    assert not torch.is_autocast_enabled("cpu")  # and autocast ends with the run
    l = losses(result)
    assert all(math.isfinite(v) for v in l.values()) and l[6] < l[1]


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_auto_follows_the_machine_and_true_warns_where_bf16_is_slow(saved_tiny, tmp_path, monkeypatch, fast):
    # a machine with or without fast bf16 products (the measurement itself: hardware.matmul_is_fast)
    monkeypatch.setattr(minilora.hardware, "matmul_is_fast", lambda dtype, device_type: fast)
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is fast and use_bf16(False, cpu) is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert use_bf16(True, cpu) is True
    assert [str(w.message)[:40] for w in caught] == ([] if fast else ["bf16 = true on a cpu whose bf16 matrix p"])
    runs = {}
    for setting in ("auto", fast):  # "auto" trains exactly as the setting it resolves to
        cfg = TrainConfig(output_dir=str(tmp_path / str(setting)), max_steps=2, micro_batch_size=8, lr=2e-2,
                          bf16=setting, progress=False)
        runs[setting] = losses(train(lora_model(saved_tiny), Tok, examples(16), None, cfg))
    assert runs["auto"] == runs[fast]
    if not fast:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bf16 = losses(train(lora_model(saved_tiny), Tok, examples(16), None, TrainConfig(
                output_dir=str(tmp_path / "bf16"), max_steps=2, micro_batch_size=8, lr=2e-2, bf16=True, progress=False)))
        assert bf16 != runs["auto"]  # the comparison can tell bf16 from fp32


def test_train_as_a_library_leaves_the_signal_handlers_alone(saved_tiny, tmp_path):
    """Only the command line turns SIGINT/SIGTERM into a graceful stop; train() called from a host
    program keeps the host's handlers, during the run and after it."""
    def host_handler(signum, frame):
        pass
    before = {sig: signal.signal(sig, host_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def loss_fn(model, batch):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return causal_lm_loss(model, batch)
    try:
        result = train(lora_model(saved_tiny), Tok, examples(8), None,
                       TrainConfig(output_dir=str(tmp_path), max_steps=2, micro_batch_size=4, progress=False),
                       loss_fn=loss_fn)
        assert not result.stopped_early and len(seen) == 2
        assert all(handlers == (host_handler, host_handler) for handlers in seen)
        assert signal.getsignal(signal.SIGINT) is host_handler and signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_training_shows_each_micro_batch_and_logs_lines_without_the_bar(saved_tiny, tmp_path, capsys, monkeypatch):
    """The bar moves per micro-batch (a quarter step at a time with 4 micro-batches a step) with tokens/s,
    loss and lr; with progress off, every log_every-th step is a printed line."""
    import functools
    import sys

    from minilora.training.progress import progress_bar
    monkeypatch.setattr(sys.modules["minilora.training.loop"], "progress_bar", functools.partial(progress_bar, mininterval=0))
    model = lora_model(saved_tiny)
    train(model, Tok, examples(16), None, TrainConfig(output_dir=str(tmp_path / "a"), max_steps=2, micro_batch_size=2,
                                                     batch_size=8, lr=1e-3))
    err = capsys.readouterr().err
    assert "0.2/2 steps" in err and "0.8/2 steps" in err and "tok/s" in err and "loss=" in err and "2.0/2 steps" in err
    model = lora_model(saved_tiny)
    train(model, Tok, examples(16), None, TrainConfig(output_dir=str(tmp_path / "b"), max_steps=4, micro_batch_size=2,
                                                     batch_size=8, lr=1e-3, progress=False, log_every=2))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step=")]
    assert [l.split()[0] for l in lines] == ["step=2", "step=4"] and all("loss=" in l and "lr=" in l for l in lines)


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_better_metric(saved_tiny, tmp_path, capsys):
    """Scores 0.5, 0.9, 0.7, 0.8, 0.6, ... with patience 3: the best is step 2, steps 3-5 bring nothing
    better, the run ends at step 5 as a finished one (its adapter saved, the best one with load_best_at_end)."""
    model = lora_model(saved_tiny)
    scores = iter([0.5, 0.9, 0.7, 0.8, 0.6, 0.95, 0.99])

    def evaluate_fn(m):
        return {"eval_accuracy": next(scores)}
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=7, micro_batch_size=4, lr=1e-2, eval_every=1,
                      best_metric="eval_accuracy", load_best_at_end=True, early_stopping_patience=3, progress=False)
    result = train(model, Tok, examples(8), None, cfg, evaluate_fn=evaluate_fn)
    assert result.early_stopped_at == 5 and result.best_step == 2 and not result.stopped_early
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "early stopping at step 5: 3 evaluations without a better eval_accuracy than 0.9 (step 2)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="early_stopping_patience .* needs best_metric"):
        TrainConfig(output_dir=str(tmp_path), early_stopping_patience=2)


def test_tensorboard_event_files_hold_the_logged_numbers(saved_tiny, tmp_path):
    """report_to = "tensorboard": each logged loss, lr and evaluation is a scalar at its step, read back
    with TensorBoard's own reader and equal to metrics.jsonl's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = lora_model(saved_tiny)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, micro_batch_size=4, lr=1e-2, eval_every=3,
                      report_to="tensorboard", progress=False)
    train(model, Tok, examples(8), examples(4, seed=5), cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [(s, round(v, 5)) for s, v in losses]
    evals = [r["step"] for r in logged if "eval_loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == evals and evals and "train/lr" in events.Tags()["scalars"]
    with pytest.raises(ConfigError, match='report_to must be "tensorboard" or left out'):
        TrainConfig(output_dir=str(tmp_path), report_to="wandb")


def test_a_run_ended_by_early_stopping_stays_ended_on_resume_and_tensorboard_keeps_one_history(saved_tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scores = iter([0.9, 0.5, 0.4] + [0.99] * 10)
    cfg = dict(output_dir=str(tmp_path), max_steps=8, micro_batch_size=4, lr=1e-2, eval_every=1, save_every=1,
               best_metric="eval_accuracy", early_stopping_patience=2, progress=False, report_to="tensorboard")
    first = train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg),
                  evaluate_fn=lambda m: {"eval_accuracy": next(scores)})
    assert first.early_stopped_at == 3
    again = train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg, resume_from_checkpoint="latest"),
                  evaluate_fn=lambda m: {"eval_accuracy": next(scores)})
    assert again.early_stopped_at == 3 and next(scores) == 0.99  # no further step, no evaluation
    cfg.update(early_stopping_patience=None)
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg, resume_from_checkpoint=str(tmp_path / "checkpoint-2")),
          evaluate_fn=lambda m: {"eval_accuracy": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # step 3 redone once, not twice


def test_the_loss_plot_leaves_out_what_is_not_a_finite_number(tmp_path):
    from minilora.training.plots import loss_svg, read_metrics
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": float("nan")}, [1, 2], {"loss": 3.0},
        {"step": 3, "loss": 1.5, "eval_loss": float("inf")}, {"step": 4, "loss": True}]) + "\n{\"step\": 5, \"lo")
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    svg = loss_svg(history)
    assert "nan" not in svg and "inf" not in svg and "loss 1.500 .. 2.000" in svg
