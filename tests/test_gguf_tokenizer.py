"""GGUF tokenizers against transformers' GGUF reader (AutoTokenizer.from_pretrained(folder, gguf_file=...),
the oracle), id for id: small vocabularies trained here from text and written with the `gguf` package,
one per pre-tokenizer name and SentencePiece layout; and the real Qwen2.5 and Gemma 3 files (slow)."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from minilora.errors import CheckpointError
from minilora.loading.gguf_vocab import SPLITS, _byte_alphabet
from minilora.loading.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine; we've DONE it, haven't we?",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3), [i for i in range(10)])\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n\tif (x) {\n\t\treturn;\n\t}\n",
    "Zähl bis drei, café déjà vu, naïve façade, Ærøskøbing, straße, Ωmega, Кириллица, العربية, हिन्दी",
    "東京は日本の首都です。你好，世界！한국어 텍스트。🎉 emoji 🙂👍",
    "Numbers: 1234567, 3.14159, 2024-06-01, 0x1F, 42nd, 1,000,000 and 007.",
    "Lines\n\nwith\n\n\nblank lines\r\nand CRLF\rand   runs   of     spaces  and\ttabs\t\t.",
    "<html><body class=\"x\">Hello &amp; welcome!</body></html> {\"key\": [1, 2, 3], \"b\": null}",
]
TEXTS = CORPUS + [
    "f(x)", "\n\n\n", "a\n\n\nb", "  leading and trailing  ", " ", "", "x" * 40 + " " * 17 + "y",
    "unseen wörds ünd glyphs: ŋ ǂ ∑ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈",
    "<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n408<|im_end|>",
    "<tool_call>{\"name\": \"f\"}</tool_call> and <s>inline</s> and <bos>x<eos>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "multi-line\n  indented:\n    - item 1\n    - item 2\n\n\n\n  end",
]
CONTROL, USER = 3, 4


def train_byte_level(split: pre_tokenizers.PreTokenizer, size: int = 700) -> tuple[list[str], list[str]]:
    """A byte-level BPE trained on CORPUS with the family's own split: (tokens by id, merges)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = split
    tk.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tk.get_vocab()
    model = json.loads(tk.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return sorted(vocab, key=vocab.get), merges


def writer_for(path, arch="qwen2"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    return w


def close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_level(path, tokens, merges, pre, arch="qwen2", add_bos=None):
    """tokens + ChatML's control tokens + a user-defined <tool_call> pair, as llama.cpp's converter writes them."""
    tokens = tokens + SPECIALS + ["<tool_call>", "</tool_call>"]
    w = writer_for(path, arch)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 5) + [CONTROL] * 3 + [USER] * 2)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 5)
    w.add_eos_token_id(len(tokens) - 3)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    close(w)
    return path


def theirs(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_ids(ours, oracle, texts=TEXTS) -> int:
    """Every text's ids (with and without the special tokens encoding adds) equal, and decoding them; returns
    how many ids were compared."""
    compared = 0
    for text in texts:
        for special in (True, False):
            expected = oracle.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
            compared += len(expected)
        ids = oracle.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == oracle.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=True), text
    return compared


# pre name -> the split its vocabulary is trained with (the family's own tokenizer.json pre_tokenizer)
def _regex_split(pattern):
    from tokenizers import Regex
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


TRAINED_WITH = {
    None: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": _regex_split(SPLITS["llama-bpe"].regexes[0]),
    "qwen2": _regex_split(SPLITS["qwen2"].regexes[0]),
    "qwen35": _regex_split(SPLITS["qwen35"].regexes[0]),
    "gpt-4o": _regex_split(SPLITS["gpt-4o"].regexes[0]),
}


@pytest.mark.parametrize("pre", list(TRAINED_WITH), ids=lambda p: str(p))
def test_byte_level_bpe_is_split_as_its_pre_tokenizer_names(tmp_path, pre):
    tokens, merges = train_byte_level(TRAINED_WITH[pre])
    path = write_byte_level(tmp_path / "bpe.gguf", tokens, merges, pre)
    ours, oracle = load_tokenizer(path), theirs(path)
    assert ours.vocab_size == len(oracle)
    assert assert_same_ids(ours, oracle) > 1000


def test_the_same_vocabulary_split_as_qwen2_or_as_gpt2_gives_other_ids(tmp_path):
    """What reading every file with one pre-tokenizer got wrong: Qwen2's split keeps `(x` and "\\n\\n\\n" whole."""
    tokens, merges = train_byte_level(TRAINED_WITH["qwen2"])
    qwen2 = load_tokenizer(write_byte_level(tmp_path / "qwen2.gguf", tokens, merges, "qwen2"))
    gpt2 = load_tokenizer(write_byte_level(tmp_path / "gpt2.gguf", tokens, merges, "gpt-2"))
    pieces = lambda tk, text: [tk.tk.id_to_token(i) for i in tk.encode(text)]
    assert "(x" in pieces(qwen2, "f(x)") and "(x" not in pieces(gpt2, "f(x)")
    assert pieces(qwen2, "a\n\n\nb") == ["a", "ĊĊĊ", "b"] and pieces(gpt2, "a\n\n\nb") != ["a", "ĊĊĊ", "b"]


@pytest.mark.parametrize("add_bos", [True, False])
def test_the_files_add_bos_flag_is_followed(tmp_path, add_bos):
    tokens, merges = train_byte_level(TRAINED_WITH["llama-bpe"])
    path = write_byte_level(tmp_path / "l3.gguf", tokens, merges, "llama-bpe", arch="llama", add_bos=add_bos)
    ours = load_tokenizer(path)
    assert (ours.encode("hi")[0] == ours.bos_token_id) is add_bos and ours.encode("hi", add_special_tokens=False)[0] != ours.bos_token_id
    assert_same_ids(ours, theirs(path))


def test_deepseek_coder_splits_as_llama_cpp_does(tmp_path):
    """transformers reads this name with GPT-2's pattern, so the oracle is llama.cpp's regex list
    (newline, letters, punctuation, CJK, each digit) applied by hand."""
    tokens, merges = train_byte_level(TRAINED_WITH["gpt-2"])
    tk = load_tokenizer(write_byte_level(tmp_path / "ds.gguf", tokens, merges, "deepseek-coder")).tk
    back = {c: b for b, c in _byte_alphabet().items()}
    words = lambda text: [bytes(back[c] for c in w).decode() for w, _ in tk.pre_tokenizer.pre_tokenize_str(text)]
    assert words("ab 12\nc") == ["ab", " ", "1", "2", "\n", "c"]
    assert words("你好, 世界!") == ["你好", ",", " ", "世界", "!"]
    assert words("x = y;") == ["x", " =", " y", ";"]  # "=" is a symbol, not punctuation: no rule cuts " ="


def test_an_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    tokens, merges = train_byte_level(TRAINED_WITH["gpt-2"])
    path = write_byte_level(tmp_path / "odd.gguf", tokens, merges, "made-up-9")
    with pytest.raises(CheckpointError, match=r"odd\.gguf: GGUF metadata tokenizer\.ggml\.pre is 'made-up-9'.*"
                                              r"Supported: .*gpt-2.*llama-bpe.*qwen2.*smollm"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# SentencePiece ("llama"): tokens, scores, types, <0xNN> byte fallback, ▁ for spaces

LAYOUTS = {  # architecture -> its special tokens, ids 0.. (Gemma's and Llama's)
    "gemma3": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
    "llama": ["<unk>", "<s>", "</s>"],
    "phi3": ["<unk>", "<s>", "</s>"],
}


def write_sentencepiece(path, arch, add_space_prefix=None, add_eos=None):
    """A SentencePiece BPE vocabulary trained on CORPUS, laid out as llama.cpp's converter writes one:
    special tokens, the 256 <0xNN> byte tokens (type 6), pieces scored by merge order (Gemma: every score
    the same), tokens of raw spaces (as Gemma's file has them), and user-defined turn markers and "\\n\\n"."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    vocab = trained.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    specials = LAYOUTS[arch]
    user = ["<start_of_turn>", "<end_of_turn>", "\n\n"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["  ", "   ", "    "] + user
    types = [CONTROL] * len(specials) + [6] * 256 + [1] * (len(pieces) + 3) + [USER] * len(user)
    types[specials.index("<unk>")] = 2
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))] + [-1e4] * 3 + [0.0] * len(user)
    w = writer_for(path, arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores if arch != "gemma3" else [0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index(specials[1] if arch != "gemma3" else "<bos>"))
    w.add_eos_token_id(tokens.index(specials[2] if arch != "gemma3" else "<eos>"))
    w.add_unk_token_id(specials.index("<unk>"))
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    close(w)
    return path


@pytest.mark.parametrize("arch, prefix, add_eos", [
    pytest.param("llama", None, None, id="llama"),
    pytest.param("llama", True, True, id="llama-prefix-eos"),
    pytest.param("gemma3", False, None, id="gemma3"),
    pytest.param("phi3", None, None, id="phi3"),
])
def test_sentencepiece_equals_transformers(tmp_path, arch, prefix, add_eos):
    path = write_sentencepiece(tmp_path / "spm.gguf", arch, prefix, add_eos)
    ours, oracle = load_tokenizer(path), theirs(path)
    assert ours.vocab_size == len(oracle)
    assert assert_same_ids(ours, oracle) > 800
    pieces = [ours.tk.id_to_token(i) for i in ours.encode("hi ŋ", add_special_tokens=False)]
    assert pieces[-2:] == ["<0xC5>", "<0x8B>"]  # a character the vocabulary lacks: its UTF-8 bytes


def test_a_sentencepiece_file_without_the_space_prefix_adds_none(tmp_path):
    """tokenizer.ggml.add_space_prefix = false (llama.cpp's reading; transformers ignores the flag for Llama)."""
    ours = load_tokenizer(write_sentencepiece(tmp_path / "np.gguf", "llama", add_space_prefix=False))
    with_prefix = load_tokenizer(write_sentencepiece(tmp_path / "p.gguf", "llama", add_space_prefix=True))
    assert with_prefix.tk.id_to_token(with_prefix.encode("The fox", add_special_tokens=False)[0]).startswith("▁")
    assert not ours.tk.id_to_token(ours.encode("The fox", add_special_tokens=False)[0]).startswith("▁")
    assert ours.decode(ours.encode("The  quick fox\n")) == "The  quick fox\n"


def test_a_sentencepiece_file_without_scores_is_a_named_error(tmp_path):
    w = writer_for(tmp_path / "x.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "a"])
    w.add_token_types([2, 1])
    close(w)
    with pytest.raises(CheckpointError, match=r"x\.gguf: GGUF metadata has no tokenizer\.ggml\.scores list of 2 numbers"):
        load_tokenizer(tmp_path / "x.gguf")


# ---------------------------------------------------------------------------------------------
# The real files

REAL_TEXTS = TEXTS + [
    "import numpy as np\n\nclass Net(nn.Module):\n    def forward(self, x):  # (B, T, C)\n        return self.f(x)\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    "fn main() {\n    let v: Vec<u32> = (1..=10).collect();\n    println!(\"{:?}\", v);\n}\n",
]


@pytest.mark.slow
def test_the_real_qwen25_tokenizer_equals_transformers(qwen25_05b_path):
    ours, oracle = load_tokenizer(qwen25_05b_path), theirs(qwen25_05b_path)
    assert ours.vocab_size == len(oracle) == 151936
    assert [ours.tk.id_to_token(i) for i in ours.encode("f(x)")] == ["f", "(x", ")"]
    assert [ours.tk.id_to_token(i) for i in ours.encode("\n\n\n")] == ["ĊĊĊ"]
    assert assert_same_ids(ours, oracle, REAL_TEXTS) > 500


@pytest.mark.slow
def test_the_real_gemma3_tokenizer_equals_transformers(gemma3_270m_path):
    ours, oracle = load_tokenizer(gemma3_270m_path), theirs(gemma3_270m_path)
    assert ours.vocab_size == len(oracle) == 262144
    assert ours.encode("Hi")[0] == ours.bos_token_id == 2
    assert assert_same_ids(ours, oracle, REAL_TEXTS) > 500
