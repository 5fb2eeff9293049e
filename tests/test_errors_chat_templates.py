"""Chat templates read from where transformers writes them, run within a budget, and their failures
named: every way a template can go wrong reaches the user as a DataError or ConfigError that names the
template's file and what failed, never as a raw exception or a hang.

Oracles: transformers (a tokenizer saved by its save_pretrained, and its apply_chat_template and
assistant-token mask); for the speed of the learned-token finder, the per-turn definition it replaces
(each assistant turn rendered and tokenized again), which it must agree with token for token."""

import contextlib
import json
import signal
import warnings

import jinja2
import pytest
import torch
from minilora.data import chat, templates
from minilora.data.chat import render, tokenize_conversation
from minilora.data.records import build_examples, read_records
from minilora.errors import CheckpointError, ConfigError, DataError
from minilora.loading.tokenizer import Tokenizer, load_tokenizer
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, pre_tokenizers, trainers

CORPUS = ["Hello! How can I help you today?", "Name a fruit. Apple. And a colour? Blue, really.",
          "Zähl bis 3: 1, 2, 3 — fertig. 🎉", "The capital of France is Paris; of Italy, Rome.",
          "system user assistant: you answer in one word, 42 times.", "  spaces\n\n and\tnewlines\n"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "And a colour?"},
     {"role": "assistant", "content": " Blue\n\n (really)"}],
    [{"role": "user", "content": "Zähl bis 3: 1, 2,"}, {"role": "assistant", "content": "3 — fertig. 🎉"}],
    [{"role": "assistant", "content": "Hi, I'm here."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "and?"}, {"role": "assistant", "content": " \n"}],
]
# a default system prompt with non-ASCII text, the BOS token, trimmed contents, the generation prompt
TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are kind — très.<|im_end|>\n"
            "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML = chat.CHATML
# ChatML with the assistant's content and end of turn in {% generation %} tags, for transformers' mask
TAGGED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
          "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}")


class Hung(BaseException):
    """Raised by `seconds` when its time is up (a BaseException, so no `except Exception` swallows it)."""


@contextlib.contextmanager
def seconds(limit: float):
    """Fail instead of hanging: a pure-Python loop (a template's) is interrupted after `limit` seconds."""
    def fire(*_):
        raise Hung(f"still running after {limit} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2's kind) trained here, with ChatML's tokens as special tokens."""
    tk = HF(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    return tk.to_str()


def ours_of(bpe: str, template: str | None = CHATML) -> Tokenizer:
    tk = HF.from_str(bpe)
    return Tokenizer(tk, eos_token_id=tk.token_to_id("<|im_end|>"), bos_token_id=tk.token_to_id("<s>"),
                     chat_template=template)


def saved_by_transformers(bpe: str, folder, template):
    """The tokenizer with `template`, written by transformers' save_pretrained and read back by it."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=HF.from_str(bpe), bos_token="<s>",
                                                  eos_token="<|im_end|>", chat_template=template)
    theirs.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_folder(saved_tiny, tmp_path, template: str | None = None):
    """The tiny Llama with a word-level tokenizer (w2 ... w96, <eos>), its template in chat_template.jinja."""
    from conftest import tiny_model_with_tokenizer
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


WORDS = ("{% for m in messages %}{{ 'w2 ' + ('w3' if m['role'] == 'user' else 'w4') + ' ' + m['content'] + ' <eos> ' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ 'w2 w4 ' }}{% endif %}")


# ---------------------------------------------------------------------------------------------
# 1. chat_template.jinja (transformers 5), tokenizer_config.json, chat_template.json

def test_a_template_saved_by_transformers_5_renders_as_transformers_renders_it(bpe, tmp_path):
    """save_pretrained writes the template to chat_template.jinja (and not to tokenizer_config.json):
    it is read, with no "has no chat template" warning, and every conversation's text and ids are
    transformers' own."""
    theirs = saved_by_transformers(bpe, tmp_path, TEMPLATE)
    assert (tmp_path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_tokenizer(tmp_path)
        assert ours.chat_template == theirs.chat_template == TEMPLATE
        for messages in CONVERSATIONS:
            for opened in (False, True):
                text = ours.apply_chat_template(messages, add_generation_prompt=opened)
                assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=opened)
                expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=opened,
                                                      return_dict=True)["input_ids"]
                assert ours.encode(text, add_special_tokens=False) == list(expected)
    assert str(tmp_path / "chat_template.jinja") in chat.template_source(ours)


@pytest.mark.parametrize("files, used", [
    ({"chat_template.jinja": "JINJA", "tokenizer_config.json": {"chat_template": "CONFIG"}}, "JINJA"),
    ({"chat_template.jinja": "JINJA", "chat_template.json": {"chat_template": "LEGACY"}}, "JINJA"),
    ({"tokenizer_config.json": {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                                  {"name": "default", "template": "CONFIG"}]}}, "CONFIG"),
    ({"tokenizer_config.json": {"chat_template": "CONFIG"}, "chat_template.json": {"chat_template": "LEGACY"}}, "CONFIG"),
])
def test_the_template_is_taken_from_where_transformers_takes_it(bpe, tmp_path, files, used):
    """chat_template.jinja before tokenizer_config.json's chat_template (a text, or a list whose
    "default" is used), as transformers' tokenizer loading orders them."""
    transformers = pytest.importorskip("transformers")
    saved_by_transformers(bpe, tmp_path, None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name, content in files.items():
        if name == "tokenizer_config.json":
            (tmp_path / name).write_text(json.dumps({**config, **content}))
        else:
            (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template
    assert load_tokenizer(tmp_path).chat_template == used == (theirs["default"] if isinstance(theirs, dict) else theirs)


def test_a_legacy_chat_template_json_alone_is_read_and_bad_files_are_named(bpe, tmp_path):
    """chat_template.json ({"chat_template": ...}, as processors wrote it) is read where nothing else
    gives a template; a template file that cannot be read is a CheckpointError naming it."""
    saved_by_transformers(bpe, tmp_path, None)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == TEMPLATE and "chat_template.json" in chat.template_source(tok)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(CheckpointError, match=r"chat_template.json: chat_template is int, expected Jinja text"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"chat_template.json: expected a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.json").unlink()
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: not UTF-8 text"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. Any exception a template raises is a named error

FAILING = {
    "ZeroDivisionError": "{% for m in messages %}\n{{ 1 / 0 }}{% endfor %}",
    "TypeError": "{% for m in messages %}\n{{ m['content'] + 1 }}{% endfor %}",
    "RecursionError": "{% macro f(n) %}\n{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "OverflowError": "{% for m in messages %}\n{{ 10 ** 400 * 1.0 }}{% endfor %}",
}


@pytest.mark.parametrize("kind", FAILING)
def test_an_exception_in_a_template_is_a_data_error_naming_it(kind):
    with seconds(20), pytest.raises(DataError, match=rf"the chat template failed on the conversation: {kind}\b.*"
                                                     r"line 2 of the template; template: my-template"):
        render(FAILING[kind], CONVERSATIONS[0], source="my-template")


def test_template_failures_are_named_through_training_data_generate_and_the_cli(saved_tiny, tmp_path, capsys):
    """The same failure through build_examples (the file and line), generate(chat=True) (the prompt) and
    `minilora generate --chat` (one line, exit status 2), each naming the template's file."""
    from minilora.cli import main
    from minilora.generate import generate
    from minilora.loading.weights import load_model
    folder = tiny_folder(saved_tiny, tmp_path, "{% for m in messages %}{{ 'w2 ' + m['content'] }}{% endfor %}{{ 1 / 0 }}")
    tok, model = load_tokenizer(folder), load_model(folder)
    rows = [{"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = str(folder / "chat_template.jinja")
    with pytest.raises(DataError) as e:
        build_examples(read_records(tmp_path / "a.jsonl"), tok)
    assert str(e.value).startswith(f"{tmp_path / 'a.jsonl'}, line 1: the chat template failed on the conversation: "
                                   "ZeroDivisionError: division by zero") and str(e.value).endswith(template)
    with pytest.raises(DataError, match=r"^prompt 0 \('w5'\): the chat template failed on the conversation: "
                                        r"ZeroDivisionError") as e:
        generate(model, tok, "w5", max_new_tokens=2, chat=True)
    assert str(e.value).endswith(template)
    tok.chat_template = "{% if messages[-1]['content'] == 'w7' %}{{ 1 / 0 }}{% endif %}w2 w3 {{ messages[-1]['content'] }}"
    with pytest.raises(DataError, match=r"^prompt 1 \('w7'\): the chat template failed on the conversation: "
                                        r"ZeroDivisionError: division by zero, at line 1 of the template; "
                                        r"template: the tokenizer's chat_template \(set in code\)$"):
        generate(model, tok, ["w5", "w7"], max_new_tokens=2, chat=True)
    assert main(["generate", str(folder), "--chat", "--prompt", "w5", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora generate: error: prompt 0 ('w5'): the chat template failed on the conversation: "
                          "ZeroDivisionError") and template in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 3. A budget for the work of a rendering

@pytest.mark.parametrize("template, what", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops ran more than"),
    ("{% for a in messages[0]['content'] %}{% for b in messages[0]['content'] %}{% for c in messages[0]['content'] %}"
     "{% endfor %}{% endfor %}{% endfor %}", "loops ran more than"),
    ("{% for i in range(100001) %}{% endfor %}", "range"),
    ("{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}", "characters"),
    ("{% macro m() %}{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}{% endmacro %}{{ m()|length }}",
     "characters"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
     "characters"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}", "characters"),
    ("{{ 'x' * 10 ** 10 }}", "characters"),
    ("{{ 10 ** 1000000000 }}", "bits"),
    ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
])
def test_a_template_that_does_too_much_work_is_stopped_with_a_named_error(template, what):
    """Nested loops, huge ranges, output, strings, numbers: refused within a second or two, not hung."""
    messages = [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y"}]
    with seconds(20), pytest.raises(DataError, match=rf"the chat template did too much work on the conversation: "
                                                     rf".*{what}.*; template: t\.jinja"):
        render(template, messages, source="t.jinja")


def test_a_template_that_runs_past_its_time_is_stopped(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.2)
    busy = "{% for i in range(100000) %}{% for m in messages %}{{ m['role'] | length }}{% endfor %}{% endfor %}"
    with seconds(20), pytest.raises(DataError, match=r"did too much work on the conversation: it ran for more than "
                                                     r"0.2 seconds"):
        render(busy, CONVERSATIONS[1])


def test_the_budget_stops_a_dataset_row_and_names_it(tmp_path, bpe):
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    tok = ours_of(bpe, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with seconds(20), pytest.raises(DataError, match=r"a.jsonl, line 1: the chat template did too much work"):
        build_examples(read_records(tmp_path / "a.jsonl"), tok)


def test_the_budget_leaves_real_templates_alone(bpe):
    """Loops over messages, recursion into the conversation, {% break %}: rendered as jinja2 renders them."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    template = ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = "
                "loop.index0 %}{% endif %}{% endfor %}{% for m in messages if m.content is string %}"
                "{% if loop.index > 40 %}{% break %}{% endif %}{{ loop.index }}/{{ loop.length }} {{ m.role }}: "
                "{{ m.content | trim }}{% if loop.index0 > ns.last %}!{% endif %}\n{% endfor %}"
                "{% for i in range(messages|length - 1, -1, -1) %}{{ messages[i].role[0] }}{% endfor %}")
    long = [{"role": ("user", "assistant")[i % 2], "content": f" turn {i} "} for i in range(60)]
    for messages in [*CONVERSATIONS, long]:
        assert render(template, messages) == env.from_string(template).render(messages=messages)


# ---------------------------------------------------------------------------------------------
# 4. A template that does not write the assistant's turns

@pytest.mark.parametrize("file", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_template_that_never_writes_the_assistant_says_so(saved_tiny, tmp_path, file):
    """Not "the assistant's turns were cut off in every record": nothing was cut; the template (named by
    its file) writes the user's turns only."""
    only_users = "{% for m in messages %}{% if m['role'] == 'user' %}w2 w3 {{ m['content'] }} <eos> {% endif %}{% endfor %}"
    folder = tiny_folder(saved_tiny, tmp_path)
    write = {"chat_template.jinja": lambda t: (folder / file).write_text(t),
             "tokenizer_config.json": lambda t: (folder / file).write_text(json.dumps({"eos_token": "<eos>",
                                                                                        "chat_template": t}))}[file]
    write(only_users)
    rows = [{"messages": [{"role": "user", "content": f"w{5 + i}"}, {"role": "assistant", "content": "w9 w10"}]}
            for i in range(3)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        build_examples(read_records(data), load_tokenizer(folder), cutoff=64, source=str(data))
    message = str(e.value)
    named = folder / file if file.endswith(".jinja") else f"{folder / file}, chat_template"
    assert message.startswith(f"{data}: the chat template ({named}) does not write the assistant's content: its text "
                              f"for {data}, line 1 is the same whatever the assistant says"), message
    assert "nothing to learn" in message and "cut off" not in message
    write(WORDS)  # one that writes them, and a cutoff that cuts them
    with pytest.raises(DataError, match=r"the assistant's turns were cut off in every record"):
        build_examples(read_records(data), load_tokenizer(folder), cutoff=3)


# ---------------------------------------------------------------------------------------------
# 5. The learned tokens of a long conversation: work in proportion to its length

def long_conversation(turns: int) -> list[dict[str, str]]:
    words = ["Hello!", " Blue", "3 — fertig. 🎉", "  spaces\n\n", "42", "Paris; of Italy, Rome.", "", "\n"]
    return [{"role": "system", "content": "You answer."}] + [
        {"role": ("user", "assistant")[t % 2], "content": f"{words[t % len(words)]} {t}" if t % 5 else words[t % 8]}
        for t in range(turns)]


def by_rendering(tokenizer, messages):
    """The definition: each assistant turn's content replaced, the whole conversation rendered and
    tokenized again, the ids compared (what tokenize_conversation did per turn before)."""
    return chat._learned_by_rendering(tokenizer, messages)


class Counting:
    """Delegates to a `tokenizers` Tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tk):
        self.tk, self.chars, self.calls = tk, 0, 0

    def encode(self, text, *args, **kwargs):
        self.chars, self.calls = self.chars + len(text), self.calls + 1
        return self.tk.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tk, name)


def test_a_long_conversation_is_tokenized_with_work_linear_in_its_length(bpe, monkeypatch):
    """Renders and encoded characters, counted through the public path: 400 turns take about 10x the
    work of 40 (the per-turn finder took 100x: it rendered and tokenized the whole conversation 3 times
    per assistant turn)."""
    renders = []
    generate = jinja2.Template.generate
    monkeypatch.setattr(jinja2.Template, "generate", lambda self, *a, **k: (renders.append(1), generate(self, *a, **k))[1])
    render_all = jinja2.Template.render
    monkeypatch.setattr(jinja2.Template, "render", lambda self, *a, **k: (renders.append(1), render_all(self, *a, **k))[1])
    work = {}
    for turns in (40, 400):
        tok = ours_of(bpe)
        tok.tk = Counting(tok.tk)
        renders.clear()
        ids, learned = tokenize_conversation(tok, long_conversation(turns))
        work[turns] = (len(renders), tok.tk.chars, len(ids))
    assert work[400][0] == work[40][0] <= 4, work
    assert work[400][1] < 15 * work[40][1], work
    assert work[400][2] > 9 * work[40][2]


@pytest.mark.parametrize("template", ["chatml", "tagged", "words", "qwen3-like", "content-trimmed"])
def test_the_fast_finder_learns_exactly_the_tokens_the_per_turn_definition_learns(bpe, template):
    from test_chat import QWEN3_LIKE
    templates = {"chatml": CHATML, "tagged": TAGGED, "qwen3-like": QWEN3_LIKE, "content-trimmed": TEMPLATE,
                 "words": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}
    tok = ours_of(bpe, templates[template])
    for messages in [*CONVERSATIONS, long_conversation(61),
                     [{"role": "user", "content": "<|im_end|> x"}, {"role": "assistant", "content": "a<|im_start|>b<|im_end|>"},
                      {"role": "assistant", "content": "<|im_end|>"}]]:
        assert tokenize_conversation(tok, messages) == by_rendering(tok, messages), (template, messages)


def test_an_answer_that_starts_and_ends_with_the_replacement_characters_is_learned(bpe):
    """The stand-in for an answer is a character other than its first and last: "x ... y" left the
    letters "x" and "y" no choice, and a raw StopIteration escaped from the finder."""
    tok = ours_of(bpe)
    for content in ["x, y", "0 to 1", "! and ?", "xy", "y x"]:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
        ids, learned = tokenize_conversation(tok, messages)
        assert tok.decode([i for i, k in zip(ids, learned) if k], skip_special_tokens=False) == content + "<|im_end|>"
        assert (ids, learned) == by_rendering(tok, messages)


def test_the_fast_finder_matches_transformers_assistant_mask_on_a_long_conversation(bpe, tmp_path):
    """transformers' {% generation %} mask over 101 turns (and the per-turn definition)."""
    theirs = saved_by_transformers(bpe, tmp_path, TAGGED)
    ours = load_tokenizer(tmp_path)
    messages = [{"role": ("user", "assistant")[t % 2], "content": f"turn {t}: Hello! How can I help?"} for t in range(101)]
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, learned = tokenize_conversation(ours, messages)
    assert ids == list(out["input_ids"]) and learned == [bool(m) for m in out["assistant_masks"]]
    assert (ids, learned) == by_rendering(ours, messages)


def test_the_fast_finder_agrees_on_the_real_smollm2_template(smollm2_path):
    """SmolLM2's own template and tokenizer (its default system prompt), 200 turns."""
    tok = load_tokenizer(smollm2_path)
    messages = long_conversation(200)[1:]
    assert tokenize_conversation(tok, messages) == by_rendering(tok, messages)


# ---------------------------------------------------------------------------------------------
# 6. Another model's tokenizer

def test_generate_and_classify_refuse_a_tokenizer_with_more_tokens_than_the_model_has_rows(saved_tiny, tmp_path):
    """200 tokens for 97 embedding rows: refused as the recipe refuses it, although "w5 w6" has ids that fit."""
    from minilora.generate import check_vocabulary, classify, generate
    from minilora.loading.weights import load_model
    folder = tiny_folder(saved_tiny, tmp_path)
    model = load_model(folder)
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 200)}}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    other = Tokenizer(hf, eos_token_id=1)
    assert max(other.encode("w5 w6")) < 97
    message = r"the tokenizer has 200 tokens but the model's embeddings only 97 rows: they do not belong together"
    with pytest.raises(ConfigError, match=rf"{folder}: {message}"):
        generate(model, other, "w5 w6", max_new_tokens=2)
    with pytest.raises(ConfigError, match=message):
        classify(load_model(saved_tiny["bert"][1]), other, ["w5 w6"])
    with pytest.raises(ConfigError, match=rf"^my-model: {message}"):
        check_vocabulary(model, other, "my-model")
    check_vocabulary(model, load_tokenizer(folder), "my-model")  # its own: 97 tokens
    assert isinstance(generate(model, load_tokenizer(folder), "w5 w6", max_new_tokens=2), str)
    with torch.no_grad():
        assert len(classify(load_model(saved_tiny["bert"][1]), load_tokenizer(folder), ["w5"])) == 1
