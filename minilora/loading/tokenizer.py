"""Tokenizers through the `tokenizers` library: tokenizer.json, GPT-2's vocab.json + merges.txt, or a
GGUF file's metadata. The wrapper resolves the ids training and generation need: eos, bos and pad;
and the chat template, from the file transformers would read it from (recorded, for messages).

When a tokenizer has no pad token we pad with eos, as is usual for causal LMs; everything downstream
uses the attention mask (not "is this the pad id") to tell padding from text, so an eos that is
also the pad is still learned and still stops generation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..data.chat import render, special_tokens, template_of, template_source
from ..errors import CheckpointError
from ..formats.gguf import read_gguf
from ..formats.paths import read_json, resolve
from .gguf_vocab import gguf_vocabulary


class Tokenizer:
    def __init__(self, tk: HFTokenizer, eos_token_id: int | None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None, chat_template: str | None = None,
                 chat_template_source: str | None = None) -> None:
        tk.no_padding()     # padding and truncation are the data pipeline's job,
        tk.no_truncation()  # whatever the saved tokenizer.json had switched on
        self.tk = tk
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.has_pad_token = pad_token_id is not None
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source  # its file, for messages (after the template is set)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        """A template set in code comes from no file: the source the loader recorded goes with the old one."""
        self._chat_template, self.chat_template_source = template, None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_truncated(self, text: str, max_length: int, side: str = "right") -> list[int]:
        """Special tokens included, the text cut from `side` so that the whole fits max_length:
        "left" keeps the end of the text (and still the [CLS] ... [SEP] around it)."""
        enc = self.tk.encode(text, add_special_tokens=False)
        enc.truncate(max(1, max_length - self.tk.num_special_tokens_to_add(False)), direction=side)
        return self.tk.post_process(enc).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def add_pad_token(self, token: str = "[PAD]") -> int:
        """Add a new pad token (the model's embeddings must then be resized); returns its id."""
        self.tk.add_special_tokens([token])
        self.pad_token_id, self.has_pad_token = self.tk.token_to_id(token), True
        return self.pad_token_id

    def save(self, folder: Path) -> None:
        """tokenizer.json plus the special-token ids, in files that load here and in transformers."""
        self.tk.save(str(Path(folder) / "tokenizer.json"))
        names = {f"{kind}_token": self.tk.id_to_token(i) for kind, i in
                 (("eos", self.eos_token_id), ("bos", self.bos_token_id), ("pad", self.pad_token_id)) if i is not None}
        if self.chat_template:
            names["chat_template"] = self.chat_template
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(names, indent=2) + "\n")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's own chat template writes it (chat.py; ChatML if it has none),
        ending with the assistant's turn opened when add_generation_prompt."""
        return render(template_of(self), messages, add_generation_prompt, source=template_source(self),
                      **special_tokens(self))


def _token_id(tk: HFTokenizer, value: Any) -> int | None:
    if isinstance(value, dict):  # tokenizer_config.json may store {"content": "<eos>", ...}
        value = value.get("content")
    return tk.token_to_id(value) if isinstance(value, str) else None


def load_tokenizer(source: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a Hub repo id, a local folder or a .gguf file."""
    path = resolve(source, revision)
    if path.suffix == ".gguf":
        return gguf_tokenizer(read_gguf(path).meta, path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a folder with tokenizer.json (or vocab.json + merges.txt)")
    if (path / "tokenizer.json").is_file():
        try:
            tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tk = gpt2_tokenizer(path / "vocab.json", path / "merges.txt")
    else:
        raise CheckpointError(f"{path}: no tokenizer.json, and no vocab.json + merges.txt")
    settings: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json"):
        if (path / name).is_file():
            settings.update({k: v for k, v in read_json(path / name).items() if v is not None})
    ids = {}
    for kind in ("eos", "bos", "pad"):
        named = settings.get(f"{kind}_token")
        ids[kind] = _token_id(tk, named)
        if named is not None and ids[kind] is None:
            raise CheckpointError(f"{path}: {kind}_token {named!r} is not a token of this tokenizer's vocabulary")
        if ids[kind] is None and isinstance(settings.get(f"{kind}_token_id"), int):
            ids[kind] = settings[f"{kind}_token_id"]
    if ids["eos"] is None:
        eos = settings.get("eos_token_id")
        ids["eos"] = eos[0] if isinstance(eos, list) and eos else tk.token_to_id("<|endoftext|>")
    tokenizer = Tokenizer(tk, ids["eos"], ids["bos"], ids["pad"], *_folder_chat_template(path))
    tokenizer.source = str(path)
    return tokenizer


def _folder_chat_template(path: Path) -> tuple[str | None, str | None]:
    """A tokenizer folder's chat template and the file it is in, in the order transformers' tokenizer
    loading reads them: chat_template.jinja (where transformers 5 writes it), else tokenizer_config.json's
    chat_template; then chat_template.json ({"chat_template": ...}, processors' older file, which
    transformers reads for a processor only), rather than no template at all."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja}: not UTF-8 text ({e})") from None
    for name in ("tokenizer_config.json", "chat_template.json"):
        if (path / name).is_file():
            template = _chat_template(read_json(path / name).get("chat_template"), path / name)
            if template is not None:
                return template, f"{path / name}, chat_template"
    return None, None


def _chat_template(template: Any, path: Path) -> str | None:
    """A chat_template value: one Jinja text, or a list of named ones ("default" is used)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template is {type(template).__name__}, expected Jinja text")
    return template


def gpt2_tokenizer(vocab: Path, merges: Path) -> HFTokenizer:
    """GPT-2's byte-level BPE from its two files; <|endoftext|> is its only special token."""
    try:
        tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise CheckpointError(f"{vocab.parent}: vocab.json and merges.txt cannot be read as a BPE tokenizer ({e})") from None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if tk.token_to_id("<|endoftext|>") is not None:
        tk.add_special_tokens(["<|endoftext|>"])
    return tk


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file's metadata: byte-level BPE ("gpt2") split as its tokenizer.ggml.pre
    names, or SentencePiece ("llama"), rebuilt as gguf_vocab.py says."""
    tk = gguf_vocabulary(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {}
    for kind in ("eos", "bos", "padding"):
        value = meta.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens)):
            raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.{kind}_token_id is {value!r}, not one of the "
                                  f"{len(tokens)} token ids")
        ids[kind] = value
    template = _chat_template(meta.get("tokenizer.chat_template"), path)
    tokenizer = Tokenizer(tk, ids["eos"], ids["bos"], ids["padding"], template,
                          f"{path}, metadata tokenizer.chat_template" if template is not None else None)
    tokenizer.source = str(path)
    return tokenizer
