"""Objectives: what the loop minimises is an argument of the loop. The two that ship equal
cross-entropy computed by hand; the objective handed to train() is the one whose loss decides the
gradient, its metrics are logged as means over its count; a bare loss_fn still works."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import Tok, examples, grads, lora_model
from minilora.data.batching import collate
from minilora.data.records import Example
from minilora.errors import ConfigError
from minilora.training.loop import TrainConfig, accumulate_gradients, train
from minilora.training.objectives import (
    OBJECTIVES,
    CausalLM,
    Classification,
    Objective,
    RolloutObjective,
    as_objective,
    objective_for,
)
from minilora.training.objectives.causal_lm import causal_lm_loss
from minilora.training.objectives.classify import classification_loss


def classifier(saved_tiny):
    """The tiny DistilBERT with its two-class head, LoRA on the query projections, the head trained."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    torch.manual_seed(0)
    model = apply_lora(load_model(saved_tiny["distilbert"][1]), ["q_lin"], r=2,
                       modules_to_save=["pre_classifier", "classifier"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def class_examples(n=12):
    g = torch.Generator().manual_seed(1)
    return [Example(torch.randint(2, 97, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist(), i % 2)
            for i in range(n)]


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quick(tmp_path, **kw):
    return TrainConfig(**{**dict(output_dir=str(tmp_path), max_steps=3, micro_batch_size=2, batch_size=4, lr=1e-2,
                                 progress=False), **kw})


# ---------------------------------------------------------------------------------------------
# The two that ship, against cross-entropy computed by hand

@pytest.mark.parametrize("kind, targets, fused", [("llama-gqa", "all-linear", True), ("gpt2", "all-linear", True),
                                                   ("llama-gqa", ["q_proj", "lm_head"], False)])
def test_causal_lm_is_summed_cross_entropy_over_shifted_labels(saved_tiny, kind, targets, fused):
    """The fused head kernel (a frozen head) and the plain path (LoRA on the head itself) both give
    the sum over target tokens of -log p(token t+1 | tokens <= t), its gradient, and that count."""
    model = lora_model(saved_tiny, kind, targets=targets)
    assert (type(model.lm_head) is torch.nn.Linear) == fused
    batch = collate(examples(6), 0)
    loss, count, metrics = CausalLM().loss(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["labels"][:, 1:]  # token t predicts token t + 1; the last position predicts nothing
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    assert count == int((targets != -100).sum()) > 0 and metrics == {}
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    loss.backward()
    fused = grads(model)
    model.zero_grad(set_to_none=True)
    expected.backward()
    by_hand = grads(model)
    assert fused.keys() == by_hand.keys() and len(fused) > 0
    for n in fused:
        assert (fused[n] - by_hand[n]).abs().max().item() <= 1e-5, n
    assert causal_lm_loss(model, batch)[1] == count


def test_classification_is_summed_cross_entropy_of_the_class_logits(saved_tiny):
    model = classifier(saved_tiny).eval()
    data = class_examples(5)
    batch = collate(data, 0)
    loss, count, metrics = Classification().loss(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = F.cross_entropy(logits, torch.tensor([e.labels for e in data]), reduction="sum")
    assert count == 5 and metrics == {}
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    assert classification_loss(model, batch)[0].item() == loss.item()


def test_evaluation_is_the_mean_of_the_same_loss_and_the_scores_by_hand(saved_tiny):
    lm = lora_model(saved_tiny)
    data = examples(7)
    scores = CausalLM().evaluate(lm, data, 0, micro_batch_size=3)
    batch = collate(data, 0)
    with torch.no_grad():
        logits = lm(batch["input_ids"], attention_mask=batch["attention_mask"])
    mean = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert set(scores) == set(CausalLM.eval_metrics) == {"eval_loss", "eval_perplexity"}
    assert scores["eval_loss"] == pytest.approx(mean.item(), rel=1e-5)
    assert scores["eval_perplexity"] == pytest.approx(torch.exp(mean).item(), rel=1e-5)

    model = classifier(saved_tiny)
    data = class_examples(9)
    scores = Classification().evaluate(model, data, 0, micro_batch_size=4)
    batch = collate(data, 0)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    gold, predicted = batch["labels"], logits.argmax(-1)
    tp = int(((predicted == 1) & (gold == 1)).sum())
    fp, fn = int(((predicted == 1) & (gold == 0)).sum()), int(((predicted == 0) & (gold == 1)).sum())
    assert set(scores) == set(Classification.eval_metrics) == {"eval_loss", "eval_accuracy", "eval_f1"}
    assert scores["eval_loss"] == pytest.approx(F.cross_entropy(logits, gold).item(), rel=1e-5)
    assert scores["eval_accuracy"] == int((predicted == gold).sum()) / 9
    assert scores["eval_f1"] == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1))


def test_the_registry_and_the_choice_from_the_examples():
    from minilora.training.objectives.dpo import DPO
    from minilora.training.objectives.orpo import ORPO
    from minilora.training.objectives.simpo import SimPO
    from minilora.training.objectives.grpo import GRPO
    assert OBJECTIVES == {"causal_lm": CausalLM, "classification": Classification, "dpo": DPO, "simpo": SimPO,
                          "orpo": ORPO, "grpo": GRPO}
    assert all(isinstance(kind(), Objective) for name, kind in OBJECTIVES.items() if name != "grpo")
    tok = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0})()
    grpo = GRPO(tok, [lambda prompts, completions, **kw: [0.0] * len(completions)], lambda *a, **k: [])
    assert isinstance(grpo, Objective) and isinstance(grpo, RolloutObjective)  # it samples: built with its sampler
    assert not isinstance(CausalLM(), RolloutObjective)
    assert objective_for(examples(2)) == CausalLM() and objective_for([Example([5, 6], 1)]) == Classification()
    assert objective_for([]) == CausalLM()  # train() then refuses the empty data by name
    double = lambda model, batch: causal_lm_loss(model, batch)
    assert objective_for(examples(2), double) == CausalLM(double)
    assert objective_for([Example([5, 6], 1)], double) == Classification(double)
    assert as_objective(None) == CausalLM() and as_objective(double) == CausalLM(double)
    mine = Classification()
    assert as_objective(mine) is mine and not isinstance(causal_lm_loss, Objective)


def test_accumulate_gradients_takes_an_objective_or_a_loss_function(saved_tiny):
    micro = [collate(examples(8)[i:i + 3], 0) for i in (0, 3, 6)]
    results = []
    for how in (None, causal_lm_loss, CausalLM()):
        model = lora_model(saved_tiny)
        results.append((accumulate_gradients(model, micro, how), grads(model)))
    (first, g0), *rest = results
    for again, g in rest:
        assert again == first
        assert all(torch.equal(g0[n], g[n]) for n in g0)


# ---------------------------------------------------------------------------------------------
# train() uses the objective it is given

class Scaled:
    """causal_lm_loss times `factor`; an extra metric, the micro-batch's rows, to be logged as a mean."""
    metrics = ("rows", "loss_again")
    eval_metrics = ("eval_scaled",)

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def loss(self, model, batch):
        loss, count = causal_lm_loss(model, batch)
        loss = self.factor * loss
        return loss, count, {"rows": batch["input_ids"].shape[0], "loss_again": float(loss.detach())}

    def evaluate(self, model, data, pad_id, micro_batch_size=8, bf16=False):
        return {"eval_scaled": 7.0}


def test_the_objective_given_decides_the_gradient(saved_tiny, tmp_path):
    """A loss of 0 · (next-token loss) leaves every LoRA weight where it was (AdamW without weight decay
    moves nothing on a zero gradient); the default objective moves them."""
    data = examples(8)
    model = lora_model(saved_tiny)
    before = lora_weights(model)
    result = train(model, Tok, data, None, quick(tmp_path / "zero"), objective=Scaled(0.0))
    assert [h["loss"] for h in result.history] == [0.0, 0.0, 0.0]
    assert [h["grad_norm"] for h in result.history] == [0.0, 0.0, 0.0]
    after = lora_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    model = lora_model(saved_tiny)
    train(model, Tok, data, None, quick(tmp_path / "default"))
    moved = lora_weights(model)
    assert all(not torch.equal(before[n], moved[n]) for n in before)


def test_an_objectives_metrics_are_logged_as_means_over_its_count(saved_tiny, tmp_path):
    """Per step: rows summed over the micro-batches / target tokens, and the summed loss / target
    tokens (the logged loss itself); each in result.history and metrics.jsonl, between loss and lr.
    Evaluation is the objective's own, checked against its eval_metrics."""
    data = examples(8)
    cfg = quick(tmp_path, eval_every=1, eval_each_epoch=False, best_metric="eval_scaled")
    result = train(lora_model(saved_tiny), Tok, data, data[:4], cfg, objective=Scaled(2.0))
    steps = [h for h in result.history if "loss" in h]
    evals = [h for h in result.history if "eval_scaled" in h]
    assert len(steps) == 3 and [e["eval_scaled"] for e in evals] == [7.0, 7.0, 7.0]
    for h in steps:
        assert list(h) == ["step", "epoch", "loss", "rows", "loss_again", "lr", "grad_norm", "tokens"]
        assert h["rows"] == 4 / h["tokens"]  # batch_size rows over the step's target tokens
        assert h["loss_again"] == h["loss"]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [w for w in written if "loss" in w] == steps
    assert result.best_metric == 7.0 and result.best_step == 1
    with pytest.raises(ConfigError, match=r"best_metric 'eval_loss' is not among the metrics evaluation gives: "
                                          r"eval_scaled"):
        train(lora_model(saved_tiny), Tok, data, data[:4], quick(tmp_path / "b", best_metric="eval_loss"),
              objective=Scaled(1.0))


def test_a_loss_fn_is_the_loss_of_the_examples_objective(saved_tiny, tmp_path):
    """train(loss_fn=...) as before: twice the next-token loss gives twice the first step's loss and,
    since a language model is evaluated by its own loss, twice the eval loss at the start."""
    data = examples(8)
    twice = lambda model, batch: (lambda loss, n: (2 * loss, n))(*causal_lm_loss(model, batch))
    runs = {}
    for name, loss_fn in (("plain", None), ("twice", twice)):
        result = train(lora_model(saved_tiny), Tok, data, data[:4],
                       quick(tmp_path / name, max_steps=1, eval_at_start=True, eval_each_epoch=False), loss_fn=loss_fn)
        runs[name] = result.history
    assert runs["twice"][0]["eval_loss"] == 2 * runs["plain"][0]["eval_loss"]
    assert runs["twice"][1]["loss"] == 2 * runs["plain"][1]["loss"]
    assert runs["twice"][1]["tokens"] == runs["plain"][1]["tokens"]


def test_objective_and_loss_fn_together_or_undeclared_metrics_are_refused(saved_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"train\(\) takes an objective or a loss_fn"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "a"), loss_fn=causal_lm_loss,
              objective=CausalLM())

    class Undeclared(Scaled):
        metrics = ("rows",)
    with pytest.raises(ConfigError, match=r"Undeclared\.loss returned the metrics \['loss_again', 'rows'\], but its "
                                          r"metrics attribute names \['rows'\]"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "b"), objective=Undeclared(1.0))
