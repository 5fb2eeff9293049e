"""FSDP2 LoRA training (fsdp = true) under torchrun: 2 and 4 CPU processes (gloo), and two "nodes" on one
machine, against one process running the same global batch; resume; what is refused, by name."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import Tok, digests, examples, lora_model, write_recipe
from minilora.cli import main
from minilora.errors import ConfigError
from minilora.training import fsdp
from minilora.training.loop import TrainConfig, train
from minilora.training.objectives import DPO, CausalLM
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

FSDP = ["--model.device", "cpu", "--train.fsdp", "true"]  # gloo, even beside a GPU


def torchrun(recipe, *overrides, n=2, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "minilora", "train", str(recipe), *FSDP, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run):
    return load_file(run / "adapter_model.safetensors")


def biggest_gaps(one, other):
    """(max |loss - loss'| over every logged number, max |w - w'| over every adapter tensor)."""
    a, b = metrics(one), metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r.get("tokens") for r in a] == \
        [r.get("tokens") for r in b]
    losses = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm", "eval_loss") if k in x)
    wa, wb = adapter(one / "adapter"), adapter(other / "adapter")
    assert wa.keys() == wb.keys() and len(wa) > 0
    return losses, max(float((wa[k] - wb[k]).abs().max()) for k in wa)


class Runs:
    """The runs the tests compare, each made once, when a test first asks for it."""

    def __init__(self, saved_tiny, root):
        self.root, self.done = root, {}
        self.recipes = {"llama": self._recipe(saved_tiny, root / "llama", None),
                        "gpt2": self._recipe(saved_tiny, root / "gpt2", saved_tiny["gpt2"][1])}

    @staticmethod
    def _recipe(saved_tiny, folder, base):
        folder.mkdir()
        # quotes of 1 to 9 words: micro-batches hold different numbers of target tokens; 3 micro-batches a
        # step over 2 or 4 ranks (some ranks run a stand-in), 5 held out (the evaluation is padded)
        path, model = write_recipe(saved_tiny, folder, **{
            "max_steps = 4": "max_steps = 6\neval_every = 2", "micro_batch_size = 2": "micro_batch_size = 3",
            "batch_size = 4": "batch_size = 9", "val_size = 4": "val_size = 5"})
        rows = [{"author": f"w{2 + i % 5}", "quote": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(1 + i % 9))}
                for i in range(31)]
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if base is not None:  # GPT-2's weights beside the same word-level tokenizer; LoRA on its fused qkv
            for f in base.iterdir():
                shutil.copy(f, model / f.name)
            config = json.loads((model / "config.json").read_text())  # no dropout: ranks draw other masks
            (model / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.0, "embd_pdrop": 0.0,
                                                           "resid_pdrop": 0.0}))
            path.write_text(path.read_text().replace('targets = ["q_proj", "v_proj"]', 'targets = ["c_attn"]'))
        return path

    def __call__(self, name):
        """"llama-1" (one process, no FSDP), "llama-2" and "llama-4" (FSDP over 2 or 4), "gpt2-1", ..."""
        if name not in self.done:
            model, n = name.rsplit("-", 1)
            out = self.root / name
            if n == "1":
                assert main(["train", str(self.recipes[model]), "--model.device", "cpu",
                             "--train.output_dir", str(out)]) == 0
            else:
                self.done[name + ":output"] = torchrun(self.recipes[model], "--train.output_dir", str(out), n=int(n))
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="module")
def runs(saved_tiny, tmp_path_factory):
    return Runs(saved_tiny, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name", ["llama-2", pytest.param("llama-4", marks=pytest.mark.slow), "gpt2-2"])
def test_fsdp_follows_the_one_process_run(runs, name):
    losses, weights = biggest_gaps(runs(name.split("-")[0] + "-1"), runs(name))
    print(f"{name}: losses {losses:.2e}, adapter {weights:.2e}")
    assert losses <= 1e-5 and weights <= 1e-5, (losses, weights)
    out, n = runs.done[name + ":output"], int(name[-1])
    assert out.count("adapter saved to") == 1 and out.count("trainable params") == 1  # rank 0 alone speaks
    assert "with the adapter" in out  # rank 0 generated alone after the run: the model was left whole
    saved = sorted(p.name for p in (runs(name) / "checkpoint-4").iterdir() if p.name.startswith("optimizer"))
    assert saved == [f"optimizer-rank{r}.pt" for r in range(n)]  # each rank's slice of the optimizer


def test_resume_under_the_same_number_of_processes_continues_the_run(runs):
    full = runs("llama-2")
    resumed = runs.root / "llama-2-resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    torchrun(runs.recipes["llama"], "--train.output_dir", str(resumed), "--train.resume_from_checkpoint", "latest")
    a, b = adapter(full / "adapter"), adapter(resumed / "adapter")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [r["step"] for r in metrics(resumed)] == [5, 6, 6]
    for x, y in zip(metrics(resumed), metrics(full)[-3:]):  # the same curve, logged as one run
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-6 for k in ("loss", "eval_loss") if k in x)


def test_resume_under_another_number_of_processes_is_refused_by_name(runs, capsys):
    there = runs.root / "llama-2-elsewhere"
    there.mkdir()
    shutil.copytree(runs("llama-2") / "checkpoint-4", there / "checkpoint-4")
    before = digests(there)
    out = torchrun(runs.recipes["llama"], "--train.output_dir", str(there), "--train.resume_from_checkpoint", "latest",
                   n=4, ok=False)
    assert f"{there / 'checkpoint-4' / 'trainer_state.json'}: written by an FSDP run of 2 processes, but this " \
           "run has 4" in out
    assert digests(there) == before  # nothing overwritten
    assert main(["train", str(runs.recipes["llama"]), "--model.device", "cpu", "--train.output_dir", str(there),
                 "--train.resume_from_checkpoint", "latest"]) == 2  # one process, no FSDP
    assert "written by an FSDP run (one optimizer slice per rank), but this run has fsdp = false" in \
        capsys.readouterr().err
    assert digests(there) == before


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_follow_the_one_process_run(runs):
    out, port = runs.root / "llama-nodes", free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               f"127.0.0.1:{port}", "-m", "minilora", "train", str(runs.recipes["llama"]), *FSDP,
                               "--train.output_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    losses, weights = biggest_gaps(runs("llama-1"), out)
    print(f"two nodes: losses {losses:.2e}, adapter {weights:.2e}")
    assert losses <= 1e-5 and weights <= 1e-5


def test_fsdp_without_torchrun_is_refused_by_name(runs, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"one process \(WORLD_SIZE is unset\): launch it with torchrun"):
        TrainConfig(fsdp=True)
    assert main(["train", str(runs.recipes["llama"]), *FSDP]) == 2  # before the model loads
    assert "fsdp = true shards the model over several processes" in capsys.readouterr().err


def test_what_fsdp_cannot_train_is_refused_by_name(saved_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variable, but no process group (a script that forgot it)
    cfg = TrainConfig(output_dir=str(tmp_path), fsdp=True, progress=False)
    model = lora_model(saved_tiny)
    with pytest.raises(ConfigError, match="no process group of several ranks: launch with torchrun"):
        train(model, Tok, examples(4), None, cfg)
    assert not (tmp_path / "metrics.jsonl").exists()
    refused = {"has no transformer blocks to shard": (nn.Sequential(nn.Linear(2, 2)), cfg, CausalLM()),
               "fsdp = true with optim \"lorafa\"": (model, TrainConfig(fsdp=True, optim="lorafa"), CausalLM()),
               "not DPO: its reference passes and rollouts": (model, cfg, DPO())}
    for message, args in refused.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            fsdp.refuse_what_cannot_shard(*args)
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    quantized = load_model(saved_tiny["llama-gqa"][1], load_in_8bit=True)
    apply_lora(quantized, ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(ConfigError, match="fsdp = true with a quantized base"):
        fsdp.refuse_what_cannot_shard(quantized, cfg, CausalLM())


def test_blocks_are_the_ones_run_blocks_runs(saved_tiny):
    for kind, where in (("llama-gqa", "model.layers"), ("gpt2", "transformer.h")):
        model = lora_model(saved_tiny, kind)
        names = {id(m): n for n, m in model.named_modules()}
        assert [names[id(b)] for b in fsdp.blocks(model)] == [f"{where}.0", f"{where}.1"]
