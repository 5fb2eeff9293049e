"""A GGUF file's tokenizer rebuilt from its metadata with the `tokenizers` library, id for id as
transformers' GGUF reader rebuilds it (the oracle), for the two kinds `tokenizer.ggml.model` names:

- "gpt2", byte-level BPE (Qwen2, Llama 3, SmolLM, GPT-2): tokens and merges. The merges were learnt
  on words cut by the family's own split pattern, which the file names in `tokenizer.ggml.pre`
  (llama.cpp's name for it): Qwen2's keeps `(x` and "\\n\\n\\n" whole, GPT-2's does not, so the same
  vocabulary cut another way gives other ids. A name not in SPLITS is refused, never guessed.
- "llama", SentencePiece (Gemma, Llama 2, Mistral): tokens with scores and types, <0xNN> byte tokens
  for what the vocabulary lacks, spaces written as ▁, a ▁ before the text unless
  `tokenizer.ggml.add_space_prefix` is false. The file has no merges: they are rebuilt from the
  vocabulary, every split of a token into two tokens, ranked by the token's score (Gemma's scores do
  not follow its merge order: its file order does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values: special tokens, and plain added ones


@dataclass(frozen=True)
class Split:
    """How one family cuts text into words before its byte-level merges (llama.cpp's regex list)."""
    regexes: tuple[str, ...] = ()  # in turn, each cutting every piece into its matches and what lies between;
                                   # (): GPT-2's own pattern
    digits: bool = False           # every digit a word of its own first
    ignore_merges: bool = False    # a word that is a token is that token (Llama 3's tiktoken vocabulary)


_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit a word
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")

# tokenizer.ggml.pre -> its split, the names grouped as llama.cpp's src/llama-vocab.cpp groups them.
# "default" (and a file without the key, written before llama.cpp named pre-tokenizers) is read with
# GPT-2's pattern, as transformers reads it: llama.cpp's own fallback warns that it degrades the text.
SPLITS: dict[str, Split] = {name: split for names, split in [
    (("default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "jina-v2-es",
      "jina-v2-de", "gigachat", "a.x-4.0", "mellum"), Split()),
    (("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"), Split(digits=True)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
     Split((_LLAMA3,), ignore_merges=True)),
    (("dbrx", "smaug-bpe"), Split((_LLAMA3,))),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), Split((_QWEN2,))),
    (("qwen35",), Split((_QWEN35,))),
    (("gpt-4o", "llama4", "kanana2", "talkie"), Split((_GPT4O,))),
    (("deepseek-coder",), Split(_DEEPSEEK_CODER)),
] for name in names}

GEMMA = ("gemma", "gemma2", "gemma3")  # general.architecture values whose SentencePiece files need Gemma's reading


def gguf_vocabulary(meta: dict[str, Any], path: Path) -> HFTokenizer:
    """The tokenizer a GGUF file's metadata describes: vocabulary, splitting, special and added
    tokens, and the BOS/EOS that encoding adds (tokenizer.ggml.add_bos_token / add_eos_token)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = _strings(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.token_type is not a list of integers")
    if kind == "gpt2":
        tk, add_bos = _byte_level_bpe(meta, tokens, path), False  # BOS only where the file says so
        letters = set(_byte_alphabet().values())
        special = lambda t: set(t) <= letters  # a control token outside the byte alphabet is a converter's mislabel
    elif kind == "llama":
        tk, add_bos = _sentencepiece(meta, tokens, path), True  # llama.cpp adds BOS unless the file says not to
        special = lambda t: True
    else:
        raise CheckpointError(f"{path}: GGUF tokenizer {kind!r} is not supported (byte-level BPE, 'gpt2', and "
                              "SentencePiece, 'llama', are)")
    # Whole in the text wherever they occur: control tokens as special (dropped by decode's skip_special_tokens),
    # user-defined ones (<tool_call>, "\n\n" in Gemma) as plain text.
    vocab = tk.get_vocab()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, kind in zip(tokens, types) if kind == CONTROL and special(t)])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    tk.post_processor = _bos_eos(meta, tokens, add_bos, path)
    return tk


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: Path) -> HFTokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.pre is {pre!r}, a pre-tokenizer not supported "
                              f"here; its split pattern decides the ids, so it is not guessed. Supported: "
                              f"{', '.join(sorted(SPLITS))}")
    split = SPLITS[pre]
    merges = _strings(meta, "tokenizer.ggml.merges", path)
    bad = next((m for m in merges if len(m.split(" ")) != 2), None)
    if bad is not None:
        raise CheckpointError(f"{path}: GGUF merge {bad!r} is not two tokens separated by a space")
    # Tokens are written in GPT-2's byte alphabet; one that is not (a converter's plain-text token) is spelled in it
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    try:
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                    ignore_merges=split.ignore_merges))
    except Exception as e:  # a merge of tokens the vocabulary lacks
        raise CheckpointError(f"{path}: the GGUF tokenizer's vocabulary and merges do not fit together ({e})") from None
    if split.regexes:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [*(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.regexes),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif split.digits:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece(meta: dict[str, Any], tokens: list[str], path: Path) -> HFTokenizer:
    gemma = meta.get("general.architecture") in GEMMA
    if gemma:  # a token of spaces is stored as spaces: the text's spaces become ▁ before the lookup
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if (not isinstance(scores, list) or len(scores) != len(tokens)
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise CheckpointError(f"{path}: GGUF metadata has no tokenizer.ggml.scores list of {len(tokens)} numbers: "
                                  "the SentencePiece tokenizer cannot be rebuilt")
        ranks = dict(zip(tokens, scores))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ([tuple(m.split(" ")) for m in _strings(meta, "tokenizer.ggml.merges", path)]
              if "tokenizer.ggml.merges" in meta else _merges(vocab, ranks))
    unk = _special_token(meta, "unknown", tokens, path)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", not gemma) is True
    if meta.get("general.architecture") == "phi3":  # a ▁ before every piece of text, after special tokens too
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:  # "first": the ▁ goes before the text only, not after each special token within it
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                    prepend_scheme="first" if prefix else "never")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tk


def _merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-ranked token first (then shorter left, right
    pieces first), ties in vocabulary order: the merges a SentencePiece BPE vocabulary implies."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, rank) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bos_eos(meta: dict[str, Any], tokens: list[str], add_bos: bool, path: Path) -> processors.PostProcessor | None:
    """BOS before and EOS after the text, where the file's flags say so (BOS: `add_bos` where it is silent)."""
    ends = []
    for kind, default in (("bos", add_bos), ("eos", False)):
        flag = meta.get(f"tokenizer.ggml.add_{kind}_token")
        token = _special_token(meta, kind, tokens, path)
        if flag is True and token is None:
            raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.add_{kind}_token is true but there is no "
                                  f"tokenizer.ggml.{kind}_token_id")
        wanted = flag if flag is not None else default
        ends.append((token, meta[f"tokenizer.ggml.{kind}_token_id"]) if wanted and token is not None else None)
    bos, eos = ends
    if bos is None and eos is None:
        return None
    def around(text: str, type_id: int) -> list[str]:
        return [f"{e[0]}:{type_id}" for e in (bos,) if e] + [text] + [f"{e[0]}:{type_id}" for e in (eos,) if e]
    single, pair = " ".join(around("$A:0", 0)), " ".join(around("$A:0", 0) + around("$B:1", 1))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[e for e in ends if e])


def _special_token(meta: dict[str, Any], kind: str, tokens: list[str], path: Path) -> str | None:
    value = meta.get(f"tokenizer.ggml.{kind}_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.{kind}_token_id is {value!r}, not one of the "
                              f"{len(tokens)} token ids")
    return tokens[value]


def _strings(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    if not isinstance(meta.get(key), list) or not all(isinstance(t, str) for t in meta[key]):
        raise CheckpointError(f"{path}: GGUF metadata has no {key} list of strings: the tokenizer cannot be rebuilt")
    return meta[key]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the rest move past 255."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}
