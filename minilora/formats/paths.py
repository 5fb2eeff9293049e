"""File access: find a checkpoint (a local path or a Hub repo id), read JSON, read safetensors one
tensor at a time, and write a folder atomically. Every error names the file at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .atomic import recover

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "generation_config.json", "chat_template.jinja", "chat_template.json"]


# What a model needs from a Hub repo: never the .bin/.h5/.msgpack duplicates of the same weights.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


DATA_FILES = ["*.json", "*.jsonl", "*.csv", "*.parquet"]


_HINTS = {"model": "Pass a local folder with config.json and *.safetensors instead.",
          "dataset": "Pass a local .json, .jsonl, .csv or .parquet file instead."}


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith((".gguf", ".safetensors", ".json", ".jsonl", ".csv",
                                                                   ".parquet")) \
        or source.count("/") > 1 or os.sep in source and os.sep != "/"


def resolve(source: str | os.PathLike, revision: str | None = None, files: list[str] | None = None,
            repo_type: str = "model") -> Path:
    """A local folder or file as is; a Hub repo id (a model, or with repo_type="dataset" a dataset)
    downloaded, or found in the cache, with huggingface-hub: only the `files` patterns (HUB_FILES or
    DATA_FILES by default). `revision` pins a Hub branch, tag or commit. HF_HUB_OFFLINE=1 makes
    huggingface-hub use its cache only. A local folder that a process killed while replacing it left
    aside (formats.atomic.recover) is put back first."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists() or recover(path) is not None:
        return path
    source = str(source)
    if _looks_local(source):
        raise CheckpointError(f"{source}: no such file or folder")
    from huggingface_hub import (
        snapshot_download,  # imported here: local use never touches the network code
    )
    try:
        return Path(snapshot_download(repo_id=source, repo_type=repo_type, revision=revision,
                                      allow_patterns=files or (DATA_FILES if repo_type == "dataset" else HUB_FILES)))
    except Exception as e:  # network down, repo missing, gated, bad id: all mean "not available"
        raise CheckpointError(f"{source}: not a local path, and the Hugging Face Hub could not provide it as a "
                              f"{repo_type} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              f"{_HINTS[repo_type]}") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; CheckpointError naming the file if it is missing, not JSON or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path}: " + ("a folder, where a JSON file belongs" if path.is_dir() else "file not found"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
