"""GRPO as a TrainConfig objective (objective = "grpo"): a recipe with reward functions beside it trains
the tiny Llama to raise its reward, logs TRL's metrics and the time split, plots the reward; a stopped
run resumes to the uninterrupted adapter (a step's samples follow from (seed, step, rank)); under
torchrun each rank samples its own prompts' groups and the run equals the one-process run; over int8
and NF4 bases the loss and gradients are those of the dequantized weights. Every figure is checked
against its definition (the TRL oracle of the loss and gradients is test_grpo.py)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import lora_model, tiny_model_with_tokenizer
from minilora.cli import main
from minilora.data.prompts import build_prompts
from minilora.generate import grpo_objective
from minilora.loading.tokenizer import load_tokenizer
from minilora.training.loop import TrainConfig, train
from safetensors.torch import load_file

# the reward: the share of a completion's words among w2..w49 (about half of a random model's), which
# a policy can learn to raise; the words of the prompt column "bonus" score double
REWARDS = textwrap.dedent('''
    def low_words(prompts, completions, bonus, **kw):
        out = []
        for c, b in zip(completions, bonus):
            words = c.split()
            low = [w for w in words if w[1:].isdigit() and int(w[1:]) < 50]  # [UNK] is no word
            out.append(sum(2.0 if w == b else 1.0 for w in low) / max(len(words), 1))
        return out
''')
PROMPTS = [{"prompt": " ".join(f"w{(i * 11 + j) % 90 + 5}" for j in range(1 + i % 3)), "bonus": f"w{2 + i % 7}"}
           for i in range(24)]


def write_grpo_recipe(saved_tiny, tmp_path, extra: str = "", data=PROMPTS):
    model = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:6]))
    (tmp_path / "r.toml").write_text(textwrap.dedent(f"""
        [model]
        name = "{model}"
        [lora]
        targets = "all-linear"
        r = 8
        alpha = 16
        [data]
        train = "prompts.jsonl"
        test = "test.jsonl"
        val_size = 4
        [train]
        output_dir = "{tmp_path / 'run'}"
        objective = "grpo"
        reward_funcs = ["rewards:low_words"]
        num_generations = 4
        max_completion_length = 6
        micro_batch_size = 4
        batch_size = 8
        max_steps = 12
        eval_every = 6
        lr = 3e-2
        beta = 0.04
        save_every = 6
        progress = false
        {extra}
    """))
    return tmp_path / "r.toml"


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_grpo_recipe_trains_on_prompts_and_logs_trls_metrics(saved_tiny, tmp_path, capsys):
    recipe = write_grpo_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe), "--model.device", "cpu", "--train.eval_at_start", "true"]) == 0
    out = capsys.readouterr().out
    history = records(tmp_path / "run")
    steps = [r for r in history if "loss" in r]
    assert len(steps) == 12
    names = {"reward", "reward_std", "rewards/low_words/mean", "rewards/low_words/std", "frac_reward_zero_std",
             "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "time/generation", "time/training"}
    assert all(names <= set(r) for r in steps)
    for r in steps:
        assert r["reward"] == pytest.approx(r["rewards/low_words/mean"])  # one function, weight 1
        assert 1 <= r["completions/mean_length"] <= 6 and 0 <= r["completions/clipped_ratio"] <= 1
        assert r["time/generation"] > 0 and r["time/training"] > 0
        assert r["clip_ratio/region_mean"] == 0.0  # one iteration per generation: the ratio is 1
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7) and steps[-1]["kl"] > 0  # the adapter starts as the base
    evals = [r for r in history if "eval_reward" in r]  # greedy, held out; 20 prompts / 2 a step: an epoch is 10
    assert [r["step"] for r in evals] == [0, 6, 10, 12] and all(r["eval_reward"] == r["eval_rewards/low_words/mean"]
                                                            for r in evals)
    assert "reward" in (tmp_path / "run" / "loss.svg").read_text().split("</text>")[0]  # the curve drawn is the reward
    tested = [line for line in out.splitlines() if line.startswith("held-out test set (6 prompts)")]
    assert [line.split(",")[1].split(":")[0].strip() for line in tested] == ["before", "after"]
    assert "training on 20 prompts, evaluating on 4" in out


def test_grpo_raises_the_policys_expected_reward(saved_tiny, tmp_path):
    """One-token completions, so that the policy's expected reward is exact: the sum over the
    vocabulary of π(v | prompt) · r(v). Twenty steps of GRPO raise it for the training prompts."""
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    tok = load_tokenizer(folder)
    prompts = build_prompts(PROMPTS, tok)
    good = torch.tensor([1.0 if 2 <= i < 50 else 0.0 for i in range(97)])

    def low_id(prompts, completions, completion_ids, **kw):
        return [float(good[c[0]]) for c in completion_ids]

    def expected_reward(model):
        with torch.no_grad():
            return sum(float(model(torch.tensor([p.prompt_ids]))[0, -1].softmax(-1) @ good) for p in prompts) / 24
    model = lora_model(saved_tiny, std=0.0)
    before = expected_reward(model)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=20, micro_batch_size=8, batch_size=16, lr=1e-1,
                      progress=False, objective="grpo", reward_funcs=["low_id"], num_generations=8,
                      max_completion_length=1, eval_each_epoch=False)
    train(model, tok, prompts, None, cfg, objective=grpo_objective(tok, cfg, [low_id]))
    assert expected_reward(model) > before + 0.05


def test_a_stopped_grpo_run_resumes_to_the_uninterrupted_adapter(saved_tiny, tmp_path):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(tmp_path))
    try:
        tok = load_tokenizer(folder)
        prompts = build_prompts(PROMPTS, tok)

        def run(out, should_stop=None, **kw):
            cfg = TrainConfig(output_dir=str(out), max_steps=4, micro_batch_size=4, batch_size=8, lr=1e-2,
                              progress=False, objective="grpo", reward_funcs=["rewards:low_words"], num_generations=4,
                              max_completion_length=5, beta=0.1, save_every=2, eval_each_epoch=False, **kw)
            return train(lora_model(saved_tiny), tok, prompts, None, cfg, should_stop=should_stop,
                         objective=grpo_objective(tok, cfg))
        whole = run(tmp_path / "whole")
        steps = iter(range(100))
        first = run(tmp_path / "cut", should_stop=lambda: next(steps) == 1)
        assert first.stopped_early and (tmp_path / "cut" / "checkpoint-2").is_dir()
        resumed = run(tmp_path / "cut", resume_from_checkpoint="latest")
    finally:
        sys.path.remove(str(tmp_path))
    for key in ("loss", "reward", "kl"):
        assert [r[key] for r in first.history + resumed.history] == pytest.approx([r[key] for r in whole.history],
                                                                                  abs=1e-6)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in a)


# A sampler that does not depend on the batch it is called with: each completion a function of its
# prompt and its place in the group, so that 1 process and 2 ranks score the same completions and
# the runs must agree (the advantages' batch std, the token counts and the gradients summed across ranks)
DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import hf_model
    from minilora.data.prompts import build_prompts
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.training import distributed
    from minilora.training.loop import TrainConfig, train
    from minilora.training.objectives.grpo import GRPO

    def sampler(model, prompts, eos, pad, n, temperature, top_k, top_p, seed=None, keep_eos=True):
        out = []
        for i, p in enumerate(prompts):
            k = i % {G}
            length = 1 + (sum(p) + 3 * k) % n
            ids = [2 + (sum(p) * 7 + k * 13 + j * 5) % 90 for j in range(length)]
            out.append(ids[:-1] + [1] if (sum(p) + k) % 3 else ids)  # some end with <eos>, some are cut
        return out

    def reward(prompts, completions, **kw):
        return [float(len(c.split())) + 0.1 * sum(int(w[1:]) % 5 for w in c.split() if w[1:].isdigit())
                for c in completions]

    distributed.init_from_env(torch.device("cpu"))
    tok = load_tokenizer({folder!r})
    torch.manual_seed(0)
    model = load_model({folder!r})
    apply_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = build_prompts(json.load(open({data!r})), tok)
    cfg = TrainConfig(output_dir=sys.argv[1], max_steps=3, micro_batch_size=3, batch_size=12, lr=1e-2,
                      progress=False, objective="grpo", reward_funcs=["reward"], num_generations={G},
                      max_completion_length=5, beta=0.05, scale_rewards="batch", loss_type=sys.argv[2],
                      eval_each_epoch=False)
    objective = GRPO(tok, [reward], sampler, num_generations={G}, max_completion_length=5, beta=0.05,
                     scale_rewards="batch", loss_type=sys.argv[2])
    train(model, tok, prompts, None, cfg, objective=objective)
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("loss_type", ["dapo"])
def test_two_process_grpo_follows_the_one_process_run(saved_tiny, tmp_path, loss_type):
    from pathlib import Path
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    script = tmp_path / "grpo_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(folder),
                                        data=str(tmp_path / "prompts.json"), G=4))
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = [sys.executable, str(script), str(out), loss_type] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
             str(out), loss_type]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[n] = out
    one, two = records(runs[1]), records(runs[2])
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        # kl is a mean over the loss's count: tokens with dapo (so any split agrees), completions with grpo
        # (each micro-batch's token mean, weighted by its completions, which the split changes)
        for key in ("loss", "grad_norm", "reward", "reward_std", "completions/mean_length",
                    "completions/clipped_ratio", "frac_reward_zero_std", *(("kl",) if loss_type == "dapo" else ())):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    wa = load_file(runs[1] / "adapter" / "adapter_model.safetensors")
    wb = load_file(runs[2] / "adapter" / "adapter_model.safetensors")
    moved = sum(float(wa[k].norm()) ** 2 for k in wa if "lora_B" in k) ** 0.5
    apart = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa) ** 0.5
    assert apart <= 1e-3 * moved, (apart, moved)


@pytest.mark.parametrize("base", ["int8", "nf4", "gguf"])
def test_grpo_on_a_quantized_base_is_grpo_on_its_dequantized_weights(saved_tiny, tmp_path, base):
    """Fixed completions and advantages (a Rollout), beta > 0 so that the reference (the adapter off) is
    read too: the loss, the KL and the LoRA gradients on the quantized base equal those on the float
    model holding its dequantized weights (rounding for NF4 and GGML blocks; int8's 8-bit activations
    and gradients within its ~1% and 3%, as tests/test_preference_bases.py states). Then a step's
    rollouts sample on the quantized base."""
    from test_preference_bases import TOL, lora_grads, quantized_and_float, rel

    from minilora.training.objectives.grpo import GRPO, Rollout
    quantized, float_model = quantized_and_float(saved_tiny, tmp_path, base)
    tok = load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path))
    objective = GRPO(tok, [lambda prompts, completions, **kw: [1.0] * len(completions)],
                     lambda *a, **k: [], num_generations=2, max_completion_length=4, beta=0.1, loss_type="dapo")
    prompts, completions = [[5, 6, 7], [5, 6, 7], [3], [3]], [[8, 9, 1], [10, 11, 12, 13], [20, 1], [30, 31, 32, 1]]
    rollout = Rollout(prompts, completions, [""] * 4, [""] * 4, [False, True, False, False], torch.zeros(4, 1),
                      torch.zeros(4), torch.tensor([1.2, -0.7, 0.4, -0.9]))
    results = {}
    for name, model in (("q", quantized), ("f", float_model)):
        loss, count, metrics = objective.loss(model, rollout)
        (loss / count).backward()
        results[name] = (float(loss / count), metrics["kl"] / count, lora_grads(model))
    (lq, kq, gq), (lf, kf, gf) = results["q"], results["f"]
    # the KL (k3, about d^2/2 of the log-ratio d = log π_ref - log πθ, here ~0.07) is small beside the log-probs it
    # is made of, whose int8 errors it inherits: int8's bound for it is that of the gradients
    assert abs(lq - lf) <= TOL[base] * abs(lf) + 1e-7
    assert abs(kq - kf) <= (3e-2 if base == "int8" else TOL[base]) * abs(kf) + 1e-9
    total = rel(torch.cat([g.flatten() for g in gq.values()]), torch.cat([gf[k].flatten() for k in gq]))
    assert gq.keys() == gf.keys() and len(gq) == 2 * 14 and total <= (3e-2 if base == "int8" else TOL[base])
    sampling = grpo_objective(tok, TrainConfig(output_dir=str(tmp_path / "x"), objective="grpo", batch_size=4,
                                               micro_batch_size=4, reward_funcs=["x"], num_generations=2,
                                               max_completion_length=3), objective.reward_funcs)
    parts, metrics = sampling.rollouts(quantized, build_prompts(PROMPTS[:2], tok), 4, step=0)
    assert len(parts) == 1 and len(parts[0].completion_ids) == 4 and metrics["reward"] == 1.0
