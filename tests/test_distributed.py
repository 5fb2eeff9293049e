"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process, same global batch."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_recipe
from minilora.cli import main
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def torchrun(recipe, *overrides, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "minilora", "train", str(recipe), "--model.device", "cpu", *overrides]  # gloo, even beside a GPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run):
    return load_file(run / "adapter_model.safetensors")


@pytest.fixture
def recipe(saved_tiny, tmp_path):
    path, _ = write_recipe(saved_tiny, tmp_path, **{
        "max_steps = 4": "max_steps = 6\neval_every = 2", "micro_batch_size = 2": "micro_batch_size = 3",
        "batch_size = 4": "batch_size = 9"})
    # quotes of 1 to 9 words: micro-batches hold different numbers of target tokens, so an average of
    # per-rank means would differ from the token-weighted mean of the whole batch
    rows = [{"author": f"w{2 + i % 5}", "quote": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(1 + i % 9))}
            for i in range(31)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_processes_follow_the_one_process_loss_curve(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), "--model.device", "cpu", "--train.output_dir", str(tmp_path / "one")]) == 0
    out = torchrun(recipe, "--train.output_dir", str(tmp_path / "two"))
    assert out.count("adapter saved to") == 1 and out.count("trainable params") == 1  # rank 0 alone speaks
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2, 3, 3, 4, 4, 5, 6, 6]  # each logged once
    for a, b in zip(one, two):
        assert set(a) == set(b) and a.get("tokens") == b.get("tokens")
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a, b)
    evals = [r["eval_loss"] for r in one if "eval_loss" in r]
    assert evals[-1] < evals[0]  # it learns
    wa, wb = adapter(tmp_path / "one" / "adapter"), adapter(tmp_path / "two" / "adapter")
    assert wa.keys() == wb.keys()
    # Same weights up to rounding, measured against what training moved (B starts at zero, so |B| is the
    # update). Not element by element: Adam divides each gradient by its own running size, so a component
    # whose gradient is rounding noise (~1e-9) moves by ~lr either way on another machine's kernels.
    # A rank's gradient left out of the average differs by a sizeable fraction of the update.
    moved = sum(float(wa[k].norm()) ** 2 for k in wa if "lora_B" in k) ** 0.5
    apart = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa) ** 0.5
    assert apart <= 1e-3 * moved, (apart, moved)
    import importlib.util
    png = ["loss.png"] if importlib.util.find_spec("matplotlib") else []  # rank 0's files, once each
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        [".minilora.lock", "adapter", "checkpoint-2", "checkpoint-4", "checkpoint-6", *png, "loss.svg", "metrics.jsonl"]
    assert "ranks" in torch.load(tmp_path / "two" / "checkpoint-4" / "rng.pt", weights_only=True)


def test_resume_under_the_same_number_of_processes(recipe, tmp_path):
    dropout = ["--lora.dropout", "0.2"]  # each rank's dropout RNG must come back on resume
    torchrun(recipe, *dropout, "--train.output_dir", str(tmp_path / "full"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", resumed / "checkpoint-4")
    torchrun(recipe, *dropout, "--train.output_dir", str(resumed), "--train.resume_from_checkpoint", "latest")
    full, again = adapter(tmp_path / "full" / "adapter"), adapter(resumed / "adapter")
    assert all(torch.allclose(full[k], again[k], atol=1e-6, rtol=0) for k in full)
    assert [r["step"] for r in metrics(resumed)] == [5, 6, 6]
    # one process cannot continue a two-process run's RNG streams: refused, naming the setting
    assert main(["train", str(recipe), *dropout, "--train.output_dir", str(resumed),
                 "--train.resume_from_checkpoint", str(resumed / "checkpoint-4")]) == 2
