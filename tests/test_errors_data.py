"""Bad dataset files, records, templates and labels get the project's own error naming the file, line,
field or example at fault, never a raw traceback or silently wrong examples (minilora/data)."""

import json
import re

import pytest
from conftest import Tok, tiny_model_with_tokenizer
from minilora.data.records import Example, build_examples, label_ids, read_records
from minilora.errors import DataError

# ---------------------------------------------------------------------------------------------
# Dataset files


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("text,text\nw5,w6\n")
    with pytest.raises(DataError, match=r"d\.csv, line 1: column 'text' appears twice in the header"):
        read_records(tmp_path / "d.csv")


def test_a_json_file_holding_one_object_is_refused(tmp_path):
    (tmp_path / "o.json").write_text('{\n  "text": "w5"\n}\n')
    with pytest.raises(DataError, match=r"o\.json: one JSON object; expected a list of records"):
        read_records(tmp_path / "o.json")


def test_a_txt_file_is_refused_naming_the_formats_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: a \.txt file; datasets are read from \.json, \.jsonl, \.csv"):
        read_records(tmp_path / "notes.txt")


def test_a_dataset_file_with_an_upper_case_extension_is_read(tmp_path):
    (tmp_path / "UP.JSONL").write_text('{"text": "w5"}\n')
    assert [dict(r) for r in read_records(tmp_path / "UP.JSONL")] == [{"text": "w5"}]


def test_a_dataset_folder_leaves_out_notebook_checkpoints(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "w5"}\n')
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "data" / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text('{"text": "old"}\n')
    assert [dict(r) for r in read_records(tmp_path / "data")] == [{"text": "w5"}]


def test_jsonl_lines_end_at_newline_only(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    assert [r["text"] for r in read_records(tmp_path / "a.jsonl")] == ["one\u2028two", "three"]


def test_an_unclosed_csv_quote_is_refused_naming_its_line(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"a review\nover two lines",1\nshort,0\n"broken,1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv, line 5: not valid CSV \(unexpected end of data\)"):
        read_records(tmp_path / "a.csv")  # an unclosed quote would otherwise swallow every later row


def test_a_csv_row_with_more_fields_than_the_header_is_refused_naming_its_line(tmp_path):
    (tmp_path / "c.csv").write_text("text,label\nshort,0\nextra,1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.csv, line 3: the record's fields do not match the header's 2 columns"):
        read_records(tmp_path / "c.csv")


def test_csv_keeps_multi_line_fields_and_the_line_each_record_starts_on(tmp_path):
    (tmp_path / "b.csv").write_text('text,label\n"a review\nover two lines",1\nshort,0\n', encoding="utf-8")
    rows = read_records(tmp_path / "b.csv")
    assert [dict(r) for r in rows] == [{"text": "a review\nover two lines", "label": "1"}, {"text": "short", "label": "0"}]
    assert [r.where.rsplit(", ", 1)[1] for r in rows] == ["line 2", "line 4"]


def test_data_errors_name_the_line_whatever_the_split_did(tmp_path):
    from minilora.data.records import split
    lines = [json.dumps({"author": f"a{i}", "quote": f"q{i}"}) for i in range(20)]
    lines[12] = json.dumps({"author": "a12"})  # line 13 of the file lacks its quote
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    train_rows, val_rows = split(read_records(tmp_path / "q.jsonl"), 0.25, seed=1)
    bad = train_rows if any("quote" not in r for r in train_rows) else val_rows

    class Words:
        eos_token_id = 1
        def encode(self, text, add_special_tokens=True):
            return [2] * len(text.split())
    with pytest.raises(DataError, match=r"q\.jsonl, line 13: missing field 'quote' \(the record has: author\)"):
        build_examples(bad, Words(), "quotes")


# ---------------------------------------------------------------------------------------------
# Splits, templates, cutoffs

def test_a_negative_val_size_is_refused():
    from minilora.data.records import split
    rows = [{"text": "w5", "label": "--1"}, {"text": "w6", "label": "1"}]
    with pytest.raises(DataError, match=r"val_size must be a fraction in \[0, 1\) or a count >= 0, got -3"):
        split(rows, -3)


@pytest.mark.parametrize("template, words", [
    pytest.param(dict(prompt="{author:d}", response=" {quote}"), "Unknown format code 'd'", id="format-code"),
    pytest.param(dict(prompt="{author!z}", response=" {quote}"), "Unknown conversion specifier z", id="conversion"),
    pytest.param(dict(prompt="{a}", response="{b}", extra="{c}"), "unknown: extra", id="unknown-key"),
])
def test_a_template_with_a_bad_format_or_an_unknown_key_is_refused(template, words):
    from minilora.data.records import get_template
    with pytest.raises(DataError, match=re.escape(words)):
        get_template(template)


def test_a_cutoff_that_is_not_a_whole_number_of_tokens_is_refused():
    with pytest.raises(DataError, match=r"cutoff must be a positive number of tokens, got 1\.5"):
        build_examples([{"text": "a"}], Tok, "text", cutoff=1.5)


def eosless_tokenizer(saved_tiny, tmp_path):
    """The tiny word-level tokenizer with no end-of-sequence token named anywhere."""
    from minilora.loading.tokenizer import load_tokenizer
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (folder / "tokenizer_config.json").write_text("{}")  # no eos token named anywhere
    (folder / "config.json").write_text(json.dumps({k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                                    if k not in ("eos_token_id", "bos_token_id")}))
    return load_tokenizer(folder)


def test_building_examples_with_a_tokenizer_without_an_eos_token_is_refused(saved_tiny, tmp_path):
    tok = eosless_tokenizer(saved_tiny, tmp_path)
    if tok.eos_token_id is None:
        with pytest.raises(DataError, match="the tokenizer has no end-of-sequence token"):
            build_examples([{"text": "w5 w6"}], tok, "text", cutoff=8)


def quotes_tokenizer_and_rows(saved_tiny, tmp_path):
    from minilora.loading.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path))
    rows = [{"author": "w5 w6 w7 w8 w9 w10", "quote": "w11 w12"}, {"author": "w2 w3 w4 w5 w6 w7 w8", "quote": "w9"}]
    return tok, rows, {"prompt": "{author} says", "response": " {quote}"}


def test_a_dataset_with_no_token_to_learn_is_an_error_naming_the_cutoff_and_the_field(saved_tiny, tmp_path):
    tok, rows, template = quotes_tokenizer_and_rows(saved_tiny, tmp_path)
    with pytest.raises(DataError, match=r"quotes: no example has a token to learn after truncation to cutoff=5 tokens "
                                        r"and masking of the prompt \(train_on_prompt = false\): the response \(quote\) "
                                        r"was cut off in every record"):
        build_examples(rows, tok, template, cutoff=5, train_on_prompt=False, source="quotes")


def test_examples_whose_response_was_cut_off_are_kept_and_counted(saved_tiny, tmp_path):
    tok, rows, template = quotes_tokenizer_and_rows(saved_tiny, tmp_path)
    some = build_examples(rows, tok, template, cutoff=8, train_on_prompt=False)
    assert some.without_targets == 1 and len(some) == 2  # the second keeps its response; the first does not


# ---------------------------------------------------------------------------------------------
# Class labels

def test_text_labels_that_look_like_numbers_are_sorted_as_text():
    rows = [{"text": "w5", "label": "--1"}, {"text": "w6", "label": "1"}]
    assert label_ids(rows) == {"--1": 0, "1": 1}  # not numbers: sorted as text, no int() crash


def test_labels_naming_a_class_twice_are_refused():
    with pytest.raises(DataError, match=r"labels \['pos', 'neg', 'pos'\] name a class twice"):
        label_ids([], labels=["pos", "neg", "pos"])


def test_a_label_that_is_not_one_of_the_classes_is_refused(saved_tiny, tmp_path):
    from minilora.data.records import build_classification_examples
    tok = eosless_tokenizer(saved_tiny, tmp_path)
    with pytest.raises(DataError, match=r"label 'x' is not one of 0, 1"):
        build_classification_examples([{"text": "w5", "label": "x"}], tok, {"0": 0, "1": 1})


# ---------------------------------------------------------------------------------------------
# Batching

def test_collating_no_examples_is_refused():
    from minilora.data.batching import collate
    with pytest.raises(DataError, match="no examples to collate"):
        collate([], 0)


def test_an_example_with_more_input_ids_than_labels_is_refused():
    from minilora.data.batching import collate
    with pytest.raises(DataError, match="example 0 has 3 input ids but 2 labels"):
        collate([Example([1, 2, 3], [1, 2])], 0)
