"""Preference tuning against TRL (the oracle, a test-only dependency): the same tiny random Llama with
the same LoRA adapter in minilora and in peft, the same pairs and the same reference; per-pair losses,
rewards and metrics of DPO (every loss type), SimPO (TRL's CPOTrainer) and ORPO equal TRL's, and so do
the gradients of the LoRA parameters. Then the reference (adapters off, a named adapter, precomputed),
ln 2 at step 0, and a short run through train()."""

import copy
import math
import re

import pytest
import torch
from conftest import lora_model, tiny_model_with_tokenizer

from minilora.data.batching import collate
from minilora.data.preferences import build_pairs
from minilora.loading.tokenizer import load_tokenizer
from minilora.lora.peft_files import save_adapter
from minilora.training.config import TrainConfig
from minilora.training.loop import train
from minilora.training.objectives import DPO, ORPO, SimPO

pytest.importorskip("trl")

RECORDS = [{"prompt": "w5 w6 w7", "chosen": " w8 w9", "rejected": " w10 w11 w12"},
           {"prompt": "w3", "chosen": " w20", "rejected": " w30 w31"},
           {"prompt": "w40 w41 w42 w43", "chosen": " w44 w45 w46 w47 w48", "rejected": " w49"},
           {"prompt": "w60 w61", "chosen": " w62 w63 w64", "rejected": " w65 w66"}]
TOL = 1e-5


@pytest.fixture
def setup(saved_tiny, tmp_path):
    """(our LoRA model, the same adapter in peft, the HF tokenizer, our pairs, tmp_path)."""
    from peft import PeftModel
    from transformers import PreTrainedTokenizerFast
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    ours = lora_model(saved_tiny)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(saved_tiny["llama-gqa"][0]), tmp_path / "adapter",
                                       is_trainable=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<eos>",
                                     pad_token="[UNK]")
    pairs = build_pairs(RECORDS, load_tokenizer(folder))
    return ours, theirs, hf_tok, pairs, tmp_path


def lora_grads(model) -> dict[str, torch.Tensor]:
    """LoRA gradients by (layer, module, A|B), in either library's naming."""
    out = {}
    for n, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\..*(lora_[AB])\.(?:default\.)?weight", n)
        if m and p.grad is not None:
            out[m.groups()] = p.grad
    return out


def assert_same_grads(ours, theirs):
    a, b = lora_grads(ours), lora_grads(theirs)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOL, worst
    return worst


def our_pair_results(objective, model, pairs):
    """Per pair: (loss, {metric: value}) from our objective, one pair per batch."""
    out = []
    for p in pairs:
        loss, n, metrics = objective.loss(model, collate([p], 0))
        out.append((float(loss.detach()), metrics))
    return out


def dpo_trainer(theirs, hf_tok, tmp_path, keep_ref_copy=False, **settings):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=None,
                     per_device_train_batch_size=len(RECORDS), **settings)
    trainer = DPOTrainer(model=theirs, args=args, train_dataset=Dataset.from_list(RECORDS), processing_class=hf_tok)
    if not keep_ref_copy:  # TRL copies a pretrained adapter as the reference; ours by default is the base model
        trainer.model.delete_adapter("ref")
    return trainer


def test_pairs_tokenize_as_trl(setup):
    ours, theirs, hf_tok, pairs, tmp_path = setup
    trainer = dpo_trainer(theirs, hf_tok, tmp_path)
    for p, row in zip(pairs, trainer.train_dataset):
        assert (p.prompt_ids, p.chosen_ids, p.rejected_ids) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


def test_one_forward_pass_for_chosen_and_rejected(setup):
    pairs = setup[3]
    batch = collate(pairs[:2], 0)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for i, p in enumerate(pairs[:2]):
        c, r = p.rows()
        assert batch["input_ids"][i, :len(c.input_ids)].tolist() == c.input_ids
        assert batch["input_ids"][2 + i, :len(r.input_ids)].tolist() == r.input_ids
        assert batch["labels"][i, :len(p.prompt_ids)].eq(-100).all()


DPO_CASES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]


@pytest.mark.parametrize("loss_type,smoothing", DPO_CASES)
def test_dpo_matches_trl(setup, loss_type, smoothing):
    ours, theirs, hf_tok, pairs, tmp_path = setup
    trainer = dpo_trainer(theirs, hf_tok, tmp_path, loss_type=[loss_type], label_smoothing=smoothing, beta=0.3)
    objective = DPO(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    mine = our_pair_results(objective, ours, pairs)
    worst = 0.0
    for (loss, metrics), row in zip(mine, trainer.train_dataset):
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator([row])))
        worst = max(worst, abs(loss - trl_loss))
        for name, value in metrics.items():
            assert abs(value - trainer._metrics["train"][name][-1]) < TOL, (name, value)
    assert worst < TOL
    # gradients over the whole batch: TRL's mean loss, ours the summed loss over the count
    trainer._metrics["train"].clear()
    trainer.compute_loss(trainer.model, trainer.data_collator(list(trainer.train_dataset))).backward()
    loss, n, _ = objective.loss(ours, collate(pairs, 0))
    (loss / n).backward()
    print(f"DPO {loss_type}: loss {worst:.2e}, grads {assert_same_grads(ours, trainer.model):.2e}")


def cpo_like(kind, theirs, hf_tok, tmp_path, **settings):
    from datasets import Dataset
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    args = Config(output_dir=str(tmp_path / kind), report_to="none", use_cpu=True, **settings)
    return Trainer(model=theirs, args=args, train_dataset=Dataset.from_list(RECORDS), processing_class=hf_tok)


def trl_batch(pairs):
    """Our pairs in the CPO/ORPO trainers' batch layout (chosen_* and rejected_* padded apart)."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p.rows()[0 if side == "chosen" else 1] for p in pairs]
        b = collate(rows, 0)
        batch.update({f"{side}_input_ids": b["input_ids"], f"{side}_attention_mask": b["attention_mask"],
                      f"{side}_labels": b["labels"]})
    return batch


def test_simpo_matches_trl_cpo(setup):
    ours, theirs, hf_tok, pairs, tmp_path = setup
    trainer = cpo_like("cpo", theirs, hf_tok, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0,
                       simpo_gamma=0.7, label_smoothing=0.1)
    objective = SimPO(beta=2.0, gamma=0.7, label_smoothing=0.1)
    worst = 0.0
    for p, (loss, metrics) in zip(pairs, our_pair_results(objective, ours, pairs)):
        with torch.no_grad():
            trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch([p]))
        worst = max(worst, abs(loss - float(trl_loss)))
        for name, value in metrics.items():
            assert abs(value - trl_metrics[name]) < TOL, name
    assert worst < TOL
    trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, trl_batch(pairs))
    trl_loss.backward()
    loss, n, _ = objective.loss(ours, collate(pairs, 0))
    (loss / n).backward()
    print(f"SimPO: loss {worst:.2e}, grads {assert_same_grads(ours, trainer.model):.2e}")


def test_orpo_matches_trl(setup):
    """TRL's ORPO takes the NLL over the chosen prompt too; ours (the paper's) over the completion: the
    odds-ratio term, rewards and log-probs are compared as TRL computes them, the NLL with TRL's own
    cross-entropy over the completion's labels."""
    ours, theirs, hf_tok, pairs, tmp_path = setup
    trainer = cpo_like("orpo", theirs, hf_tok, tmp_path, beta=0.25)
    objective = ORPO(beta=0.25)
    total = 0.0
    for p, (loss, metrics) in zip(pairs, our_pair_results(objective, ours, pairs)):
        batch = trl_batch([p])
        with torch.no_grad():
            c, r, *_ = trainer.concatenated_forward(trainer.model, batch)
            losses, rc, rr, ratio, log_odds = trainer.odds_ratio_loss(c, r)
            logits = trainer.model(batch["chosen_input_ids"]).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], batch["chosen_labels"][0, 1:])
        trl = {"rewards/chosen": rc, "rewards/rejected": rr, "logps/chosen": c, "logps/rejected": r,
               "log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": nll}
        for name, value in trl.items():
            assert abs(metrics[name] - float(value)) < TOL, name
        assert abs(loss - float(nll - losses.mean())) < TOL
        total += float(nll - losses.mean())


def test_dpo_at_step_0_is_ln_2(saved_tiny, tmp_path):
    model = lora_model(saved_tiny, std=0.0)  # a fresh adapter: B = 0
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    pairs = build_pairs(RECORDS, load_tokenizer(folder))
    loss, n, metrics = DPO().loss(model, collate(pairs, 0))
    ln2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # ln 2 as a float32, which the loss is
    assert n == len(pairs) and float(loss) == ln2 * n
    assert metrics["rewards/margins"] == 0.0


def test_reference_adapter_matches_trls_ref_copy(setup):
    """An adapter already trained (an SFT one) as the reference, the policy a copy of it that then moves:
    TRL's "ref" copy of a pretrained adapter is the same reference."""
    ours, theirs, hf_tok, pairs, tmp_path = setup
    trainer = dpo_trainer(theirs, hf_tok, tmp_path, keep_ref_copy=True)
    objective = DPO(reference_adapter="default")
    objective.prepare(ours, [pairs], 0, 2, False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy moves away from the reference, in both
        bumps = {}
        for n, p in ours.named_parameters():
            if ".policy." in n:
                bumps[n.replace(".adapters.policy", "")] = torch.randn(p.shape, generator=g) * 0.05
                p += bumps[n.replace(".adapters.policy", "")]
        for n, p in trainer.model.named_parameters():
            if ".default." in n and "lora" in n:
                key = re.sub(r"^base_model\.model\.", "", n).replace(".default", "")
                p += bumps[key]
    for (loss, metrics), row in zip(our_pair_results(objective, ours, pairs), trainer.train_dataset):
        trainer._metrics["train"].clear()
        with torch.no_grad():
            assert abs(loss - float(trainer.compute_loss(trainer.model, trainer.data_collator([row])))) < TOL
        assert abs(metrics["rewards/margins"] - trainer._metrics["train"]["rewards/margins"][-1]) < TOL


def test_precomputed_reference_equals_the_live_one(setup):
    ours, _, _, pairs, _ = setup
    live = DPO().loss(ours, collate(pairs, 0))
    kept = DPO(precompute_ref_log_probs=True)
    kept.prepare(ours, [pairs], 0, 3, False)
    assert all(p.reference_logps is not None for p in pairs)
    batch = collate(pairs, 0)
    assert "reference_logps" in batch
    again = kept.loss(ours, batch)
    assert abs(float(live[0]) - float(again[0])) < 1e-9 and live[2] == pytest.approx(again[2], abs=1e-9)


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_training_lowers_the_loss_and_logs_trls_metrics(saved_tiny, tmp_path, objective):
    import json
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    pairs = build_pairs(RECORDS * 2, load_tokenizer(folder))
    model = lora_model(saved_tiny, std=0.0)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=8, micro_batch_size=2, batch_size=4, lr=2e-2,
                      progress=False, objective=objective, eval_at_start=True, eval_every=8,
                      eval_each_epoch=False)
    result = train(model, None, pairs, pairs[:4], cfg)
    steps = [r for r in result.history if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert name in steps[0]
    evals = [r for r in result.history if "eval_rewards/accuracies" in r]
    assert len(evals) == 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in r for r in logged)


def test_a_policy_beside_its_reference_trains_only_the_policy(saved_tiny, tmp_path):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    pairs = build_pairs(RECORDS, load_tokenizer(folder))
    model = lora_model(saved_tiny)  # "default": the SFT adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, micro_batch_size=2, lr=1e-2, progress=False,
                      objective="dpo", reference_adapter="default", eval_each_epoch=False)
    train(model, None, pairs, None, cfg)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the reference never moved
    assert any(".policy." in n for n in after)


@pytest.mark.parametrize("reference", [None, "default"], ids=["adapters-off", "reference-adapter"])
def test_a_stopped_dpo_run_resumes_to_the_uninterrupted_adapter(saved_tiny, tmp_path, reference):
    """Stopped after step 2 and resumed from its checkpoint (a fresh model each time, as a new process
    has), a DPO run ends with the adapter and losses of the run that was never stopped; with a
    reference adapter, the policy copy made again on resume is overwritten by the checkpoint's."""
    from safetensors.torch import load_file
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    pairs = build_pairs(RECORDS * 2, load_tokenizer(folder))

    def run(out, **kw):
        cfg = TrainConfig(output_dir=str(out), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2, progress=False,
                          objective="dpo", reference_adapter=reference, save_every=2, eval_each_epoch=False, **kw)
        return train(lora_model(saved_tiny), None, pairs, None, cfg)
    whole = run(tmp_path / "whole")
    steps = iter(range(100))
    cfg = TrainConfig(output_dir=str(tmp_path / "cut"), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2,
                      progress=False, objective="dpo", reference_adapter=reference, save_every=2, eval_each_epoch=False)
    first = train(lora_model(saved_tiny), None, pairs, None, cfg, should_stop=lambda: next(steps) == 1)
    assert first.stopped_early and (tmp_path / "cut" / "checkpoint-2").is_dir()
    resumed = run(tmp_path / "cut", resume_from_checkpoint="latest")
    losses = [r["loss"] for r in whole.history if "loss" in r]
    assert [r["loss"] for r in first.history + resumed.history if "loss" in r] == pytest.approx(losses, abs=1e-6)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in a)
