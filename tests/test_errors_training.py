"""No run is lost, nothing trains silently wrong (minilora/training): a run owns its output folder (a lock
for its life, no fresh run over another run's files), resume refuses a changed or damaged checkpoint,
TrainConfig values and training data that would train to a wrong result are refused before any step,
and a full disk or a folder that cannot be written is named with nothing saved lost."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import Tok, copy_model, digests, examples, lora_model
from minilora.data.records import Example
from minilora.errors import CheckpointError, ConfigError, DataError, TrainingError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.training.checkpoint import checkpoint_folders, own_output_dir
from minilora.training.loop import TrainConfig, train


def quick(out, **kw):
    return TrainConfig(**{**dict(output_dir=str(out), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2,
                                 save_every=2, progress=False), **kw})


def short(tmp_path, **kw):
    """Two steps into tmp_path/run."""
    return TrainConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=2, progress=False), **kw})


# ---------------------------------------------------------------------------------------------
# TrainConfig: values that would train wrongly

LR_RANGE = r"lr must be a positive number at most 1 \(AdamW moves every weight by about lr each step; LoRA runs take 1e-5 to 1e-3\), got "


@pytest.mark.parametrize("bad, message", [
    pytest.param(dict(micro_batch_size=0), "micro_batch_size must be a positive integer", id="zero-micro-batch"),
    pytest.param(dict(micro_batch_size=3, batch_size=8), "batch_size=8 is not a multiple of micro_batch_size=3",
                 id="batch-not-a-multiple-of-micro-batch"),
    pytest.param(dict(lr_schedule="exp"), "lr_schedule must be", id="unknown-schedule"),
    pytest.param(dict(lr=-1.0), LR_RANGE + "-1.0", id="negative-lr"),
    pytest.param(dict(lr=float("inf")), LR_RANGE + "inf", id="infinite-lr"),
    pytest.param(dict(lr=float("nan")), LR_RANGE + "nan", id="nan-lr"),
    pytest.param(dict(lr=1e30), LR_RANGE + "1e\\+30", id="lr-1e30-would-diverge"),
    pytest.param(dict(lr=1e39), LR_RANGE + "1e\\+39", id="lr-beyond-float32"),
    pytest.param(dict(load_best_at_end=True), "load_best_at_end needs best_metric", id="load-best-without-metric"),
    pytest.param(dict(bf16="yes"), 'bf16 must be true, false or "auto"', id="bf16-text"),
    pytest.param(dict(bf16=1), 'bf16 must be true, false or "auto"', id="bf16-integer"),
    pytest.param(dict(max_grad_norm=0.0), "max_grad_norm must be a positive finite number, got 0.0",
                 id="zero-max-grad-norm"),
    pytest.param(dict(max_grad_norm=-1.0), "max_grad_norm must be a positive finite number, got -1.0",
                 id="negative-max-grad-norm"),
    pytest.param(dict(max_grad_norm=float("nan")), "max_grad_norm must be a positive finite number, got nan",
                 id="nan-max-grad-norm"),
    pytest.param(dict(max_grad_norm=float("inf")), "max_grad_norm must be a positive finite number, got inf",
                 id="infinite-max-grad-norm"),
    pytest.param(dict(adam_betas=(1.0, 0.999)), r"adam_betas must be two numbers in \[0, 1\), got \[1.0, 0.999\]",
                 id="beta1-one"),
    pytest.param(dict(adam_betas=(0.9, -0.1)), r"adam_betas must be two numbers in \[0, 1\)", id="negative-beta2"),
    pytest.param(dict(adam_betas=(0.9,)), r"adam_betas must be two numbers in \[0, 1\), got \[0.9\]", id="one-beta"),
    pytest.param(dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0, got inf",
                 id="infinite-weight-decay"),
    pytest.param(dict(warmup_steps=2.5), "warmup_steps must be an integer, got 2.5", id="fractional-warmup"),
    pytest.param(dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1", id="negative-warmup"),
    pytest.param(dict(overwrite_output_dir="false"), "overwrite_output_dir must be true or false, got 'false'",
                 id="overwrite-text"),
    pytest.param(dict(eval_each_epoch="no"), "eval_each_epoch must be true or false, got 'no'", id="eval-each-epoch-text"),
    pytest.param(dict(resume_from_checkpoint=True), "resume_from_checkpoint must be a string or null, got True",
                 id="resume-a-bool"),
    pytest.param(dict(output_dir=None), "output_dir must be set", id="no-output-dir"),
    pytest.param(dict(output_dir=""), "output_dir and resume_from_checkpoint must not be empty", id="empty-output-dir"),
    pytest.param(dict(seed=2 ** 62), r"seed must be an integer in \[0, 2\*\*32\), got 4611686018427387904",
                 id="seed-beyond-32-bits"),
    pytest.param(dict(offload_activations="yes"), "offload_activations must be true or false, got 'yes'",
                 id="offload-text"),
    pytest.param(dict(offload_activations=True, fsdp=True), "offload_activations with fsdp = true is not supported yet",
                 id="offload-with-fsdp"),
])
def test_train_config_values_that_train_wrongly_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)


def test_warmup_longer_than_the_run_is_a_warning(saved_tiny, tmp_path):
    with pytest.warns(UserWarning, match=r"warmup_steps=100 is not shorter than the run \(4 steps\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, warmup_steps=100))


# ---------------------------------------------------------------------------------------------
# train(): mistakes refused before any step, nothing written

def test_a_best_metric_evaluation_does_not_give_is_refused_before_any_step(saved_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"best_metric 'eval_bleu' is not among the metrics evaluation gives: "
                                          r"eval_loss, eval_perplexity"):
        train(lora_model(saved_tiny), Tok, examples(8), examples(2), short(tmp_path, best_metric="eval_bleu"))
    assert not (tmp_path / "run").exists()


def test_a_best_metric_without_evaluation_data_is_refused_before_any_step(saved_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"best_metric='eval_loss' needs evaluation data"):
        train(lora_model(saved_tiny), Tok, examples(8), None,
              short(tmp_path, best_metric="eval_loss", load_best_at_end=True))
    assert not (tmp_path / "run").exists()


def test_training_a_merged_model_is_refused_before_any_step(saved_tiny, tmp_path):
    from minilora.lora.inject import merge_lora
    merged = lora_model(saved_tiny)
    merge_lora(merged)
    with pytest.raises(ConfigError, match=r"LoRA layers are merged into the base weights: unmerge_lora\(model\) first"):
        train(merged, Tok, examples(8), None, short(tmp_path))
    assert not (tmp_path / "run").exists()


def test_a_class_id_beyond_the_models_classes_is_refused_before_any_step(saved_tiny, tmp_path):
    classifier = apply_lora(load_model(saved_tiny["distilbert"][1]), ["q_lin"], r=2, modules_to_save=["classifier"])
    with pytest.raises(DataError, match=r"example 0 has class 7, but the model has 2 classes \(0 to 1\)"):
        train(classifier, Tok, [Example([5, 6], 7)], None, short(tmp_path))
    assert not (tmp_path / "run").exists()


def test_train_data_with_no_token_to_learn_is_refused_before_anything_is_written(saved_tiny, tmp_path):
    with pytest.raises(DataError, match="train_data has no token to learn: every label is -100"):
        train(lora_model(saved_tiny), Tok, [Example([5, 6, 7], [5, -100, -100])], None, quick(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_token_ids_beyond_the_embeddings_are_named(saved_tiny, tmp_path):
    with pytest.raises(DataError, match=r"example 0 holds token id 500, beyond the model's 97 embeddings"):
        train(lora_model(saved_tiny), Tok, [Example([5, 500, 7], [5, 500, 7])], None,
              TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False))


def test_a_pad_to_shorter_than_an_example_is_named(saved_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"pad_to=2 is shorter than example 0 \(3 tokens\)"):
        train(lora_model(saved_tiny), Tok, [Example([5, 6, 7], [5, 6, 7])], None,
              TrainConfig(output_dir=str(tmp_path), max_steps=1, pad_to=2, progress=False))


def test_examples_mixing_class_ids_and_token_labels_are_refused(saved_tiny, tmp_path):
    with pytest.raises(DataError, match=r"the examples mix class ids \(classification\) and token labels"):
        train(lora_model(saved_tiny), Tok, [*examples(4), Example([5, 6], 0)], None, short(tmp_path))


def test_eval_data_with_no_token_to_evaluate_is_refused(saved_tiny, tmp_path):
    with pytest.raises(DataError, match=r"eval_data has no token to evaluate"):
        train(lora_model(saved_tiny), Tok, examples(4), [Example([5, 6, 7], [5, -100, -100])], short(tmp_path))


def test_a_classifier_whose_fresh_head_would_stay_untrained_is_refused(saved_tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    fresh = copy_model(saved_tiny, tmp_path, "distilbert")
    save_file({k: v for k, v in load_file(str(fresh / "model.safetensors")).items() if "classifier" not in k},
              str(fresh / "model.safetensors"))
    head_untrained = apply_lora(load_model(fresh), ["q_lin"], r=2)
    with pytest.raises(ConfigError, match=r"the classification head starts untrained \(pre_classifier\.weight"):
        train(head_untrained, Tok, [Example([5, 6], 1), Example([7, 8], 0)], None, short(tmp_path))


# ---------------------------------------------------------------------------------------------
# A run owns its output folder

def test_a_fresh_run_refuses_a_folder_holding_another_run_and_keeps_it_byte_identical(saved_tiny, tmp_path):
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    before = digests(tmp_path)
    assert "adapter/adapter_model.safetensors" in before and "checkpoint-4/optimizer.pt" in before
    with pytest.raises(CheckpointError, match=r"holds another run \(checkpoint-2, checkpoint-4, adapter\), which a "
                                              r"fresh run would overwrite\. Resume it .*latest.* or delete it and start "
                                              r"afresh \(overwrite_output_dir = true"):
        train(lora_model(saved_tiny), Tok, examples(8, seed=3), None, quick(tmp_path))
    assert digests(tmp_path) == before  # not a byte of the first run changed


def test_resuming_a_run_in_its_own_folder_is_allowed(saved_tiny, tmp_path):
    first = train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    resumed = train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, resume_from_checkpoint="latest"))
    assert resumed.adapter_dir == first.adapter_dir


def test_overwrite_output_dir_replaces_the_other_run(saved_tiny, tmp_path):
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    before = digests(tmp_path)
    again = train(lora_model(saved_tiny), Tok, examples(8, seed=3), None, quick(tmp_path, overwrite_output_dir=True,
                                                                                   save_every=3))
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-3"]  # the old ones are gone
    assert digests(tmp_path)["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not again.stopped_early


def test_resuming_another_runs_checkpoint_never_writes_over_a_finished_run(saved_tiny, tmp_path):
    cfg = dict(max_steps=4, micro_batch_size=2, batch_size=4, save_every=2, progress=False)
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    kept = (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"b holds another run \(checkpoint-2, checkpoint-4, adapter\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(
            output_dir=str(tmp_path / "b"), resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **cfg))
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == kept


def test_a_fresh_run_moves_a_metrics_log_it_finds_aside(saved_tiny, tmp_path):
    """A fresh run keeps a log it finds beside nothing saved: moved aside, not overwritten."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"mine": true}\n')
    train(lora_model(saved_tiny), Tok, examples(8), None, short(tmp_path))
    kept = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(kept) == 1 and kept[0].read_text() == '{"mine": true}\n'


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from minilora.training.checkpoint import own_output_dir
    with own_output_dir(Path(sys.argv[1]), resuming=False, overwrite=False):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_concurrent_run_fails_at_once_naming_the_process(saved_tiny, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=rf"run: another run is training into this folder \(process "
                                                  rf"{holder.pid}\); wait for it to end, or choose another output_dir"):
            train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "run"))
        assert time.monotonic() - start < 5  # at once, not after loading or training
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_its_process_even_a_sigkilled_one(saved_tiny, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    assert not train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "run")).stopped_early


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path):
    with own_output_dir(tmp_path, resuming=False, overwrite=False):
        with pytest.raises(CheckpointError, match=rf"process {os.getpid()}"):
            with own_output_dir(tmp_path, resuming=False, overwrite=False):
                pass
    with own_output_dir(tmp_path, resuming=False, overwrite=False):  # released on exit
        pass


def test_stale_file_clean_up_never_touches_a_live_process_temporaries(tmp_path):
    from minilora.formats.atomic import write_atomically
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f".adapter.tmp-{live.pid}").mkdir()      # another process writing this very folder now
        (tmp_path / f".adapter.tmp-{dead.pid}").mkdir()      # what a killed writer left
        write_atomically(tmp_path / "adapter", lambda d: (d / "a.txt").write_text("x"))
        assert (tmp_path / f".adapter.tmp-{live.pid}").is_dir()
        assert not (tmp_path / f".adapter.tmp-{dead.pid}").exists()
        assert (tmp_path / "adapter" / "a.txt").read_text() == "x"
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# Resume refuses whatever would alter the run, and damaged checkpoints

@pytest.mark.parametrize("change, named", [
    pytest.param(dict(lora=dict(alpha=16)), "lora.alpha: checkpoint 8 vs now 16", id="lora-alpha"),
    pytest.param(dict(lora=dict(r=2)), "lora.r: checkpoint 4 vs now 2", id="lora-r"),
    pytest.param(dict(lora=dict(dropout=0.2)), "lora.dropout: checkpoint 0.0 vs now 0.2", id="lora-dropout"),
    pytest.param(dict(lora=dict(use_rslora=True)), "lora.use_rslora: checkpoint False vs now True", id="lora-rslora"),
    pytest.param(dict(lora=dict(targets=["q_proj"])), r"lora.targets: checkpoint 'all-linear' vs now \['q_proj'\]",
                 id="lora-targets"),
    pytest.param(dict(data_seed=7),
                 r"data: checkpoint '[0-9a-f]{16}' vs now '[0-9a-f]{16}'\) \(the training examples or their order",
                 id="training-data"),
    pytest.param(dict(config=dict(weight_decay=0.1)), "weight_decay: checkpoint 0.0 vs now 0.1", id="weight-decay"),
    pytest.param(dict(config=dict(adam_betas=(0.8, 0.99))), r"adam_betas: checkpoint \[0.9, 0.999\] vs now \[0.8, 0.99\]",
                 id="adam-betas"),
    pytest.param(dict(config=dict(max_grad_norm=0.5)), "max_grad_norm: checkpoint 1.0 vs now 0.5", id="max-grad-norm"),
    pytest.param(dict(config=dict(lr_schedule="cosine")), "lr_schedule: checkpoint 'linear' vs now 'cosine'",
                 id="lr-schedule"),
    pytest.param(dict(config=dict(max_steps=6)), "total_steps: checkpoint 4 vs now 6", id="total-steps"),
    pytest.param(dict(config=dict(seed=1)), "seed: checkpoint 42 vs now 1", id="seed"),
])
def test_resume_refuses_every_change_that_alters_the_run(saved_tiny, tmp_path, change, named):
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    model = load_model(saved_tiny["llama-gqa"][1])
    apply_lora(model, **{"targets": "all-linear", "r": 4, "alpha": 8, **change.get("lora", {})})
    data = examples(8, seed=change.get("data_seed", 0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"checkpoint-4: cannot resume, the run's settings changed \(.*" + named):
        train(model, Tok, data, None, quick(tmp_path, resume_from_checkpoint="latest", **change.get("config", {})))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was loaded


def test_resuming_from_a_path_that_is_not_a_checkpoint_folder_is_refused_before_any_step(saved_tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not a checkpoint folder"):
        train(lora_model(saved_tiny), Tok, examples(8), None,
              short(tmp_path, resume_from_checkpoint=str(tmp_path / "trainer_state.json")))
    assert not (tmp_path / "run").exists()


def test_resuming_from_a_file_asks_for_the_checkpoints_folder(saved_tiny, tmp_path):
    train(lora_model(saved_tiny), Tok, examples(8), None, short(tmp_path))
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: a file; give the checkpoint's folder"):
        train(lora_model(saved_tiny), Tok, examples(8), None, short(
            tmp_path, output_dir=str(tmp_path / "other"), resume_from_checkpoint=str(tmp_path / "run" / "metrics.jsonl")))


@pytest.mark.parametrize("damage, message", [
    pytest.param("optimizer", r"optimizer\.pt: not a readable checkpoint file, truncated or corrupt",
                 id="truncated-optimizer"),
    pytest.param("step", r"trainer_state\.json: expected a non-negative integer \"step\" and a \"run\" object",
                 id="step-as-text"),
    pytest.param("best", r"trainer_state\.json: best_metric is 'low', expected a finite number or null",
                 id="best-metric-text"),
    pytest.param("nan", r"trainer_state\.json: best_metric is nan, expected a finite number or null",
                 id="best-metric-nan"),
    pytest.param("bool", r"trainer_state\.json: expected a non-negative integer \"step\"", id="step-a-bool"),
    pytest.param("far", r"trainer_state\.json: step 999 is beyond the run's 4 steps", id="step-beyond-the-run"),
    pytest.param("moments", r"optimizer\.pt: exp_avg of parameter 0 has shape \(3,\)", id="optimizer-moments-shape"),
    pytest.param("schedule", r"scheduler\.pt: the schedule is at step 'x', the checkpoint at 4", id="schedule-step-text"),
    pytest.param("rng", r"rng\.pt: not the random-number state of this run's rank 0", id="rng-state"),
    pytest.param("missing", r"checkpoint-4: incomplete checkpoint, scheduler\.pt is missing", id="scheduler-missing"),
])
def test_damaged_training_checkpoints_are_named_errors(saved_tiny, tmp_path, damage, message):
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    ckpt = tmp_path / "checkpoint-4"
    if damage == "optimizer":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[:len(data) // 2])
    elif damage in ("step", "best", "nan", "bool", "far"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.update({"step": {"step": "4", "bool": True, "far": 999}[damage]} if damage in ("step", "bool", "far")
                     else {"best_metric": "low" if damage == "best" else float("nan")})
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    elif damage == "moments":
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        state["state"][0]["exp_avg"] = torch.zeros(3)
        torch.save(state, ckpt / "optimizer.pt")
    elif damage == "schedule":
        state = torch.load(ckpt / "scheduler.pt", weights_only=True)
        state["last_epoch"] = "x"
        torch.save(state, ckpt / "scheduler.pt")
    elif damage == "rng":
        torch.save({"cpu": torch.zeros(10, dtype=torch.uint8)}, ckpt / "rng.pt")
    else:
        (ckpt / "scheduler.pt").unlink()
    model = lora_model(saved_tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=message):
        train(model, Tok, examples(8), None, quick(tmp_path, resume_from_checkpoint="latest"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before loading anything


@pytest.mark.parametrize("damage, message", [
    pytest.param("lr", r"optimizer\.pt: not this run's optimizer settings \(initial lr 100\.0, the run 0\.01\)",
                 id="optimizer-lr"),
    pytest.param("step", r"optimizer\.pt: parameter 0 has taken 1000 steps, the checkpoint 4", id="optimizer-step"),
    pytest.param("base_lrs", r"scheduler\.pt: base learning rates \[5\.0, 5\.0\], the run's lr is 0\.01",
                 id="scheduler-base-lrs"),
])
def test_a_checkpoint_whose_optimizer_was_tampered_with_is_refused(saved_tiny, tmp_path, damage, message):
    cfg = dict(output_dir=str(tmp_path), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2, save_every=4,
               progress=False)
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg))
    ckpt = tmp_path / "checkpoint-4"
    name = "scheduler.pt" if damage == "base_lrs" else "optimizer.pt"
    state = torch.load(ckpt / name, weights_only=True)
    if damage == "lr":
        for group in state["param_groups"]:
            group["lr"] = group["initial_lr"] = 100.0
    elif damage == "step":
        state["state"][0]["step"] = torch.tensor(1000.0)
    else:
        state["base_lrs"] = [5.0, 5.0]
    torch.save(state, ckpt / name)
    with pytest.raises(CheckpointError, match=message):
        train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg, resume_from_checkpoint="latest"))


def test_a_partial_last_metrics_line_never_breaks_a_resume(saved_tiny, tmp_path):
    import shutil
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    shutil.rmtree(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed during step 5 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 2.5, "lo')  # ... in the middle of writing its line
    resumed = train(lora_model(saved_tiny), Tok, examples(8), None,
                    quick(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2")))
    assert not resumed.stopped_early
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# A full disk or a folder that cannot be written: the path, and nothing saved is lost

def test_an_output_folder_that_cannot_be_created_is_named(saved_tiny, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"file/run: cannot create this folder \(Not a directory\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "file" / "run"))


def test_a_full_disk_while_logging_metrics_names_the_file(saved_tiny, tmp_path, monkeypatch):
    import builtins
    real_open = builtins.open

    def full(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: No space left on device while writing the metrics log"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))


# ---------------------------------------------------------------------------------------------
# A bad update: never saved, the step named

def test_float16_lora_weights_whose_first_update_is_nan_stop_the_run_naming_the_step_and_save_nothing(
        saved_tiny, tmp_path):
    """model.half() after apply_lora: AdamW's eps is 0 in float16, so lora_A (whose gradient is 0 while
    lora_B is 0) becomes 0/0 = NaN at step 1. The run stops there, naming the step and the cause; no
    adapter/ is written (it used to hold NaN, found only by a later load_adapter)."""
    model = lora_model(saved_tiny).half()
    with pytest.raises(TrainingError, match=r"step 1: its update made LoRA weights NaN or infinite \(lr=0\.01\); "
                       r"training stopped, nothing of this step saved\. The trainable weights are float16.*"
                       r"The last good checkpoint is none \(nothing was saved yet\)"):
        train(model, Tok, examples(8), None, quick(tmp_path, max_steps=1))
    assert not (tmp_path / "adapter").exists() and not checkpoint_folders(tmp_path)


def test_a_nan_update_after_a_checkpoint_names_that_checkpoint_and_leaves_it_unchanged(saved_tiny, tmp_path,
                                                                                       monkeypatch):
    real_step, calls, kept = torch.optim.AdamW.step, [], {}

    def poisoned(self, *a, **k):  # the third step's update turns one weight into NaN
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            kept.update(digests(tmp_path / "checkpoint-2"))
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: its update made LoRA weights NaN or infinite.*The last "
                       r"good checkpoint is .*checkpoint-2"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, max_steps=4, save_every=2))
    assert kept and digests(tmp_path / "checkpoint-2") == kept and not (tmp_path / "checkpoint-4").exists()
    assert not (tmp_path / "adapter").exists()


def test_save_adapter_refuses_nan_weights_by_name_and_keeps_the_saved_adapter(saved_tiny, tmp_path):
    from minilora.lora.peft_files import save_adapter
    model = lora_model(saved_tiny)
    save_adapter(model, tmp_path / "adapter")
    kept = digests(tmp_path / "adapter")
    layer = next(m for m in model.modules() if hasattr(m, "adapters"))
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"\.lora_B\.weight holds NaN or infinite values: the adapter is not saved"):
        save_adapter(model, tmp_path / "adapter")
    assert digests(tmp_path / "adapter") == kept


def test_a_diverging_loss_is_a_warning_naming_the_step_and_the_lr(saved_tiny, tmp_path):
    """A loss that climbs step after step (here a loss_fn that scales the language-model loss up by 50%
    a step) is said once, when its ten-step average passes twice the first step's loss and one nat."""
    from minilora.training.objectives.causal_lm import causal_lm_loss
    calls = []

    def climbing(model, batch):
        calls.append(1)
        loss, n = causal_lm_loss(model, batch)
        return loss * 1.5 ** (len(calls) // 2), n  # two micro-batches a step
    with pytest.warns(UserWarning, match=r"step \d+: the loss \(.*\) is more than twice the first step's .*: the run "
                      r"is diverging; lower lr \(now 0.01\) or set max_grad_norm") as seen:
        result = train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, max_steps=12, save_every=None),
                       loss_fn=climbing)
    assert len([w for w in seen if "diverging" in str(w.message)]) == 1
    step = int(str(next(w for w in seen if "diverging" in str(w.message)).message).split(":")[0].split()[1])
    losses, smoothed = [r["loss"] for r in result.history], None
    for i, loss in enumerate(losses, 1):  # the warning's step, recomputed from the logged losses
        smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
        if i > 1 and smoothed > 2 * losses[0] + 1:
            assert step == i
            break
    else:
        pytest.fail("the logged losses never crossed the threshold")


def test_a_steady_run_gives_no_divergence_warning(saved_tiny, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, max_steps=8, save_every=None))


# ---------------------------------------------------------------------------------------------
# train() on what it cannot train

class NoMask(torch.nn.Module):
    """A user's own language model whose forward takes the ids alone."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 100)

    def forward(self, input_ids):
        return self.lm_head(torch.tanh(self.proj(self.embed(input_ids))))


def test_a_user_module_whose_forward_takes_no_mask_is_named_before_any_step(tmp_path):
    model = apply_lora(NoMask(), ["proj"], r=2)
    with pytest.raises(ConfigError, match=r"NoMask\.forward\(input_ids\) takes no attention_mask, which training "
                       r"passes \(model\(input_ids, attention_mask=mask\)"):
        train(model, Tok, examples(8), None, quick(tmp_path))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())

    def own_loss(m, batch):  # a loss_fn of one's own calls the model as it likes: then it trains
        from torch.nn.functional import cross_entropy
        logits = m(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        return cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"), \
            int((labels != -100).sum())
    result = train(model, Tok, examples(8), None, quick(tmp_path, save_every=None), loss_fn=own_loss)
    assert len(result.history) == 4 and (tmp_path / "adapter").is_dir()


def test_train_inside_adapter_disabled_is_named_before_any_step(saved_tiny, tmp_path):
    from minilora.lora.inject import adapter_disabled
    model = lora_model(saved_tiny)
    with adapter_disabled(model):
        with pytest.raises(ConfigError, match=r"train\(\) inside adapter_disabled\(model\): the LoRA layers are "
                           r"switched off, so nothing would train"):
            train(model, Tok, examples(8), None, quick(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("returns, message", [
    pytest.param(lambda loss, n: (float(loss), n), r"loss_fn 'bad' returned a float as its loss; expected the summed "
                 r"loss as a one-element tensor that keeps its graph \(do not call \.item\(\) or detach it\)",
                 id="a-float-loss"),
    pytest.param(lambda loss, n: (loss.detach(), n), r"loss_fn 'bad' returned a tensor with no graph", id="detached"),
    pytest.param(lambda loss, n: (loss.expand(3), n), r"loss_fn 'bad' returned a tensor of shape \(3,\)",
                 id="not-a-scalar"),
    pytest.param(lambda loss, n: (loss, float(n)), r"loss_fn 'bad' returned the count \d+\.0; expected a "
                 r"non-negative int", id="a-float-count"),
])
def test_a_loss_fn_returning_the_wrong_things_is_named_at_the_first_step(saved_tiny, tmp_path, returns, message):
    from minilora.training.objectives.causal_lm import causal_lm_loss

    def bad(model, batch):
        return returns(*causal_lm_loss(model, batch))
    with pytest.raises(ConfigError, match=message):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path), loss_fn=bad)
    assert not (tmp_path / "adapter").exists()
