"""File access: find a checkpoint (a local path or a Hub repo id), read JSON, read safetensors one
tensor at a time, and write a folder atomically. Every error names the file at fault.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError


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
