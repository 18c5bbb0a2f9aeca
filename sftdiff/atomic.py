"""Outputs that appear whole or not at all.

Everything is written under a temporary name in the destination's own folder (so the final
rename stays on one filesystem and is atomic) and only renamed into place once complete and
flushed. Temporary names carry the writer's PID, so a later run can tell an abandoned one (its
process is gone) from one still being written, and removes the abandoned ones.

The process also keeps a registry of its own temporaries, so that an interrupted command (see
`sftdiff.cli.interrupt`) can tell whether its output is already in place (`finishing`) and remove
what it was writing even when the normal unwinding does not get there (`remove_unfinished`).
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

# This process's temporaries being written -> True once complete and being renamed into place.
_live: dict[Path, bool] = {}
_committed = 0  # outputs this process has put in place


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


def finishing() -> bool:
    """Whether every output this process began is in place or being renamed into place (and there
    was at least one): all that is left of a command is reporting."""
    return (_committed > 0 or bool(_live)) and all(_live.values())


def remove_unfinished() -> None:
    """Remove this process's temporaries that are not being renamed into place (last resort of an
    interrupted process that must exit without unwinding)."""
    for tmp, committing in list(_live.items()):
        if not committing:
            _remove(tmp)


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
    """Refuse an output that exists (without `overwrite`) or whose folder is missing or is a file."""
    if final.exists() and not overwrite:
        raise OutputError(f"{final} already exists; choose another output or pass --force to replace it")
    if not final.parent.is_dir():
        blocker = next((p for p in [final.parent, *final.parent.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError(f"cannot write {final}: {blocker} is a file, not a folder; choose another output path")
        raise OutputError(f"cannot write {final}: folder {final.parent} does not exist")


def check_not_input(output: str | os.PathLike, inputs: list[str | os.PathLike] | tuple[str | os.PathLike, ...]) -> None:
    """Inputs are never modified, not even with --force: refuse an output that is an input, lies
    inside an input folder (a checkpoint's weights, an adapter's files) or contains an input."""
    from .errors import UsageError

    target = Path(os.path.realpath(output))
    for source in inputs:
        if not os.path.exists(source):  # a Hub id: nothing local to overwrite
            continue
        path = Path(os.path.realpath(source))
        if target == path or path in target.parents or target in path.parents:
            raise UsageError(f"output {output} is the input {source}{' or inside it' if target != path else ''}; "
                             f"write the result somewhere else")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it to `final` only if the block completes.

    Without `overwrite`, an existing `final` is refused up front, and if another process creates it
    while we write, the final step fails rather than silently replacing that output.
    """
    global _committed
    final = Path(final)
    check_can_create(final, overwrite)
    clean_stale(final)
    tmp = _tmp_name(final)
    _live[tmp] = False
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync(tmp, directory)
        _live[tmp] = True
        _commit(tmp, final, overwrite, directory)
        _committed += 1
    except OSError as e:
        _remove(tmp)
        raise _describe(e, final) from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _live.pop(tmp, None)


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
