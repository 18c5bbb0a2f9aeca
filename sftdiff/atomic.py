"""Outputs that appear whole or not at all.

Everything is written under a temporary name in the destination's own folder (so the final
rename stays on one filesystem and is atomic) and only renamed into place once complete and
flushed. Temporary names carry the writer's PID, so a later run can tell an abandoned one (its
process is gone) from one still being written, and removes the abandoned ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import OutputError

TMP_MARK = ".sftdiff-tmp-"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> None:
    """Remove temporaries left next to `final` by runs that were killed."""
    prefix = f".{final.name}{TMP_MARK}"
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _describe(e: OSError, path: Path) -> OutputError:
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for this filesystem or limit",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only filesystem",
    }.get(e.errno, e.strerror or str(e))
    return OutputError(f"cannot write {path}: {reason}; nothing was written there")


def check_can_create(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise OutputError(f"{final} already exists; choose another output or pass --force to replace it")
    if not final.parent.is_dir():
        raise OutputError(f"cannot write {final}: folder {final.parent} does not exist")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it to `final` only if the block completes.

    Without `overwrite`, an existing `final` is refused up front, and if another process creates it
    while we write, the final step fails rather than silently replacing that output.
    """
    final = Path(final)
    check_can_create(final, overwrite)
    clean_stale(final)
    tmp = _tmp_name(final)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync(tmp, directory)
        _commit(tmp, final, overwrite, directory)
    except OSError as e:
        _remove(tmp)
        raise _describe(e, final) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _fsync(p: Path, directory: bool) -> None:
    paths = [q for q in p.rglob("*") if q.is_file()] if directory else [p]
    for q in paths:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, final: Path, overwrite: bool, directory: bool) -> None:
    if not directory:
        if overwrite:
            os.replace(tmp, final)
            return
        try:
            os.link(tmp, final)  # fails if `final` appeared meanwhile: never clobber another writer
        except FileExistsError:
            raise OutputError(f"{final} was created by someone else while this ran; it was left as it is") from None
        except OSError:  # filesystems without hard links
            if final.exists():
                raise OutputError(f"{final} was created by someone else while this ran; it was left as it is") from None
            os.replace(tmp, final)
            return
        tmp.unlink()
        return
    old = None
    if final.exists():
        if not overwrite:
            raise OutputError(f"{final} was created by someone else while this ran; it was left as it is")
        old = _tmp_name(final)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        _remove(old)
