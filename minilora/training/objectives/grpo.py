"""Group Relative Policy Optimization with verifiable rewards (Shao et al. 2024, "DeepSeekMath", §4.1),
with TRL's semantics (GRPOTrainer, TRL 1.16) and its names.

For each prompt q, G = num_generations completions o_1..o_G are sampled from the current policy; the
reward functions score each (r_i, a weighted sum); each completion's advantage is its reward against
its group's (eq. 4's outcome supervision, with TRL's 1e-4 in the denominator):

    A_i = (r_i - mean(r_1..r_G)) / (std + 1e-4)     scale_rewards "group": the group's std (unbiased)
                                                    "batch": the std of the whole batch's rewards
                                                    "none": no division (Liu et al. 2025, Dr. GRPO §3.1)

Every token t of o_i shares A_i. With the ratio ρ_it = πθ(o_it | q, o_i<t) / π_old(o_it | ...), the
clipped surrogate (PPO's, eq. 3) and the KL to the reference (the adapter disabled) by the k3 estimator
(Schulman 2020; DeepSeekMath eq. 4, unbiased and positive):

    ℓ_it = -min(ρ_it A_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i) + β (π_ref/πθ - log(π_ref/πθ) - 1)

With use_bias_correction_kl (TRL's default) the KL term is ρ_it · k3, whose gradient is the unbiased
reverse-KL gradient (DeepSeek-V3.2, 2025): ρ = 1 in value on-policy but not in its gradient, which
gains k3 · ∇log πθ.

ε_high = epsilon_high (DAPO's "clip-higher", Yu et al. 2025 §3.1, who suggest 0.28), else ε. With one
iteration per generation (TRL's num_iterations = 1) π_old is πθ detached: ρ = 1 in value and the
gradient is A_i ∇log πθ. How ℓ_it become one loss is `loss_type` (m the completion mask, |o_i| its
length, L = max_completion_length):

    grpo     mean_i [ Σ_t m ℓ_it / |o_i| ]          DeepSeekMath eq. 3: each completion's mean, then theirs
    bnpo     Σ_it m ℓ_it / Σ_it m                   the micro-batch's token mean
    dr_grpo  Σ_it m ℓ_it / (G' · L)                 Dr. GRPO §3.1: a constant, no length bias (G' rows)
    dapo     Σ_it m ℓ_it / (tokens of the step)     DAPO §3.3: the token mean over the whole step, TRL's default

As an `Objective` these are (sum, count) pairs, the loop dividing the step's sums by the step's count:
grpo (Σ_i mean_t ℓ_it, rows), dr_grpo (Σ_it ℓ_it / L, rows), dapo (Σ_it ℓ_it, tokens) and bnpo (the
micro-batch's token mean, 1), so that each equals TRL's with gradient accumulation too. Log-probs are
of the logits divided by `temperature`, as TRL's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from ...data.prompts import collate_prompts
from ...errors import ConfigError
from ...lora.inject import adapter_disabled
from .. import distributed
from ..rewards import RewardFn, reward_name, score

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# (model, prompts' ids, eos ids, pad id, max new tokens, temperature, top_k, top_p, seed=, keep_eos=True) ->
# new ids per prompt, with the EOS that ended it: minilora.generate.generate_ids, which sits above
# training, so the entry point that builds GRPO hands it in (minilora.generate.grpo_objective)
Sampler = Callable[..., list[list[int]]]
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group"
                     ) -> torch.Tensor:
    """(N,) advantages of (N,) rewards, N = prompts × num_generations with each prompt's completions
    adjacent: the reward less its group's mean, divided by the std (+ 1e-4) of its group ("group"), of
    the batch ("batch") or not at all ("none"); True/False mean "group"/"none", as in TRL."""
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards) if isinstance(scale_rewards, bool) \
        else scale_rewards
    if scale not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards {scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    groups = rewards.view(-1, num_generations)
    advantages = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale == "group":
        std = groups.std(1, keepdim=True).expand_as(groups).flatten()
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + 1e-4)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, max_completion_length: int | None = None,
              use_bias_correction_kl: bool = True) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """(summed loss, count, stats) of per-token log-probs (N, T) under the policy, the sampling policy
    and the reference (None where beta = 0), (N,) advantages and the (N, T) completion mask; sum / count
    is TRL's loss of this batch as one micro-batch. stats: the masked token means kl (where beta),
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type {loss_type!r}: GRPO's loss types are {', '.join(LOSS_TYPES)}")
    if beta != 0.0 and ref_logps is None:
        raise ConfigError("beta != 0 needs the reference's log-probs (ref_logps)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ConfigError("loss_type 'dr_grpo' divides by max_completion_length: give it")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)                        # (N, 1): every token of a row
    ratio = torch.exp(logps - old_logps)                                 # ρ_it
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    tokens = mask.sum().clamp(min=1.0)

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().to(mask.dtype) * mask).sum() / tokens
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1                                        # k3: π_ref/πθ - log(π_ref/πθ) - 1
        if use_bias_correction_kl:
            kl = kl * ratio                                              # ρ · k3: its gradient unbiased too
        per_token = per_token + beta * kl
        stats["kl"] = token_mean(kl)
    low, high = (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)
    stats.update({"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                  "clip_ratio/region_mean": token_mean(low | high)})
    summed = (per_token * mask).sum(-1)                                  # (N,)
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp(min=1.0)).sum(), len(summed), stats
    if loss_type == "bnpo":
        return summed.sum() / tokens, 1, stats
    if loss_type == "dr_grpo":
        return summed.sum() / max_completion_length, len(summed), stats
    return summed.sum(), int(mask.sum()), stats


def token_logps(model: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) log-probs of each completion token given its prompt and the completion before it, and the
    (N, C) completion mask: one forward over [prompt, left-padded | completion, right-padded], TRL's
    layout; the logits divided by `temperature` first (TRL's sampling distribution)."""
    device = next(model.parameters()).device
    P, C = max(len(p) for p in prompt_ids), max(1, max(len(c) for c in completion_ids))
    ids = torch.full((len(prompt_ids), P + C), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, P - len(p):P + len(c)] = torch.tensor([*p, *c], dtype=torch.long, device=device)
        attention[i, P - len(p):P + len(c)] = 1
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(model, "hidden_states") and getattr(model, "final_logit_softcap", None) is None:
        logits = head(model.hidden_states(ids, attention_mask=attention)[:, P - 1:-1])  # (N, C, vocab)
    else:
        logits = model(ids, attention_mask=attention)[:, P - 1:-1]
    logps = (logits.float() / temperature).log_softmax(-1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    return logps, attention[:, P:]


@dataclass
class Rollout:
    """Sampled completions (N = prompts × num_generations, each prompt's adjacent) and their scores;
    a micro-batch of GRPO is a slice of one (`part`)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]     # with the EOS that ended it, where one did
    prompts: list[Any]
    completions: list[Any]              # text, or [{"role": "assistant", "content": text}] after a conversation
    truncated: list[bool]               # stopped by max_completion_length rather than by an EOS
    rewards_per_func: torch.Tensor      # (N, functions)
    rewards: torch.Tensor               # (N,) the weighted sum
    advantages: torch.Tensor            # (N,)

    def part(self, rows: slice) -> "Rollout":
        return Rollout(*(getattr(self, f.name)[rows] for f in fields(self)))

    @property
    def tokens(self) -> int:  # what the progress bar counts
        return sum(map(len, self.prompt_ids)) + sum(map(len, self.completion_ids))


@dataclass
class GRPO:
    """GRPO as an `Objective` that makes its own micro-batches (a `RolloutObjective`): each step,
    `rollouts` samples num_generations completions of each of this rank's prompts (one batched call
    of `sample`, generate_ids with the KV cache), scores them, computes the advantages and cuts the
    completions into micro-batches; `loss` is one iteration's on such a micro-batch (π_old = πθ
    detached, the reference the adapter off). Prompts are data.prompts.PromptRow: their further
    columns reach the reward functions. The TrainConfig batch_size counts completions, as TRL's.

    `metrics` (kl, clip_ratio/*) are sums over the loss's count, of which the loop logs the means (a
    token mean with dapo; with grpo and dr_grpo, micro-batches' token means weighted by completions);
    `step_metrics` (reward, reward_std, rewards/<f>/mean, completions/*) are the step's, over every
    completion of every rank, as TRL's."""

    tokenizer: Any
    reward_funcs: list[RewardFn]
    sample: Sampler
    reward_weights: list[float] | None = None
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str | bool = "group"
    seed: int = 0
    use_bias_correction_kl: bool = True
    eos_ids: list[int] | None = None
    metrics: tuple[str, ...] = field(init=False)
    step_metrics: tuple[str, ...] = field(init=False)
    eval_metrics: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) \
                or self.num_generations < 2:
            raise ConfigError(f"num_generations must be an integer of at least 2 (advantages compare each "
                              f"completion with the others of its group), got {self.num_generations!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type {self.loss_type!r}: GRPO's loss types are {', '.join(LOSS_TYPES)}")
        group_advantages(torch.zeros(2), 2, self.scale_rewards)  # checks scale_rewards by name
        if not self.reward_funcs:
            raise ConfigError("GRPO needs at least one reward function (reward_funcs)")
        weights = self.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(weights)} weights for {len(self.reward_funcs)} "
                              "reward functions")
        self.reward_weights = [float(w) for w in weights]
        if self.eos_ids is None:
            self.eos_ids = [self.tokenizer.eos_token_id]
        names = [reward_name(f) for f in self.reward_funcs]
        self.metrics = (*(("kl",) if self.beta != 0.0 else ()), "clip_ratio/low_mean", "clip_ratio/high_mean",
                        "clip_ratio/region_mean")
        self.step_metrics = ("reward", "reward_std", *(f"rewards/{n}/{s}" for n in names for s in ("mean", "std")),
                             "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio")
        self.eval_metrics = ("eval_reward", *(f"eval_rewards/{n}/mean" for n in names))

    @property
    def completions_per_prompt(self) -> int:  # what one prompt row of a step's batch becomes
        return self.num_generations

    def rollout(self, model: nn.Module, batch: dict[str, Any], temperature: float | None = None,
                num_generations: int | None = None, seed: int | None = None) -> Rollout:
        """Sample, decode and score num_generations completions of each prompt of `batch` ({"prompt_ids",
        "prompt", further columns}, a list each: data.prompts.collate_prompts), with group advantages."""
        G = num_generations or self.num_generations
        prompt_ids = [list(p) for p in batch["prompt_ids"] for _ in range(G)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                completion_ids = self.sample(model, prompt_ids, self.eos_ids, self.tokenizer.pad_token_id,
                                             self.max_completion_length,
                                             self.temperature if temperature is None else temperature,
                                             self.top_k, self.top_p, seed=seed, keep_eos=True)
        finally:
            model.train(was_training)
        ends = set(self.eos_ids)
        truncated = [not c or c[-1] not in ends for c in completion_ids]  # no EOS: cut by max_completion_length
        new = [c if t else c[:-1] for c, t in zip(completion_ids, truncated)]
        prompts = [p for p in batch["prompt"] for _ in range(G)]
        texts = [self.tokenizer.decode(c) for c in new]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t  # TRL's forms
                       for p, t in zip(prompts, texts)]
        columns = {k: [v for v in values for _ in range(G)] for k, values in batch.items()
                   if k not in ("prompt", "prompt_ids", "completion", "completion_ids")}
        per_func = score(self.reward_funcs, prompts, completions, {**columns, "completion_ids": completion_ids})
        rewards = (per_func * torch.tensor(self.reward_weights)).sum(1)
        advantages = group_advantages(rewards, G, self.scale_rewards) if G > 1 else torch.zeros_like(rewards)
        return Rollout(prompt_ids, completion_ids, prompts, completions, truncated, per_func, rewards, advantages)

    def rollouts(self, model: nn.Module, rows: list, micro_batch_size: int, step: int
                 ) -> tuple[list[Rollout], dict[str, float]]:
        """One step's micro-batches of micro_batch_size completions from this rank's prompt rows, sampled
        with a seed of (seed, step, rank) so that a resumed run samples what the uninterrupted one did;
        and the step's metrics over every rank's completions. Called on every rank, with rows or none."""
        rank, world = distributed.rank_and_world()
        r = self.rollout(model, collate_prompts(rows), seed=(self.seed * 1_000_003 + step) * 1024 + rank) if rows \
            else None
        F, device = len(self.reward_funcs), next(model.parameters()).device
        rewards = r.rewards if r is not None else torch.zeros(0)
        per_func = r.rewards_per_func if r is not None else torch.zeros(0, F)
        group_std = rewards.view(-1, self.num_generations).std(1) if r is not None else torch.zeros(0)
        lengths = torch.tensor([len(c) for c in r.completion_ids], dtype=torch.float64) if r is not None \
            else torch.zeros(0)
        sums = torch.tensor([len(rewards), float(rewards.sum()), float((rewards.double() ** 2).sum()),
                             *per_func.double().sum(0).tolist(), *(per_func.double() ** 2).sum(0).tolist(),
                             float((group_std < 1e-6).sum()), len(group_std), float(lengths.sum()),
                             sum(r.truncated) if r is not None else 0], dtype=torch.float64, device=device)
        distributed.sum_across_ranks([sums])
        n, s = max(float(sums[0]), 1.0), sums.tolist()

        def std(total: float, squares: float) -> float:  # unbiased, as torch.std
            return math.sqrt(max(squares - total * total / n, 0.0) / max(n - 1, 1.0))
        if r is not None and self.scale_rewards == "batch":  # the std of the whole step's rewards, every rank's
            r.advantages = group_advantages(r.rewards, self.num_generations, "none") / (std(s[1], s[2]) + 1e-4)
        names = [reward_name(f) for f in self.reward_funcs]
        metrics = {"reward": s[1] / n, "reward_std": std(s[1], s[2]),
                   **{k: v for j, name in enumerate(names) for k, v in
                      ((f"rewards/{name}/mean", s[3 + j] / n), (f"rewards/{name}/std", std(s[3 + j], s[3 + F + j])))},
                   "frac_reward_zero_std": s[3 + 2 * F] / max(s[4 + 2 * F], 1.0),
                   "completions/mean_length": s[5 + 2 * F] / n, "completions/clipped_ratio": s[6 + 2 * F] / n}
        parts = [] if r is None else [r.part(slice(i, i + micro_batch_size))
                                      for i in range(0, len(r.rewards), micro_batch_size)]
        return parts, metrics

    def loss(self, model: nn.Module, batch: Rollout | dict[str, Any]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(summed loss, count, metrics as sums over the count) of a rollout (or of a batch of prompts,
        sampled first): one iteration, π_old = πθ detached, the reference the adapter off."""
        r = batch if isinstance(batch, Rollout) else self.rollout(model, batch)
        pad = self.tokenizer.pad_token_id
        ref = None
        if self.beta != 0.0:  # the reference first, so that switching adapters never touches a built graph
            with torch.no_grad(), adapter_disabled(model):
                ref = token_logps(model, r.prompt_ids, r.completion_ids, pad, self.temperature)[0]
        logps, mask = token_logps(model, r.prompt_ids, r.completion_ids, pad, self.temperature)
        loss, count, stats = grpo_loss(logps, logps.detach(), ref, r.advantages.to(logps.device), mask, self.loss_type,
                                       self.epsilon, self.epsilon_high, self.beta, self.max_completion_length,
                                       self.use_bias_correction_kl)
        return loss, count, {m: float(stats[m]) * count for m in self.metrics}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: list, pad_id: int, micro_batch_size: int = 8,
                 bf16: bool = False) -> dict[str, float]:
        """The mean reward (and each function's) of one greedy completion per held-out prompt row
        (data.prompts.PromptRow), this rank's share of the rows under torchrun."""
        rank, world = distributed.rank_and_world()
        mine = data[rank::world]
        device = next(model.parameters()).device
        sums = torch.zeros(len(self.reward_funcs) + 2, dtype=torch.float64, device=device)  # total, each, rows
        for i in range(0, len(mine), micro_batch_size):
            rows = mine[i:i + micro_batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                r = self.rollout(model, collate_prompts(rows), temperature=0.0, num_generations=1)
            sums += torch.tensor([float(r.rewards.sum()), *r.rewards_per_func.sum(0).tolist(), len(rows)],
                                 dtype=torch.float64, device=device)
        distributed.sum_across_ranks([sums])
        n = max(float(sums[-1]), 1.0)
        return dict(zip(self.eval_metrics, (float(s) / n for s in sums[:-1])))
