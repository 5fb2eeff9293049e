"""Bad generation and classification arguments get the project's own error naming the argument and
what was expected, never a raw traceback, a NaN or a silently odd answer (minilora/generate.py)."""

import pytest
from conftest import tiny_model_with_tokenizer
from minilora.errors import ConfigError
from minilora.generate import classify, generate, generate_ids
from minilora.loading.weights import load_model


@pytest.fixture
def lm(saved_tiny, tmp_path):
    """The tiny Llama and its word-level tokenizer."""
    from minilora.loading.tokenizer import load_tokenizer
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    return load_model(folder), load_tokenizer(folder)


@pytest.fixture
def classifier(saved_tiny):
    """The tiny BERT classifier (3 classes)."""
    return load_model(saved_tiny["bert"][1])


# ---------------------------------------------------------------------------------------------
# generate() and generate_ids()

def test_a_stop_given_as_one_string_is_one_stop_string(lm):
    model, tok = lm
    assert generate(model, tok, "w5 w6", max_new_tokens=3, stop="w") == ""  # a string is one stop string


@pytest.mark.parametrize("stop, message", [
    pytest.param([""], r"stop strings must be non-empty text, got \[''\]", id="an-empty-string"),
    pytest.param(5, r"stop strings must be non-empty text, got 5", id="a-number"),
])
def test_stop_strings_that_are_not_non_empty_text_are_refused(lm, stop, message):
    model, tok = lm
    with pytest.raises(ConfigError, match=message):
        generate(model, tok, "w5", 3, stop=stop)


def test_prompts_that_are_not_text_are_refused(lm):
    model, tok = lm
    with pytest.raises(ConfigError, match="prompts must be a string or a list of strings, got None"):
        generate(model, tok, None)


def test_a_vanishing_temperature_samples_as_greedy_without_nan(lm):
    model, tok = lm
    out = generate(model, tok, "w5 w6", max_new_tokens=4, temperature=1e-300, seed=0)  # as greedy, no NaN
    assert out == generate(model, tok, "w5 w6", max_new_tokens=4)


def test_a_sampling_seed_beyond_64_bits_is_refused(lm):
    model, tok = lm
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        generate(model, tok, "w5", 3, temperature=1.0, seed=2 ** 70)


def test_a_prompt_and_max_new_tokens_past_the_context_are_refused(lm):
    model, _ = lm
    with pytest.raises(ConfigError, match=r"a prompt of 3 tokens and max_new_tokens=2048 run past the model's context"):
        generate_ids(model, [[5, 6, 7]], [1], 0, max_new_tokens=2048)


def test_generating_with_a_classifier_is_refused(lm, classifier):
    _, tok = lm
    with pytest.raises(ConfigError, match=r"BertForSequenceClassification does not generate text"):
        generate(classifier, tok, "w5")


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5",
                 id="negative-temperature"),
    pytest.param(dict(temperature=float("nan")), "temperature must be a finite number >= 0", id="nan-temperature"),
    pytest.param(dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0", id="zero-top-p"),
    pytest.param(dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5", id="top-p-above-one"),
    pytest.param(dict(temperature=1.0, top_k=0), "top_k must be a positive integer, got 0", id="zero-top-k"),
    pytest.param(dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer, got -1",
                 id="negative-max-new-tokens"),
    pytest.param(dict(prompts=[]), "no prompts to complete", id="no-prompts"),
    pytest.param(dict(prompts=[[5, 6], []]), r"prompt 1 is empty \(no tokens\)", id="an-empty-prompt"),
    pytest.param(dict(prompts=[[5, 120]]), "token id 120 is outside the model's 97 embeddings: the tokenizer does not belong",
                 id="token-id-beyond-the-embeddings"),
])
def test_generation_settings_and_prompts_are_checked(saved_tiny, kwargs, message):
    model = load_model(saved_tiny["llama-gqa"][1])
    prompts = kwargs.pop("prompts", [[5, 6, 7]])
    with pytest.raises(ConfigError, match=message):
        generate_ids(model, prompts, [1], 0, **kwargs)


# ---------------------------------------------------------------------------------------------
# classify()

def test_classifying_with_a_language_model_is_refused(lm):
    model, tok = lm
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM is not a classifier"):
        classify(model, tok, ["w5"])


def test_one_text_given_as_a_string_is_classified_once(lm, classifier):
    _, tok = lm
    assert len(classify(classifier, tok, "w5 w6")) == 1  # one text, not one per character


def test_classifying_no_texts_is_refused(lm, classifier):
    _, tok = lm
    with pytest.raises(ConfigError, match="texts must be a non-empty list of strings"):
        classify(classifier, tok, [])


def test_a_text_that_gives_no_tokens_is_refused(lm, classifier):
    _, tok = lm
    with pytest.raises(ConfigError, match=r"text 0 \(''\) gives no tokens to classify"):
        classify(classifier, tok, [""])


def test_a_max_length_that_is_not_positive_is_refused(lm, classifier):
    _, tok = lm
    with pytest.raises(ConfigError, match="max_length must be a positive number of tokens, got 0"):
        classify(classifier, tok, ["w5"], max_length=0)


def test_a_truncation_side_other_than_right_or_left_is_refused(lm, classifier):
    _, tok = lm
    with pytest.raises(ConfigError, match=r"truncation must be 'right' or 'left', got 'middle'"):
        classify(classifier, tok, ["w5"], truncation="middle")
