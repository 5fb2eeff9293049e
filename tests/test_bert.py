"""BERT and DistilBERT against transformers' classifiers, and the real all-MiniLM-L6-v2 encoder."""

import json

import pytest
import torch
from minilora.loading.weights import load_model

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 11, 12, 3, 0, 0, 0], [2, 40, 41, 42, 43, 3, 0]])
MASK = (torch.arange(7)[None] < torch.tensor([[7], [4], [6]])).long()


@pytest.mark.parametrize("kind", ["distilbert", "bert"])
def test_logits_equal_transformers_with_padding(saved_tiny, kind):
    hf, folder = saved_tiny[kind]
    ours = load_model(folder)
    assert type(ours).__name__.endswith("ForSequenceClassification")
    with torch.no_grad():
        expected = hf(input_ids=IDS, attention_mask=MASK).logits
        got = ours(IDS, attention_mask=MASK)
    assert got.shape == expected.shape == (3, len(hf.config.id2label))
    assert (got - expected).abs().max().item() <= 1e-5


def test_bare_encoder_checkpoint_gets_a_fresh_head(saved_tiny, tmp_path):
    """The Hub's distilbert-base-uncased is a masked-LM checkpoint: its encoder loads, its MLM head is
    ignored, and the classification head starts fresh (N(0, 0.02) weights, zero biases)."""
    hf, folder = saved_tiny["distilbert"]
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not k.startswith(("pre_classifier", "classifier"))}
    state["vocab_projector.weight"] = torch.zeros(97, 32)  # the MLM head of distilbert-base-uncased
    (tmp_path / "mlm").mkdir()
    save_file(state, str(tmp_path / "mlm" / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("id2label"), cfg.pop("label2id")
    cfg["architectures"] = ["DistilBertForMaskedLM"]
    (tmp_path / "mlm" / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path / "mlm", task="classification", num_labels=2)
    assert model.classifier.weight.shape == (2, 32) and torch.count_nonzero(model.classifier.bias) == 0
    assert 0.01 < model.classifier.weight.std().item() < 0.03
    with torch.no_grad():
        expected = hf.distilbert(input_ids=IDS, attention_mask=MASK)[0]
        assert (model.distilbert(IDS, MASK) - expected)[MASK.bool()].abs().max().item() <= 1e-5
    embedder = load_model(tmp_path / "mlm")  # no task: a masked-LM checkpoint gives the encoder
    assert type(embedder).__name__ == "DistilBertForEmbedding"


def test_real_minilm_sentence_similarity(minilm_path):
    """all-MiniLM-L6-v2's mean-pooled embeddings: cosine 0.755 between these two sentences, as
    sentence-transformers publishes."""
    from minilora.data.batching import collate
    from minilora.data.records import Example
    from minilora.loading.tokenizer import load_tokenizer
    folder = minilm_path
    model, tok = load_model(folder, task="embedding"), load_tokenizer(folder)
    sentences = ["A man is eating food.", "A man is eating a piece of bread."]
    batch = collate([Example(tok.encode(s), 0) for s in sentences], tok.pad_token_id)
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["attention_mask"])
    cosine = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert abs(cosine - 0.755) <= 1e-3, cosine


def test_adding_a_pad_token_resizes_embeddings_and_keeps_old_rows(saved_tiny):
    from minilora.models.common import resize_token_embeddings
    for kind in ("gpt2", "llama-gqa", "distilbert"):
        model = load_model(saved_tiny[kind][1])
        old = model.input_embeddings.weight.detach().clone()
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            before = model(ids)
        resize_token_embeddings(model, old.shape[0] + 1)
        new = model.input_embeddings.weight
        assert new.shape == (old.shape[0] + 1, old.shape[1]) and torch.equal(new[:-1], old)
        with torch.no_grad():
            after = model(ids)
        if kind == "distilbert":
            assert torch.equal(after, before)
        else:  # the causal LM's head grows one output; the old ones are unchanged
            assert after.shape[-1] == before.shape[-1] + 1 and torch.allclose(after[..., :-1], before, atol=1e-6)


def test_short_lora_run_on_real_minilm_and_reviews_lifts_held_out_accuracy(minilm_path, reviews, tmp_path, capsys):
    """LoRA (r=4, alpha=32) on `query` plus the classifier head, on real Pang & Lee sentences: held-out
    accuracy (a test split training never sees) rises clearly above the untrained head's."""

    from minilora.cli import main
    from minilora.lora.report import param_report
    from minilora.recipe import RECIPES, load_recipe, run_recipe
    train_csv, test_csv = reviews
    folder = minilm_path
    recipe = load_recipe(RECIPES / "sentiment_minilm.toml", overrides={
        "model.name": str(folder), "data.train": str(train_csv), "data.test": str(test_csv), "data.limit": "480",
        "data.val_size": "96", "data.cutoff": "64", "train.epochs": "2",
        "train.output_dir": str(tmp_path), "train.progress": "false"})
    model, tok, result = run_recipe(recipe)
    assert not result.stopped_early
    before, after = model.test_metrics["before"]["eval_accuracy"], model.test_metrics["after"]["eval_accuracy"]
    print(f"held-out accuracy: untrained head {before:.3f}, after LoRA {after:.3f}")
    assert after > 0.65 and after > before + 0.12, (before, after)
    report = param_report(model)
    assert report.percent < 2.0
    assert dict(report.saved_modules) == {"bert.pooler": 384 * 384 + 384, "classifier": 384 * 2 + 2}
    # the adapter carries the head and the label names: `minilora classify` uses both
    meta = json.loads((result.adapter_dir / "minilora.json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"}
    capsys.readouterr()
    assert main(["classify", str(folder), "--adapter", str(result.adapter_dir), "a wonderful, moving film",
                 "--max-length", "64"]) == 0
    label, prob, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(prob) <= 1 and text == "a wonderful, moving film"
