"""Conversations: records of messages, the model's own chat template and the tokens the loss learns.
Oracles: transformers' apply_chat_template on the real SmolLM2 tokenizer and template (its text, its
ids, and its assistant-token mask for the same template with {% generation %} tags)."""

import json

import pytest
import torch
from minilora.data.chat import CHATML, render, tokenize_conversation
from minilora.data.records import IGNORE, build_examples, read_records
from minilora.errors import DataError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "And a colour?"},
     {"role": "assistant", "content": " Blue\n\n (really)"}],
    [{"role": "user", "content": "Zähl bis 3: 1, 2,"}, {"role": "assistant", "content": "3 — fertig. 🎉"}],
    [{"role": "assistant", "content": "Hi, I'm here."}, {"role": "user", "content": "ok"},  # the assistant first
     {"role": "assistant", "content": "Good."}],
]
# Qwen3's rule, reduced: a reasoning block before the answers after the last user message only, so a turn
# is written differently when it is last (in {% generation %} tags for transformers' assistant mask)
QWEN3_LIKE = ("{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
              "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
              "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
              "{%- if loop.index0 > ns.last %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
              "{% generation %}{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
              "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tokenizers(smollm2_path):
    """minilora's and transformers' tokenizers of the real SmolLM2 GGUF."""
    transformers = pytest.importorskip("transformers")
    from minilora.loading.tokenizer import load_tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return load_tokenizer(smollm2_path), theirs


def test_the_models_own_template_renders_as_transformers_does(tokenizers):
    """Text and ids equal transformers' apply_chat_template on the real template: its default system
    prompt when there is none, the generation prompt, non-ASCII text."""
    ours, theirs = tokenizers
    assert "You are a helpful AI assistant named SmolLM" in ours.chat_template
    for messages in CONVERSATIONS:
        for opened in (False, True):
            prompt = messages[:-1] if opened else messages
            text = ours.apply_chat_template(prompt, add_generation_prompt=opened)
            assert text == theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=opened)
            expected = theirs.apply_chat_template(prompt, tokenize=True, add_generation_prompt=opened,
                                                  return_dict=True)["input_ids"]
            assert ours.encode(text, add_special_tokens=False) == list(expected)
    assert ours.apply_chat_template(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful AI")


def test_exactly_the_assistant_contents_and_their_end_of_turn_tokens_are_learned(tokenizers):
    """Token by token against transformers' assistant mask, from the same template with the assistant's
    content and <|im_end|> inside {% generation %} tags (its rendering checked equal to the original)."""
    ours, theirs = tokenizers
    original = ours.chat_template
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"  # real newlines
    assert plain in original
    tagged = original.replace(plain, "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
                                     "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                                     "{{ '\\n' }}{% else %}" + plain + "{% endif %}")
    end = ours.token_to_id("<|im_end|>")
    for messages in CONVERSATIONS:
        assert render(tagged, messages) == render(original, messages)
        ids, learned = tokenize_conversation(ours, messages)
        out = theirs.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"]) and learned == [bool(m) for m in out["assistant_masks"]]
        ids, learned = tokenize_conversation(ours, messages)
        assert sum(learned) > 0 and all(ids[t - 1] == end for t in range(1, len(ids)) if learned[t - 1] and not learned[t])
        all_ids, everything = tokenize_conversation(ours, messages, train_on_all=True)
        assert all_ids == ids and all(everything)


@pytest.mark.parametrize("template", ["own", "qwen3-like"])
def test_learned_tokens_are_each_answer_and_its_end_of_turn(tokenizers, template):
    """Each run of learned tokens decodes to one assistant answer and its <|im_end|>, whatever the turn's
    place, also where a template writes the last answer differently (transformers' offset-based mask
    is off by a token on the Qwen3-like template after its reasoning block, so it is not the oracle here)."""
    ours, _ = tokenizers
    original = ours.chat_template
    ours.chat_template = original if template == "own" else QWEN3_LIKE
    try:
        for messages in CONVERSATIONS:
            ids, learned = tokenize_conversation(ours, messages)
            runs, run = [], []
            for i, keep in zip(ids, learned + [False]):
                if keep:
                    run.append(i)
                elif run:
                    runs.append(ours.decode(run, skip_special_tokens=False))
                    run = []
            if run:
                runs.append(ours.decode(run, skip_special_tokens=False))
            assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    finally:
        ours.chat_template = original


def test_conversation_records_in_every_form(tmp_path, tokenizers):
    """OpenAI `messages` and ShareGPT `conversations`, in JSONL, JSON and parquet, recognised with no
    template; the labels are the ids where the assistant's tokens are, IGNORE elsewhere."""
    ours, _ = tokenizers
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]],
                                    "value": m["content"]} for m in c]} for c in CONVERSATIONS]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    (tmp_path / "b.json").write_text(json.dumps(sharegpt))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.Table.from_pylist([{"messages": c} for c in CONVERSATIONS]), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        examples = build_examples(read_records(tmp_path / name), ours, cutoff=512)
        for e, messages in zip(examples, CONVERSATIONS):
            ids, learned = tokenize_conversation(ours, messages)
            assert e.input_ids == ids and e.labels == [i if k else IGNORE for i, k in zip(ids, learned)], name
    everything = build_examples(read_records(tmp_path / "a.jsonl"), ours, cutoff=512, train_on_prompt=True)
    assert all(e.labels == e.input_ids for e in everything)
    cut = build_examples(read_records(tmp_path / "a.jsonl"), ours, cutoff=20, truncation="left")
    assert all(len(e.input_ids) == 20 for e in cut)


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "robot", "content": "x"}]},
     r"a.jsonl, line 2: message 1 has role 'robot'; expected one of system, user, assistant"),
    ({"messages": []}, r"a.jsonl, line 2: 'messages' is empty"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
     r"line 2: message 2 has from 'bot'; expected one of system, human, user, gpt, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2: the conversation has no assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     r"line 2: message 2 \(assistant\) has content missing, expected text"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a"]}]},
     r"line 2: message 2 \(assistant\) has content list, expected text"),
    ({"messages": "hello"}, r"line 2: 'messages' is str; expected a list of messages"),
])
def test_a_bad_conversation_is_named_by_its_line(tmp_path, line, message):
    from minilora.loading.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HF
    from tokenizers import models
    tok = Tokenizer(HF(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]")), eos_token_id=1, chat_template=CHATML)
    good = {"messages": CONVERSATIONS[0]}
    (tmp_path / "a.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        build_examples(read_records(tmp_path / "a.jsonl"), tok)


def test_no_template_falls_back_to_chatml_and_says_so():
    from minilora.loading.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4, "hi": 5, "yo": 6}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(hf, eos_token_id=2)
    tok.source = "a-model-without-a-template"
    with pytest.warns(UserWarning, match="a-model-without-a-template has no chat template .* using ChatML"):
        ids, learned = tokenize_conversation(tok, [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}])
    assert ids == [1, 3, 5, 2, 1, 4, 6, 2] and learned == [False] * 6 + [True, True]
    assert render(CHATML, [{"role": "user", "content": "hi"}], True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_templates_run_sandboxed_and_their_errors_are_named():
    with pytest.raises(DataError, match="the chat template refused the conversation: .*unsafe|access"):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(DataError, match="the chat template refused the conversation: only user and assistant"):
        render("{{ raise_exception('only user and assistant') }}", [])
    with pytest.raises(DataError, match="the chat template is not valid Jinja \\(line 1"):
        render("{% for m in messages %}", [])
    assert render("{{ messages | tojson }}", [{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'


def test_chat_generation_uses_the_template_and_stops_at_the_end_of_turn(smollm2, tokenizers):
    """generate(chat=True): the prompt is the template's (default system prompt, generation prompt),
    the answer stops at <|im_end|> well before max_new_tokens, and a given system message replaces the default."""
    from minilora.generate import generate
    model, _ = smollm2
    ours, theirs = tokenizers
    seen = []
    forward = model.forward
    model.forward = lambda ids, *a, **k: (seen.append(ids[0].tolist()), forward(ids, *a, **k))[1]
    try:
        answer = generate(model, ours, "What is the capital of France?", max_new_tokens=40, chat=True)
    finally:
        del model.forward
    expected = theirs.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert seen[0] == list(expected)
    assert "Paris" in answer and len(seen) < 40
    with_system = ours.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}])
    assert "SmolLM" not in with_system and with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_a_recipe_of_conversations_trains_packed_through_the_cli(saved_tiny, tmp_path, capsys):
    """No template, conversations in the data, the model's chat template from tokenizer_config.json,
    packing on: the rows are packed, the assistant's words alone are learned, and `[generate] chat`
    and `generate --chat` write the prompt with the same template and stop at the end-of-turn token."""
    import re

    from conftest import write_recipe
    from minilora.cli import main
    recipe, model = write_recipe(saved_tiny, tmp_path, **{
        'template = { prompt = "{author} says", response = " {quote}" }\n': "packing = true\n",
        "[generate]\n": "[generate]\nchat = true\n", '"w5 says", "w9 says"': '"w5", "w9"'})
    # the tiny word-level vocabulary has w2 ... w96 and <eos>: the template writes the roles as w3/w4
    template = ("{% for m in messages %}{{ 'w2 ' + ('w3' if m['role'] == 'user' else 'w4') + ' ' + m['content'] + "
                "' <eos> ' }}{% endfor %}{% if add_generation_prompt %}{{ 'w2 w4 ' }}{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": template}))
    rows = [{"messages": [{"role": "user", "content": f"w{5 + i % 7} w{9 + i % 5}"},
                          {"role": "assistant", "content": " ".join(f"w{(i * 3 + j) % 80 + 10}" for j in range(4))}]}
            for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from minilora.loading.tokenizer import load_tokenizer
    tok = load_tokenizer(model)
    (e,) = build_examples(rows[:1], tok)
    assert tok.decode(e.input_ids) == "w2 w3 w5 w9 w2 w4 w10 w11 w12 w13"
    assert [tok.tk.id_to_token(i) for i in e.labels if i != IGNORE] == ["w10", "w11", "w12", "w13", "<eos>"]
    assert main(["train", str(recipe), "--train.max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"packed 20 training examples into \d+ rows of up to 16 tokens", out), out
    assert "=== w5" in out and "with the adapter" in out
    assert main(["generate", str(model), "--chat", "--prompt", "w5 w9", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(model), "--system", "w7", "--prompt", "w5"]) == 2
    assert "--system is a chat setting: add --chat" in capsys.readouterr().err


def test_records_are_read_one_by_one_and_template_errors_name_the_row(tmp_path):
    """Without a template each record is a conversation or a text; a record that is neither, and a
    conversation the template refuses, are named by their line; no ChatML tokens and no template: refused."""
    from minilora.loading.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4, "hi": 5, "yo": 6, "<eos>": 7}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>", "<eos>"])
    strict = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}" \
             "{% endif %}{{ m.role + ' ' + m.content + ' <|im_end|> ' }}{% endfor %}"
    tok = Tokenizer(hf, eos_token_id=7, chat_template=strict)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, {"text": "hi yo"},
            {"messages": [{"role": "system", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, {"texts": "hi"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(tmp_path / "a.jsonl")
    chat, text = build_examples(records[:2], tok)
    assert [tok.tk.id_to_token(i) for i in chat.labels if i != IGNORE] == ["yo", "<|im_end|>"]
    assert text.labels == text.input_ids == [5, 6, 7]  # the text template, the prompt (none) learned
    with pytest.raises(DataError, match=r"a.jsonl, line 3: the chat template refused the conversation: no system messages"):
        build_examples(records, tok)
    with pytest.raises(DataError, match=r"a.jsonl, line 4: neither a conversation \(messages or conversations\) nor a text field"):
        build_examples(records[3:], tok)
    assert len(build_examples(records, tok, skip_bad_rows=True)) == 2
    bare = Tokenizer(HF(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")), eos_token_id=1)
    bare.source = "tiny-model"
    with pytest.raises(DataError, match="tiny-model has no chat template .* and no ChatML tokens"):
        build_examples(records[:1], bare)


def test_system_without_chat_is_refused(tmp_path):
    from minilora.errors import ConfigError
    from minilora.generate import generate
    from minilora.recipe import GenerateSection
    with pytest.raises(ConfigError, match="system is a chat setting"):
        generate(torch.nn.Linear(1, 1), None, "hi", system="be brief")
    with pytest.raises(ConfigError, match="system: a chat setting; set chat = true too"):
        GenerateSection(prompts=["hi"], system="be brief")
