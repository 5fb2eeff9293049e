"""The data pipeline on the real GPT-2 tokenizer: templates, truncation, masks, padding, bad rows."""

import json

import pytest
from minilora.data.batching import collate
from minilora.data.records import IGNORE, TEMPLATES, build_examples, read_records, split
from minilora.errors import DataError
from minilora.loading.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_path):
    return load_tokenizer(gpt2_tokenizer_path)


def test_read_json_jsonl_csv(tmp_path):
    rows = [{"author": "A", "quote": "x, \"y\""}, {"author": "B", "quote": "z"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "a.csv").write_text('\ufeffauthor,quote\nA,"x, ""y"""\nB,z\n', encoding="utf-8")
    for name in ("a.json", "a.jsonl", "a.csv"):
        assert read_records(tmp_path / name) == rows, name


def test_read_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl: no such file"):
        read_records(tmp_path / "nothing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: the dataset is empty"):
        read_records(tmp_path / "empty.json")


def test_quotes_template_and_eos(tok):
    (ex,) = build_examples([{"author": "Oscar Wilde", "quote": "I can resist everything except temptation."}],
                           tok, "quotes", cutoff=64)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == \
        'Quote by Oscar Wilde: "I can resist everything except temptation."<|endoftext|>'
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels == ex.input_ids


def test_alpaca_templates_with_and_without_input_and_prompt_masking(tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    with_input, without = build_examples(rows, tok, "alpaca", cutoff=256, train_on_prompt=False)
    text = tok.decode(with_input.input_ids)
    assert "### Input:\n2 and 3\n\n### Response:\n5" in text and "paired with an input" in text
    assert "### Input" not in tok.decode(without.input_ids)
    prompt_len = len(tok.encode(TEMPLATES["alpaca"].prompt_no_input.format(instruction="Say hi.")))
    assert without.labels[:prompt_len] == [IGNORE] * prompt_len
    assert without.labels[prompt_len:] == without.input_ids[prompt_len:]
    assert tok.decode(without.input_ids[prompt_len:], skip_special_tokens=False) == "Hi!<|endoftext|>"


def test_truncation_sides_and_refusal(tok):
    row = [{"text": "one two three four five six seven eight nine ten"}]
    full = build_examples(row, tok, "text", cutoff=100)[0].input_ids
    right = build_examples(row, tok, "text", cutoff=5)[0].input_ids
    left = build_examples(row, tok, "text", cutoff=5, truncation="left")[0].input_ids
    assert right == full[:5] and left == full[-5:] and left[-1] == tok.eos_token_id
    with pytest.raises(DataError, match=r"data.jsonl, row 1: 11 tokens, longer than the cutoff of 5"):
        build_examples(row, tok, "text", cutoff=5, truncation="none", source="data.jsonl")


def test_malformed_rows_named_or_skipped(tok):
    rows = [{"author": "A", "quote": "fine"}, {"author": "B"}, {"author": None, "quote": "q"}, {"author": "C", "quote": "ok"}]
    with pytest.raises(DataError, match=r"quotes.jsonl, row 2: missing field 'quote' \(the record has: author\)"):
        build_examples(rows, tok, "quotes", source="quotes.jsonl")
    with pytest.raises(DataError, match=r"q, row 2: field 'author' is null, expected text"):
        build_examples([rows[0], rows[2]], tok, "quotes", source="q")
    kept = build_examples(rows, tok, "quotes", skip_bad_rows=True)
    assert len(kept) == 2 and kept.skipped == 2
    with pytest.raises(DataError, match="no usable records"):
        build_examples(rows[1:3], tok, "quotes", skip_bad_rows=True)


def test_collate_dynamic_and_fixed_padding_with_pad_equal_to_eos(tok):
    exs = build_examples([{"text": "a b c d e"}, {"text": "a"}], tok, "text", cutoff=32)
    batch = collate(exs, tok.pad_token_id)
    assert tok.pad_token_id == tok.eos_token_id
    assert batch["input_ids"].shape == (2, len(exs[0].input_ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(exs[0].input_ids) - 2)
    assert batch["labels"][1, 1].item() == tok.eos_token_id   # the real EOS is learned ...
    assert (batch["labels"][1, 2:] == IGNORE).all()           # ... the padding (same id) is not
    fixed = collate(exs, tok.pad_token_id, pad_to=16)
    assert fixed["input_ids"].shape == (2, 16)
    left = collate(exs, tok.pad_token_id, side="left")
    assert left["attention_mask"][1, -2:].tolist() == [1, 1] and left["attention_mask"][1, 0] == 0


def test_split_is_seeded_and_disjoint():
    records = [{"i": i} for i in range(50)]
    train, val = split(records, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert {r["i"] for r in train}.isdisjoint({r["i"] for r in val})
    assert split(records, 0.2, seed=3) == (train, val) and split(records, 0.2, seed=4) != (train, val)
    assert len(split(records, 7)[1]) == 7
    with pytest.raises(DataError):
        split(records, 50)


def test_split_by_holds_out_whole_groups_and_is_the_plain_split_without_one():
    """split_by: every record of a held-out group is held out (val_size counts groups), so no held-out
    instruction is ever trained on; without it the split is the seeded one it always was."""
    import random
    rows = [{"instruction": f"i{k}", "n": n} for k in range(10) for n in range(k % 4 + 1)]
    train, held = split(rows, 3, seed=5, by="instruction")
    assert len({r["instruction"] for r in held}) == 3
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}
    assert sorted(map(str, train + held)) == sorted(map(str, rows))
    for r in held:  # the whole group
        assert sum(x["instruction"] == r["instruction"] for x in held) == \
            sum(x["instruction"] == r["instruction"] for x in rows)
    order = list(range(len(rows)))
    random.Random(5).shuffle(order)
    assert split(rows, 4, seed=5) == ([rows[i] for i in order[4:]], [rows[i] for i in order[:4]])
    with pytest.raises(DataError, match=r"record 1 has no field 'prompt' to split by \(split_by\)"):
        split(rows, 3, by="prompt")
    with pytest.raises(DataError, match=r"val_size=10 leaves no training groups of 'instruction' out of 10"):
        split(rows, 10, by="instruction")


def test_a_recipe_holds_out_by_instruction_and_draws_eval_limit_across_the_groups(tmp_path):
    from minilora.recipe import _read_records, load_recipe
    rows = [{"instruction": f"i{k}", "prompt": "p", "chosen": "a", "rejected": "b"} for k in range(30) for _ in range(5)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.toml").write_text('[model]\nname = "gpt2"\n[data]\ntrain = "pairs.jsonl"\nval_size = 6\n'
                                     'split_by = "instruction"\neval_limit = 12\nlimit = 40\n')
    train, held, _ = _read_records(load_recipe(tmp_path / "r.toml").data)
    assert len(train) == 40 and len(held) == 12 and len({r["instruction"] for r in held}) > 2
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}
