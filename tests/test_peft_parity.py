"""PEFT parity beyond plain LoRA, with peft itself as the oracle: SEQ_CLS adapters, tied heads,
DoRA, LoRA on embeddings, per-module ranks, several named adapters. Logits equal to 1e-5 in fp32."""

import copy
import json

import pytest
import torch

from minilora.adapter import adapter_classes, load_adapter, save_adapter
from minilora.lora import apply_lora
from minilora.weights import load_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
ENCODER_TARGETS = {"bert": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}


def randomize(model, seed=0, scale=0.1):
    """Random values in every trainable tensor (LoRA's B starts at zero: nothing would be compared)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def max_error(a, b, mask=MASK):
    if a.dim() == 3:  # (B, T, V): only the positions the mask keeps
        return (a - b)[mask.bool()].abs().max().item()
    return (a - b).abs().max().item()


def logits(model, peft=False):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK) if peft else model(IDS, attention_mask=MASK)
    return out.logits if peft else out


# --- 1. SEQ_CLS adapters: PEFT lists ["classifier", "score"] in modules_to_save -----------------------

@pytest.mark.parametrize("kind", list(ENCODER_TARGETS))
def test_seq_cls_adapter_from_peft_loads_with_its_classifier(saved_tiny, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny[kind]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                               target_modules=ENCODER_TARGETS[kind]))
    randomize(peft_model, seed=1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) >= {"classifier", "score"}  # "score" names nothing in an encoder
    classes = adapter_classes(tmp_path / "peft")
    assert classes == {"num_labels": hf.config.num_labels}  # PEFT writes no label names
    ours = load_adapter(load_model(folder, task="classification", **classes), tmp_path / "peft")
    assert ours.config.id2label == {str(i): n for i, n in hf.config.id2label.items()}  # the base's names kept
    assert max_error(logits(ours), logits(peft_model, peft=True)) <= 1e-5
    # and the other way: what minilora saves for this classifier loads in peft
    save_adapter(ours, tmp_path / "ours")
    from peft import PeftModel
    back = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert max_error(logits(back, peft=True), logits(ours)) <= 1e-5


def test_seq_cls_adapter_labels_from_a_config_beside_it(saved_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny["bert"]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    peft_model.save_pretrained(tmp_path / "peft")
    names = {"0": "sad", "1": "calm", "2": "glad"}
    (tmp_path / "peft" / "config.json").write_text(json.dumps({"id2label": names}))  # as a Trainer may save
    classes = adapter_classes(tmp_path / "peft")
    assert classes == {"id2label": {0: "sad", 1: "calm", 2: "glad"}}
    model = load_adapter(load_model(folder, task="classification", **classes), tmp_path / "peft")
    assert model.config.id2label == names


def test_score_in_modules_to_save_is_a_typo_on_a_language_model(saved_tiny):
    from minilora.errors import ConfigError
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(ConfigError, match="'score' matches no module"):
        apply_lora(load_model(folder), ["q_proj"], modules_to_save=["score"])
