"""DPO over quantized bases, and data-parallel DPO.

A quantized base is a frozen W0 whose product is computed from its packed form; DPO on it must be DPO
on the weights it stands for. The oracle is the float model holding each base weight's dequantization
(and the same LoRA adapter): per-pair losses, rewards and metrics, and the LoRA gradients, equal its.
NF4 (load_in_4bit) and a GGUF kept in its blocks (keep_quantized) multiply by exactly the dequantized
weight, so they agree to rounding. int8 (LLM.int8()) also quantizes each row of the activations, and of
the upstream gradient in the backward pass, to 8 bits: its products are within about 1% of the float
ones (tests/test_quant.py), and so is what DPO computes from them; there the bound is that looser one.

Then a short train() on each base (ln 2 at step 0, the loss falls), and DPO under torchrun on two
processes following the one-process run, metric for metric.
"""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model_with_tokenizer

from minilora.data.batching import collate
from minilora.data.preferences import build_pairs
from minilora.loading.tokenizer import load_tokenizer
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.training.config import TrainConfig
from minilora.training.loop import train
from minilora.training.objectives import DPO

RECORDS = [{"prompt": "w5 w6 w7", "chosen": " w8 w9", "rejected": " w10 w11 w12"},
           {"prompt": "w3", "chosen": " w20", "rejected": " w30 w31"},
           {"prompt": "w40 w41 w42 w43", "chosen": " w44 w45 w46 w47 w48", "rejected": " w49"},
           {"prompt": "w60 w61", "chosen": " w62 w63 w64", "rejected": " w65 w66"}]
BASES = ["int8", "nf4", "gguf"]
# relative error allowed against the dequantized float model: rounding for NF4 and GGML blocks, which
# multiply by exactly the dequantized weight; 8-bit activations and gradients for int8 (see above)
TOL = {"int8": 1e-2, "nf4": 1e-5, "gguf": 1e-5}


@pytest.fixture
def pairs(saved_tiny, tmp_path):
    return build_pairs(RECORDS, load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path)))


def quantized_base(saved_tiny, tmp_path, base):
    """(the tiny Llama on `base`, where it came from): load_in_8bit, load_in_4bit, or a GGUF of it kept
    in its blocks (Q4_0, Q4_1, Q8_0 and F16 tensors: tests/test_gguf.py's write_gguf)."""
    hf, folder = saved_tiny["llama-gqa"]
    if base == "gguf":
        pytest.importorskip("gguf")
        from test_gguf import write_gguf
        write_gguf(hf, tmp_path / "tiny.gguf")
        return load_model(tmp_path / "tiny.gguf", keep_quantized=True), tmp_path / "tiny.gguf"
    if base == "nf4":
        pytest.importorskip("bitsandbytes")  # as tests/test_nf4.py: its oracle's package
    return load_model(folder, **{f"load_in_{8 if base == 'int8' else 4}bit": True}), folder


def with_lora(model, std):
    torch.manual_seed(0)
    apply_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return model


def quantized_and_float(saved_tiny, tmp_path, base, std=0.05):
    """(the quantized model with LoRA, a float model with each quantized weight replaced by its
    dequantization and the same LoRA weights)."""
    quantized, source = quantized_base(saved_tiny, tmp_path, base)
    float_model = load_model(source)  # a GGUF loads dequantized; int8 / nf4 weights are copied in below
    swapped = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "dequantize"):
                float_model.get_submodule(name).weight.copy_(module.dequantize())
                swapped += 1
    assert swapped >= 12  # int8 / nf4: the 14 linears of the blocks; GGUF: 10 of them, the embedding, the head
    with_lora(quantized, std)
    with_lora(float_model, std)
    ours = dict(quantized.named_parameters())
    with torch.no_grad():
        for n, p in float_model.named_parameters():
            if p.requires_grad:
                p.copy_(ours[n])
    return quantized, float_model


def per_pair(model, pairs, objective):
    """Per pair: [loss, *metrics] from one pair per batch."""
    out = []
    for p in pairs:
        loss, _, metrics = objective.loss(model, collate([p], 0))
        out.append([float(loss.detach()), *(metrics[m] for m in objective.metrics)])
    return torch.tensor(out, dtype=torch.float64)


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("base", BASES)
def test_dpo_on_a_quantized_base_is_dpo_on_its_dequantized_weights(saved_tiny, tmp_path, pairs, base):
    quantized, float_model = quantized_and_float(saved_tiny, tmp_path, base)
    objective = DPO(beta=0.3)
    q, f = per_pair(quantized, pairs, objective), per_pair(float_model, pairs, objective)
    names = ["loss", *objective.metrics]
    assert f[:, names.index("rewards/margins")].abs().min() > 1e-3  # the policy has moved: rewards are not 0
    worst = {}
    for i, name in enumerate(names):
        error = (q[:, i] - f[:, i]).abs()
        if base == "int8" and name.startswith("rewards/"):
            # A reward is β (log π - log π_ref), a difference of two log-probs each within int8's ~1%:
            # its error is bounded by 1% of β (|log π| + |log π_ref|), not by 1% of the (small) reward.
            bound = TOL[base] * objective.beta * (f[:, names.index("logps/chosen")].abs()
                                                  + f[:, names.index("logps/rejected")].abs())
            worst[name] = float((error / bound).max()) * TOL[base]
        else:
            worst[name] = rel(q[:, i], f[:, i]) if f[:, i].norm() else float(error.max())
        assert worst[name] <= TOL[base], (name, q[:, i], f[:, i])
    assert torch.equal(q[:, names.index("rewards/accuracies")], f[:, names.index("rewards/accuracies")])
    # the LoRA gradients of the whole batch's mean loss
    for model in (quantized, float_model):
        loss, n, _ = objective.loss(model, collate(pairs, 0))
        (loss / n).backward()
    gq, gf = lora_grads(quantized), lora_grads(float_model)
    assert gq.keys() == gf.keys() and len(gq) == 2 * 14
    grad_rel = max(rel(gq[k], gf[k]) for k in gq)
    total = rel(torch.cat([g.flatten() for g in gq.values()]), torch.cat([gf[k].flatten() for k in gq]))
    print(f"{base}: loss {worst['loss']:.1e}, rewards {worst['rewards/chosen']:.1e}/{worst['rewards/rejected']:.1e}, "
          f"margins {worst['rewards/margins']:.1e}, logps {worst['logps/chosen']:.1e}; LoRA grads: all "
          f"{total:.1e}, worst tensor {grad_rel:.1e}")
    # int8: the backward pass quantizes the upstream gradient too, one more 8-bit rounding (3%, and 6% for
    # the worst single tensor, a small one); NF4 and GGML: rounding
    assert total <= (3e-2 if base == "int8" else TOL[base])
    assert grad_rel <= (6e-2 if base == "int8" else TOL[base])


@pytest.mark.parametrize("base", BASES)
def test_dpo_training_on_a_quantized_base_lowers_the_loss(saved_tiny, tmp_path, base):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    pairs = build_pairs(RECORDS * 2, load_tokenizer(folder))
    model = with_lora(quantized_base(saved_tiny, tmp_path, base)[0], std=0.0)  # a fresh adapter: B = 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=6, micro_batch_size=2, batch_size=4, lr=2e-2,
                      progress=False, objective="dpo", eval_each_epoch=False)
    steps = [r["loss"] for r in train(model, None, pairs, None, cfg).history if "loss" in r]
    print(f"{base}: DPO losses {', '.join(f'{x:.4f}' for x in steps)}")
    assert steps[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 0
    assert steps[-1] < steps[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base never moved


# ---------------------------------------------------------------------------------------------
# Data-parallel DPO: 2 processes (gloo) against 1, the same global batch

RECIPE = """
[model]
name = "{model}"
[lora]
targets = ["q_proj", "v_proj"]
r = 4
alpha = 8
[data]
train = "{data}"
val_size = 4
[train]
objective = "dpo"
beta = 0.2
output_dir = "{out}"
max_steps = 4
micro_batch_size = 2
batch_size = 6
lr = 2e-2
eval_every = 2
eval_at_start = true
progress = false
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_process_dpo_follows_the_one_process_run(saved_tiny, tmp_path):
    from minilora.cli import main
    model = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    # completions of 1 to 6 words: ranks see different numbers of tokens; prompts of 1 to 4
    rows = [{"prompt": " ".join(f"w{(i * 5 + j) % 90 + 3}" for j in range(1 + i % 4)),
             "chosen": " " + " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(1 + i % 6)),
             "rejected": " " + " ".join(f"w{(i * 11 + j + 40) % 90 + 3}" for j in range(1 + (i + 3) % 5))}
            for i in range(22)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(RECIPE.format(model=model, data=tmp_path / "pairs.jsonl", out=tmp_path / "run"))
    assert main(["train", str(recipe), "--model.device", "cpu", "--train.output_dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minilora",
           "train", str(recipe), "--model.device", "cpu", "--train.output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 6
    worst = 0.0
    compared = set()
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float) and re.match(r"(eval_)?(loss|grad_norm|rewards/|logps/)", key):
                worst = max(worst, abs(value - b[key]))
                compared.add(key)
                assert abs(value - b[key]) <= 1e-5, (key, a, b)
    assert {"loss", "grad_norm", "rewards/margins", "rewards/accuracies", "eval_loss",
            "eval_rewards/accuracies"} <= compared
    losses = [r["loss"] for r in one if "loss" in r]
    print(f"DDP DPO: {len(compared)} metrics over {len(one)} records, worst difference {worst:.1e}; "
          f"losses {', '.join(f'{x:.5f}' for x in losses)}")
