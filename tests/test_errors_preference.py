"""The bad preference inputs each part refuses, by name: missing fields, chosen equal to rejected, an
empty completion, a conversation without an assistant turn, a pair that truncation would leave
without a completion; an unknown objective or loss type, a reference adapter that does not exist."""

import pytest
from conftest import lora_model, tiny_model_with_tokenizer

from minilora.data.preferences import build_pairs
from minilora.data.records import Record
from minilora.errors import ConfigError, DataError
from minilora.loading.tokenizer import load_tokenizer
from minilora.training.config import TrainConfig
from minilora.training.loop import train
from minilora.training.objectives import DPO


@pytest.fixture
def tok(saved_tiny, tmp_path):
    return load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path))


GOOD = {"prompt": "w5 w6", "chosen": " w7", "rejected": " w8"}


@pytest.mark.parametrize("record,message", [
    ({"prompt": "w5", "chosen": " w7"}, "rejected missing"),
    ({"chosen": " w7", "rejected": " w8"}, "prompt missing"),
    ({"prompt": "w5", "chosen": " w7", "rejected": " w7"}, "chosen and rejected are the same"),
    ({"prompt": "w5", "chosen": "  ", "rejected": " w8"}, "chosen is empty"),
    ({"prompt": [{"role": "user", "content": "w5"}], "chosen": [{"role": "user", "content": "w7"}],
      "rejected": [{"role": "assistant", "content": "w8"}]}, "no assistant message"),
    ({"prompt": "w5", "chosen": [{"role": "assistant", "content": "w7"}], "rejected": " w8"}, "of one kind"),
])
def test_bad_pairs_are_named_with_their_row(tok, record, message):
    with pytest.raises(DataError, match=message) as e:
        build_pairs([GOOD, Record(record, "pairs.jsonl, line 2")], tok)
    assert "pairs.jsonl, line 2" in str(e.value)


def test_a_pair_truncation_would_empty_is_refused(tok):
    long = {"prompt": " ".join(f"w{i}" for i in range(2, 12)), "chosen": " w40", "rejected": " w41"}
    with pytest.raises(DataError, match="row 1: the prompt's 10 tokens fill max_length=10"):
        build_pairs([long], tok, max_length=10)
    pair = build_pairs([long], tok, max_length=6, max_prompt_length=4)[0]  # the prompt cut from the left
    assert pair.prompt_ids == [8, 9, 10, 11] and pair.chosen_ids == [40, 1]


def test_completions_are_cut_from_the_right(tok):
    pair = build_pairs([{"prompt": "w5", "chosen": " w7 w8 w9", "rejected": " w10"}], tok, max_length=3)[0]
    assert pair.chosen_ids == [7, 8] and pair.rejected_ids == [10, 1]


@pytest.mark.parametrize("settings,message", [
    (dict(objective="kto"), "objective 'kto': expected one of"),
    (dict(loss_type="exo_pair"), "loss_type 'exo_pair'"),
    (dict(objective="orpo", reference_adapter="sft"), "reference_adapter is a setting of dpo"),
    (dict(label_smoothing=0.5), "label_smoothing must be in"),
])
def test_bad_objective_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_unknown_loss_type_in_the_objective_itself():
    with pytest.raises(ConfigError, match="DPO's loss types are sigmoid, ipo, hinge, robust"):
        DPO(loss_type="kto")


def test_a_reference_adapter_that_does_not_exist(saved_tiny, tok, tmp_path):
    pairs = build_pairs([GOOD], tok)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, progress=False, reference_adapter="sft")
    with pytest.raises(ConfigError, match="reference_adapter 'sft': no adapter of that name on the model"):
        train(lora_model(saved_tiny), None, pairs, None, cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_pairs_and_objectives_must_agree(saved_tiny, tok, tmp_path):
    from conftest import examples
    pairs = build_pairs([GOOD], tok)
    with pytest.raises(ConfigError, match="the data are preference pairs, but the objective is CausalLM"):
        train(lora_model(saved_tiny), None, pairs, None, TrainConfig(output_dir=str(tmp_path / "a"),
                                                                     objective="causal_lm", progress=False))
    with pytest.raises(DataError, match="DPO trains on preference pairs"):
        train(lora_model(saved_tiny), None, examples(4), None, TrainConfig(output_dir=str(tmp_path / "b"),
                                                                           objective="dpo", progress=False))
