"""Writing outputs so that a reader only ever sees a complete one: a folder or a file is written under a
temporary name and renamed into place, while its writer holds a lock on the name; a crash, a full disk
or a read-only folder leaves what was there before, byte for byte, and a named error.

The lock is `.<name>.lock` beside the output, held with flock (released by the kernel when its process
dies, even by SIGKILL) and removed when the writer is done. A second writer of the same name fails at
once, naming the process that holds it, instead of interleaving its bytes with the first's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: the lock file is created exclusively instead (O_EXCL), its pid checked
    fcntl = None

from ..errors import CheckpointError, WriteError


def write_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_folder), then swap tmp_folder in for `folder`: a crash at any point leaves either
    the old complete folder or the new complete one (where the system cannot swap two names in one
    step, a kill between its two renames leaves the old one aside, which `recover` puts back)."""
    folder = Path(folder)
    make_folder(folder.parent)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")  # made with mkdir: this writer's alone
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        with owning(folder):
            _tidy(folder)
            _remove(tmp)  # left by an earlier process with this pid
            try:
                tmp.mkdir()
                write(tmp)
                if folder.exists() and _exchange(tmp, folder):
                    _remove(tmp)  # now the previous version
                    return folder
                if folder.exists():
                    folder.rename(old)
                tmp.rename(folder)
            except BaseException:
                _remove(tmp)
                if old.exists() and not folder.exists():
                    with contextlib.suppress(OSError):
                        old.rename(folder)  # the previous version back in its place (else recover finds it)
                raise
            _remove(old)
    except OSError as e:  # disk full, read-only, permissions: name what was being written
        raise WriteError(f"{folder}: {e.strerror or e} while writing {e.filename or tmp}; the previous "
                         f"version, if any, is kept") from None
    return folder


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Run write(f) on a temporary file beside `path` (its own: pid and a random part in its name),
    then rename it to `path`: the file there is replaced whole, or not at all."""
    path = Path(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    make_folder(path.parent)
    try:
        with owning(path):
            for stale in _leftovers(path, ".", ".partial"):  # what killed writers of this name left
                _remove(stale)
            try:
                with open(tmp, "xb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes on disk before the name points at them
                os.replace(tmp, path)
            except BaseException:
                _remove(tmp)
                raise
    except OSError as e:
        raise WriteError(f"{path}: could not be written ({e.strerror or e}); "
                         + ("nothing was replaced" if existed else "nothing was written")) from None
    return path


def recover(folder: str | os.PathLike, wait: float = 5.0) -> Path | None:
    """For readers: `folder` if it is there, after putting its previous complete version back when a
    process was killed while replacing it (between two renames, the old version was moved aside to
    .<name>.old-<pid> and the new one not yet renamed in). None when there is no folder and nothing to
    put back. Safe when several readers race (one puts it back, under the writers' lock); a writer
    caught between its renames is waited for, up to `wait` seconds. A CheckpointError names the
    previous version when it cannot be put back (a read-only folder)."""
    folder = Path(folder)
    deadline = time.monotonic() + wait
    while not folder.exists():
        asides = _asides(folder)
        if not asides:
            return None
        try:
            with owning(folder, "putting its previous version back"):
                _tidy(folder)
        except WriteError:  # a writer (or another reader putting it back) holds the name for a moment
            if time.monotonic() > deadline:
                raise CheckpointError(f"{folder}: missing while another process replaces it; its previous "
                                      f"version is at {asides[0]}. Try again") from None
            time.sleep(0.02)
        except OSError as e:
            raise CheckpointError(f"{folder}: missing, but its previous complete version is at {asides[0]} (left by "
                                  f"a process killed while replacing it), and it could not be put back "
                                  f"({e.strerror or e}): rename it to {folder.name}") from None
    return folder


@contextlib.contextmanager
def owning(target: str | os.PathLike, doing: str = "writing it", shared: bool = False, optional: bool = False,
           instead: str = "nothing was written") -> Iterator[None]:
    """Hold the lock on `target` (.<name>.lock beside it) for the block: exclusive for a writer; shared
    for a reader that needs the target to stay as it is (a push reading its files), which excludes
    writers only. A holder already there is a WriteError naming its process and what it is doing.
    `optional`: where the lock file cannot be made (a read-only folder, which no one can be writing),
    go on without it; else its OSError is the caller's to name. `instead` ends the WriteError's message."""
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    try:
        fd = _take(lock, target, doing, shared, instead)
    except OSError:
        if not optional:
            raise
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, lock)


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
    """mkdir -p, with a WriteError naming the folder (read-only, no permission, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{folder}: cannot create this folder ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# The lock, leftovers, the swap

def _take(lock: Path, target: Path, doing: str, shared: bool, instead: str) -> int:
    if fcntl is None:
        return _take_exclusively(lock, target, doing, instead)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            raise _busy(target, holder, instead) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file as it lets go: a lock on a file no longer at that name
        # holds nothing, so take the one that is there now.
        with contextlib.suppress(FileNotFoundError):
            st, now = os.fstat(fd), os.stat(lock)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {doing}\n".encode(), 0)
    except OSError as e:  # a disk so full that not even the pid fits
        _release(fd, lock)
        raise OSError(e.errno, e.strerror, str(lock)) from None
    except BaseException:
        _release(fd, lock)
        raise
    return fd


def _release(fd: int, lock: Path) -> None:
    if fcntl is None:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a shared holder removes it only if it is the last
        os.unlink(lock)  # while still holding it: see _take
    except OSError:
        pass
    finally:
        os.close(fd)


def _take_exclusively(lock: Path, target: Path, doing: str, instead: str) -> int:
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                holder = lock.read_text().strip()
                if _alive(holder.partition(" ")[0]):
                    raise _busy(target, holder, instead) from None
                lock.unlink()  # its process is gone
            continue
        os.write(fd, f"{os.getpid()} {doing}\n".encode())
        return fd
    raise _busy(target, "", instead)


def _busy(target: Path, holder: str, instead: str) -> WriteError:
    pid, _, doing = holder.partition(" ")
    return WriteError(f"{target}: another process (pid {pid or 'unknown'}) is {doing or 'writing it'} now; "
                      f"{instead}. Wait for it to finish, or use another name")


def _tidy(folder: Path) -> None:
    """Under the lock on `folder`: what processes killed while writing it left. Its previous version moved
    aside is put back if the folder is missing (else dropped); half-written temporaries are dropped. A
    live process's temporaries are its own business: only those of processes that no longer exist."""
    if not folder.exists():
        for aside in _asides(folder):
            with contextlib.suppress(FileNotFoundError):
                aside.rename(folder)
                break
    for stale in _leftovers(folder, ".tmp-", ""):
        _remove(stale)
    if folder.exists():  # else an aside is the only copy left: kept, for recover to name
        for stale in _leftovers(folder, ".old-", ""):
            _remove(stale)


def _asides(folder: Path) -> list[Path]:
    """The previous versions a killed writer moved aside (.<name>.old-<pid>), the newest first."""
    def changed(p: Path) -> float:
        try:
            return p.stat().st_ctime  # a rename sets it
        except OSError:
            return 0.0
    found = [p for p in _leftovers(folder, ".old-", "", dead_only=False) if p.is_dir()]
    return sorted(found, key=changed, reverse=True)


def _leftovers(target: Path, infix: str, suffix: str, dead_only: bool = True) -> list[Path]:
    """.<name><infix><pid>[-random]<suffix> beside `target`, of processes that no longer exist."""
    prefix = f".{target.name}{infix}"
    try:
        names = [p.name for p in target.parent.iterdir()]
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            pid = name[len(prefix):len(name) - len(suffix)].partition("-")[0]
            if pid.isdigit() and not (dead_only and _alive(pid)):
                out.append(target.with_name(name))
    return out


def _remove(path: Path) -> None:
    """Delete a file or a folder, quietly: clean-up never raises a second error over the first."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


_RENAMEAT2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step (Linux's renameat2 with RENAME_EXCHANGE), so that `b` is never missing;
    False where the system or the file system has no such call (then: two renames)."""
    global _RENAMEAT2
    if not sys.platform.startswith("linux"):
        return False
    if _RENAMEAT2 is None:
        _RENAMEAT2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
    if not _RENAMEAT2:
        return False
    at_cwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
