"""GRPO against TRL (the oracle, a test-only dependency): the same tiny random Llama with the same LoRA
adapter in minilora and in peft, the same prompts, fixed sampled completions and fixed advantages fed
to both; the loss and the LoRA gradients equal GRPOTrainer._compute_loss's for each loss_type (fp32,
1e-5), with and without the KL term. Then advantages against TRL's formula, a rollout through the
objective, the built-in rewards and the named errors."""

import copy
import re

import pytest
import torch
from conftest import lora_model, tiny_model_with_tokenizer

from minilora.data.prompts import PromptRow
from minilora.generate import generate_ids
from minilora.errors import ConfigError, TrainingError
from minilora.loading.tokenizer import load_tokenizer
from minilora.lora.inject import adapter_disabled
from minilora.lora.peft_files import save_adapter
from minilora.training.objectives.grpo import GRPO, group_advantages, grpo_loss, token_logps
from minilora.training.rewards import (answer_format, exact_match, extract_answer, length_reward,
                                       load_reward_function, regex_format, score)

TOL = 1e-5
# two prompts of the same length (HF numbers a left-padded row's positions from the pad, we from the
# first real token), three completions each: some ended by <eos> (id 1), one cut at max_completion_length
PROMPTS = [[5, 6, 7], [40, 41, 42]]
G, L = 3, 5
COMPLETIONS = [[8, 9, 1], [10, 11, 12, 13, 14], [20, 1], [44, 45, 46, 1], [49, 1], [50, 51, 52, 1]]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25])
TEMPERATURE = 0.7


@pytest.fixture
def setup(saved_tiny, tmp_path):
    """(our LoRA model, the same adapter in peft, the HF tokenizer, our tokenizer)."""
    from peft import PeftModel
    from transformers import PreTrainedTokenizerFast
    pytest.importorskip("trl")
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    ours = lora_model(saved_tiny)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(saved_tiny["llama-gqa"][0]), tmp_path / "adapter",
                                       is_trainable=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<eos>",
                                     pad_token="[UNK]")
    return ours, theirs, hf_tok, load_tokenizer(folder), tmp_path


def lora_grads(model) -> dict[tuple, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\..*(lora_[AB])\.(?:default\.)?weight", n)
        if m and p.grad is not None:
            out[m.groups()] = p.grad
    return out


def grpo_trainer(theirs, hf_tok, tmp_path, **settings):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, num_generations=G,
                      per_device_train_batch_size=len(COMPLETIONS), max_completion_length=L,
                      temperature=TEMPERATURE, bf16=False, **settings)
    data = Dataset.from_list([{"prompt": "w5 w6 w7"}, {"prompt": "w40 w41 w42"}])
    trainer = GRPOTrainer(model=theirs, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=data, processing_class=hf_tok)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_inputs(trainer, model, advantages, beta):
    """The inputs dict _compute_loss takes: prompt left-padded, completion right-padded."""
    C = max(map(len, COMPLETIONS))
    prompt_ids = torch.tensor([p for p in PROMPTS for _ in range(G)])
    completion_ids = torch.zeros(len(COMPLETIONS), C, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, c in enumerate(COMPLETIONS):
        completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if beta:
        with torch.no_grad(), model.disable_adapter():
            ids = torch.cat([prompt_ids, completion_ids], 1)
            mask = torch.cat([inputs["prompt_mask"], completion_mask], 1)
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(model, ids, mask, C)[0]
    return inputs


@pytest.mark.parametrize("loss_type,beta,epsilon_high,correct", [
    ("grpo", 0.0, None, True), ("bnpo", 0.0, None, True), ("dr_grpo", 0.0, None, True), ("dapo", 0.0, 0.28, True),
    ("grpo", 0.04, None, True), ("dapo", 0.1, 0.28, True), ("bnpo", 0.1, None, False), ("dr_grpo", 0.1, None, False)])
def test_loss_and_lora_gradients_equal_trl(setup, loss_type, beta, epsilon_high, correct):
    ours, theirs, hf_tok, _, tmp_path = setup
    advantages = group_advantages(REWARDS, G, "group")
    prompt_ids = [p for p in PROMPTS for _ in range(G)]
    ref = None
    if beta:
        with torch.no_grad(), adapter_disabled(ours):
            ref = token_logps(ours, prompt_ids, COMPLETIONS, 0, TEMPERATURE)[0]
    logps, mask = token_logps(ours, prompt_ids, COMPLETIONS, 0, TEMPERATURE)
    loss, count, stats = grpo_loss(logps, logps.detach(), ref, advantages, mask, loss_type, 0.2, epsilon_high,
                                   beta, L, use_bias_correction_kl=correct)
    (loss / count).backward()

    trainer = grpo_trainer(theirs, hf_tok, tmp_path, loss_type=loss_type, beta=beta, epsilon_high=epsilon_high,
                           use_bias_correction_kl=correct)
    theirs.train()
    expected = trainer._compute_loss(theirs, trl_inputs(trainer, theirs, advantages, beta))
    expected.backward()
    assert abs(float(loss / count) - float(expected)) < TOL, (float(loss / count), float(expected))
    a, b = lora_grads(ours), lora_grads(theirs)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOL, worst
    print(f"{loss_type} beta={beta}: loss {float(loss / count):.6g} vs TRL {float(expected):.6g}, "
          f"worst LoRA grad diff {worst:.2e}")
    if beta:
        assert abs(float(stats["kl"]) - trainer._metrics["train"]["kl"][-1]) < TOL
    assert float(stats["clip_ratio/region_mean"]) == 0.0  # one iteration: the ratio is 1


def test_group_advantages_follow_trls_formula():
    from trl.trainer.utils import nanstd
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25, 3.0, 3.0, 3.0])
    mean = r.view(-1, 3).mean(1).repeat_interleave(3)
    group = (r - mean) / (nanstd(r.view(-1, 3), dim=1).repeat_interleave(3) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 3, "group"), group)
    torch.testing.assert_close(group_advantages(r, 3, "batch"), (r - mean) / (nanstd(r) + 1e-4))
    torch.testing.assert_close(group_advantages(r, 3, "none"), r - mean)
    torch.testing.assert_close(group_advantages(r, 3, True), group)
    assert group_advantages(r, 3)[6:].abs().max() == 0  # a group all alike teaches nothing
    with pytest.raises(ConfigError, match="scale_rewards 'mean'"):
        group_advantages(r, 3, "mean")


def test_loss_types_normalise_as_documented():
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])  # per-token loss -A: -1 on row 0's three tokens, +1 on row 1's one
    assert grpo_loss(logps, logps.detach(), None, adv, mask, "grpo")[:2] == (torch.tensor(0.0), 2)
    loss, n, _ = grpo_loss(logps, logps.detach(), None, adv, mask, "dapo")
    assert (float(loss), n) == (-2.0, 4)
    loss, n, _ = grpo_loss(logps, logps.detach(), None, adv, mask, "bnpo")
    assert (float(loss), n) == (-0.5, 1)
    loss, n, _ = grpo_loss(logps, logps.detach(), None, adv, mask, "dr_grpo", max_completion_length=8)
    assert (float(loss), n) == (-0.25, 2)
    with pytest.raises(ConfigError, match="loss_type 'ppo'"):
        grpo_loss(logps, logps.detach(), None, adv, mask, "ppo")


def test_clipping_counts_the_tokens_outside_the_trust_region():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.25]]))
    _, _, up = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.ones(1, 4), epsilon=0.2, epsilon_high=0.28)
    assert float(up["clip_ratio/high_mean"]) == 0.25 and float(up["clip_ratio/low_mean"]) == 0
    _, _, down = grpo_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 4), epsilon=0.2)
    assert float(down["clip_ratio/low_mean"]) == 0.25 and float(down["clip_ratio/region_mean"]) == 0.25


def word_count_reward(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]


def test_the_objective_samples_groups_scores_them_and_trains_the_adapter(saved_tiny, tmp_path):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    tok = load_tokenizer(folder)
    model = lora_model(saved_tiny)
    seen = {}

    def answer_seen(prompts, completions, answer, **kw):
        seen.update(prompts=prompts, answer=answer)
        return [0.0] * len(completions)
    objective = GRPO(tok, [word_count_reward, answer_seen], generate_ids, reward_weights=[1.0, 0.5],
                     num_generations=4, max_completion_length=6, seed=0, loss_type="grpo", beta=0.04)
    batch = {"prompt_ids": [tok.encode("w5 w6", add_special_tokens=False), tok.encode("w7", add_special_tokens=False)],
             "prompt": ["w5 w6", "w7"], "answer": ["a", "b"]}
    r = objective.rollout(model, batch)
    assert len(r.completions) == 8 and seen["prompts"] == ["w5 w6"] * 4 + ["w7"] * 4
    assert seen["answer"] == ["a"] * 4 + ["b"] * 4
    assert all(t == (len(c) == 6) for t, c in zip(r.truncated, r.completion_ids))
    torch.testing.assert_close(r.rewards, r.rewards_per_func[:, 0] + 0.5 * r.rewards_per_func[:, 1])
    loss, count, metrics = objective.loss(model, batch)
    assert count == 8 and set(metrics) == set(objective.metrics) == {"kl", "clip_ratio/low_mean",
                                                                     "clip_ratio/high_mean", "clip_ratio/region_mean"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    rows = [PromptRow(ids, text, {"answer": a}) for ids, text, a in zip(batch["prompt_ids"], batch["prompt"], "ab")]
    parts, step = objective.rollouts(model, rows, micro_batch_size=3, step=0)
    assert [len(p.rewards) for p in parts] == [3, 3, 2] and set(step) == set(objective.step_metrics)
    whole = torch.cat([p.rewards for p in parts])
    assert step["reward"] == pytest.approx(float(whole.mean())) and step["reward_std"] == pytest.approx(float(whole.std()))
    assert step["rewards/word_count_reward/mean"] == pytest.approx(float(torch.cat([p.rewards_per_func[:, 0]
                                                                                   for p in parts]).mean()))
    again, _ = objective.rollouts(model, rows, micro_batch_size=3, step=0)  # a step's samples follow from its seed
    assert [p.completion_ids for p in again] == [p.completion_ids for p in parts]
    scores = objective.evaluate(model, rows[:1], pad_id=0)
    assert set(scores) == set(objective.eval_metrics)


def test_builtin_rewards():
    completions = ["<answer> 42 </answer>", "I think <answer>41</answer> no, <answer>42</answer>", "42", ""]
    assert extract_answer(completions[1]) == "42" and extract_answer("42") is None
    assert exact_match(["p"] * 4, completions, answer=[42, "42", "42", "42"]) == [1.0, 1.0, 0.0, 0.0]
    assert answer_format(["p"] * 4, completions) == [1.0, 0.0, 0.0, 0.0]
    assert regex_format(r"\d+")(["p"], ["42"]) == [1.0]
    assert length_reward(4)(["p"] * 3, ["abcd", "ab", "abcdefghij"]) == [1.0, 0.5, 0.0]
    assert load_reward_function("exact_match") is exact_match


def test_load_reward_function_beside_a_recipe_and_on_the_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, completions, **kw):\n"
                                            "    return [float(c.isupper()) for c in completions]\n")
    fn = load_reward_function("my_rewards:shout", beside=tmp_path)
    assert fn(["p", "p"], ["AB", "ab"]) == [1.0, 0.0]
    assert load_reward_function("test_grpo:word_count_reward") is word_count_reward
    with pytest.raises(ConfigError, match="'nowhere_mod:f'.*no module 'nowhere_mod'"):
        load_reward_function("nowhere_mod:f", beside=tmp_path)
    with pytest.raises(ConfigError, match="'my_rewards:whisper'.*no function 'whisper'"):
        load_reward_function("my_rewards:whisper", beside=tmp_path)
    with pytest.raises(ConfigError, match="'exact'.*'module:function'"):
        load_reward_function("exact")


def test_a_reward_function_that_fails_is_named_with_its_prompt():
    def picky(prompts, completions, **kw):
        return [1 / (len(c) - 2) for c in completions]

    def short(prompts, completions, **kw):
        return [1.0]

    def nothing(prompts, completions, **kw):
        return [None, 1.0]
    with pytest.raises(TrainingError, match=r"'picky' raised ZeroDivisionError.*prompt 'q2'.*completion 'ab'"):
        score([picky], ["q1", "q2"], ["abc", "ab"], {})
    with pytest.raises(TrainingError, match="'short' returned 1 values for 2 completions.*'q1'"):
        score([short], ["q1", "q2"], ["a", "b"], {})
    with pytest.raises(TrainingError, match="'nothing' returned None for prompt 'q1'"):
        score([nothing], ["q1", "q2"], ["a", "b"], {})


def test_grpo_settings_are_checked_by_name():
    tok = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0})()
    with pytest.raises(ConfigError, match="num_generations must be an integer of at least 2.*got 1"):
        GRPO(tok, [word_count_reward], generate_ids, num_generations=1)
    with pytest.raises(ConfigError, match="loss_type 'sum'"):
        GRPO(tok, [word_count_reward], generate_ids, loss_type="sum")
    with pytest.raises(ConfigError, match="at least one reward function"):
        GRPO(tok, [], generate_ids)
    with pytest.raises(ConfigError, match="2 weights for 1 reward functions"):
        GRPO(tok, [word_count_reward], generate_ids, reward_weights=[1.0, 2.0])
