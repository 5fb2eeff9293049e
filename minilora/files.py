"""File access: find a checkpoint (a local path or a Hub repo id), read JSON, read safetensors one
tensor at a time, and write a folder atomically. Every error names the file at fault.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointError

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "generation_config.json"]
# What a model needs from a Hub repo: never the .bin/.h5/.msgpack duplicates of the same weights.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
DATA_FILES = ["*.json", "*.jsonl", "*.csv", "*.parquet"]
_HINTS = {"model": "Pass a local folder with config.json and *.safetensors instead.",
          "dataset": "Pass a local .json, .jsonl, .csv or .parquet file instead."}

Tensors = Iterator[tuple[str, torch.Tensor]]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith((".gguf", ".safetensors", ".json", ".jsonl", ".csv",
                                                                   ".parquet")) \
        or source.count("/") > 1 or os.sep in source and os.sep != "/"


def resolve(source: str | os.PathLike, revision: str | None = None, files: list[str] | None = None,
            repo_type: str = "model") -> Path:
    """A local folder or file as is; a Hub repo id (a model, or with repo_type="dataset" a dataset)
    downloaded, or found in the cache, with huggingface-hub: only the `files` patterns (HUB_FILES or
    DATA_FILES by default). `revision` pins a Hub branch, tag or commit. HF_HUB_OFFLINE=1 makes
    huggingface-hub use its cache only."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    source = str(source)
    if _looks_local(source):
        raise CheckpointError(f"{source}: no such file or folder")
    from huggingface_hub import snapshot_download  # imported here: local use never touches the network code
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


def write_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_folder), then swap tmp_folder in for `folder` by rename: a crash at any point
    leaves either the old complete folder or the new complete one, never a half-written one."""
    folder = Path(folder)
    make_folder(folder.parent)
    # What a process killed here earlier may have left: a half-written temporary (dropped), or the
    # previous version moved aside just before the new one was renamed in (put back). A live process's
    # temporaries are its own business: only those of processes that no longer exist are touched.
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        if not _alive(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    for aside in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if _alive(aside.name.rpartition("-")[2]):
            continue
        if folder.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)  # the previous version back in its place
        if isinstance(e, OSError):  # disk full, read-only, permissions: name what was being written
            raise CheckpointError(f"{folder}: {e.strerror or e} while writing {e.filename or tmp}; the previous "
                                  f"version, if any, is kept") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def check_replaceable(folder: Path, allowed: frozenset[str], what: str) -> None:
    """Refuse to replace `folder` (write_atomically swaps the whole folder) when it holds anything but
    the `allowed` files: saving `what` there would delete the rest."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; {what} is saved as a folder")
    other = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if other:
        raise CheckpointError(f"{folder} holds other files ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}): "
                              f"saving {what} there would replace the whole folder. Choose a new or empty folder")


def make_folder(folder: Path) -> None:
    """mkdir -p, with a CheckpointError naming the folder (read-only, no permission, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot create this folder ({e.strerror or e})") from None


def _alive(pid: str) -> bool:
    """Is there a process with this id (other than this one, whose leftovers are stale by definition)?"""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Checkpoint tensors, one at a time

def checkpoint_tensors(folder: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """Every tensor of a Hub-style checkpoint folder, read one at a time: sharded or single safetensors,
    or (with torch's weights_only loader, which refuses arbitrary pickled objects) pytorch_model.bin.
    Safetensors tensors already of `map_dtype` are memory-mapped rather than read (see below)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a weight_map object of tensor name -> shard file name")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        outside = [f for f in files if not f.resolve().is_relative_to(folder.resolve())]
        if outside:
            raise CheckpointError(f"{index}: shard {outside[0].name!r} lies outside the checkpoint's folder")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        yield from pickle_tensors(folder / "pytorch_model.bin")
        return
    else:
        raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for file in files:
        yield from safetensors_tensors(file, map_dtype)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_tensors(file: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """The tensors of one .safetensors file, one at a time.

    The format: 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    data. A tensor the model keeps as it is (its dtype is `map_dtype`) is a view of a private
    (copy-on-write) memory map of the file: no copy, the page cache's pages become the model's, as
    transformers does. Any other tensor is read into its own fresh buffer, so that memory is gone as
    soon as the model no longer needs it (a quantized or cast load drops each tensor after converting
    it) and nothing of the file stays resident: peak memory is the model plus one tensor."""
    if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    size = file.stat().st_size
    corrupt = f"{file}: not a readable safetensors file, truncated or corrupt"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{corrupt} (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{corrupt} (the header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{corrupt} (the header is a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        for name, info in header.items():
            if not _valid_entry(info):
                raise CheckpointError(f"{corrupt} (tensor {name}: expected dtype, shape (non-negative integers) and "
                                      f"data_offsets [begin, end], found {str(info)[:100]})")
        spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items())
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(f"{corrupt} (tensors {a} and {b} share bytes)")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if map_dtype is not None else None
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which is not supported")
            numel = math.prod(shape)  # Python integers: a crafted shape cannot overflow
            if end - begin != numel * dtype.itemsize or 8 + n + end > size:
                raise CheckpointError(f"{corrupt} (tensor {name} runs past the end of the file or has the wrong size)")
            if mapped is not None and dtype == map_dtype and numel and (8 + n + begin) % dtype.itemsize == 0:
                yield name, torch.frombuffer(mapped, dtype=dtype, count=numel, offset=8 + n + begin).reshape(shape)
                continue
            f.seek(8 + n + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield name, (torch.frombuffer(buffer, dtype=dtype) if numel else torch.empty(0, dtype=dtype)).reshape(shape)


def _valid_entry(info: Any) -> bool:
    """A safetensors header entry: {"dtype": str, "shape": [n, ...], "data_offsets": [begin, end]}."""
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape")) \
        and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2 \
        and info["data_offsets"][0] <= info["data_offsets"][1]


def pickle_tensors(file: Path) -> Tensors:
    """The tensors of a pytorch_model.bin-style file, with torch's weights_only loader (which refuses
    arbitrary pickled objects)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: refused; loading it needs more than weights_only=True allows, "
                              f"or it is corrupt ({type(e).__name__}). Convert it to safetensors.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a dict of named tensors, found {type(state).__name__}")
    yield from state.items()


def check_tensor(where: str, name: str, tensor: torch.Tensor, floating: bool) -> None:
    """Refuse a tensor that cannot be the weight it stands for: not floating-point where a float weight
    belongs (`floating`), or holding NaN or infinite values."""
    if floating and not tensor.is_floating_point():
        raise CheckpointError(f"{where}: tensor {name} is {tensor.dtype}, where a floating-point weight belongs")
    if tensor.is_floating_point():  # 16M values at a time: isfinite's temporaries on a whole 50400 x 4096
        for part in tensor.reshape(-1).split(1 << 24):  # embedding came to 1 GB, a fifth of a 6B NF4 load
            if not bool(torch.isfinite(part).all()):
                raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise, and a quantizing load
    that frees one large tensor per step would see its resident size creep up by their sum)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
