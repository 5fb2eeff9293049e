"""Fault trials: training killed with SIGKILL at random moments (mid-step, mid-checkpoint), resumed
from the latest checkpoint each time, finishes with the adapter an uninterrupted run produces; the
latest checkpoint is never a half-written one."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from minilora.training.checkpoint import checkpoint_folders
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # 20 trials of training processes killed and resumed

TRAIN = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import Tok, examples
    from minilora.training.checkpoint import checkpoint_folders
    from minilora.lora.inject import apply_lora
    from minilora.training.loop import TrainConfig, train
    from minilora.loading.weights import load_model
    torch.manual_seed(0)
    model = apply_lora(load_model({model!r}), "all-linear", r=4, alpha=8, dropout=0.1)
    out = {out!r}
    cfg = TrainConfig(output_dir=out, max_steps=30, micro_batch_size=2, batch_size=4, lr=5e-3, save_every=1,
                      keep_last=2, progress=False, resume_from_checkpoint="latest" if checkpoint_folders(out) else None)
    train(model, Tok, examples(24), None, cfg)
""")


def steps_logged(out) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    except FileNotFoundError:
        return 0


def run(model, out, kill_at=None, rng=None):
    """Train to the end; or SIGKILL the run once it has logged step `kill_at` (plus a random few ms, to
    land inside the next step or the checkpoint being written; 0 = during start-up). True if finished."""
    code = TRAIN.format(tests=os.path.dirname(__file__), model=str(model), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_at is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return True
    deadline = time.monotonic() + (rng.uniform(0.2, 1.0) if kill_at == 0 else 300)
    while proc.poll() is None and time.monotonic() < deadline and (kill_at == 0 or steps_logged(out) < kill_at):
        time.sleep(0.002)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        return True
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return False


def check_latest_is_whole(out):
    found = checkpoint_folders(out)
    if found:
        latest = found[-1]
        assert {p.name for p in latest.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                      "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
        load_file(str(latest / "adapter_model.safetensors"))
        torch.load(latest / "optimizer.pt", weights_only=True)
        assert json.loads((latest / "trainer_state.json").read_text())["step"] == int(latest.name.split("-")[1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_trials_resume_to_the_uninterrupted_adapter(saved_tiny, tmp_path):
    model = saved_tiny["llama-gqa"][1]
    run(model, tmp_path / "reference")
    reference = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    rng = random.Random(0)
    kills = 0
    for trial in range(12):
        out = tmp_path / f"trial{trial}"
        # a SIGKILL at a random step (0: during start-up), a second one in the resumed run on odd trials
        for attempt in range(1 + trial % 2):
            done = steps_logged(out)
            if run(model, out, kill_at=rng.randint(done, 29) if done < 29 else None, rng=rng):
                break
            kills += 1
            check_latest_is_whole(out)
        run(model, out)
        got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert got.keys() == reference.keys()
        for k in reference:
            assert (got[k] - reference[k]).abs().max().item() <= 1e-6, (trial, k)
    assert kills >= 12, kills  # the trials really were interrupted
    print(f"{kills} SIGKILLs over 12 trials; every run resumed to the reference adapter")
