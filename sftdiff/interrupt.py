"""Ctrl-C in the `sftdiff` command: it ends promptly with exit 130, one line on stderr, nothing left.

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be,
which goes wrong in three ways: during the first imports it prints a long traceback; inside a C
extension's own import it becomes another error (numpy's "numpy._core.umath failed to import",
exit 1); and inside pure-Python thread synchronization it can lose a wake-up and hang the
process. So the CLI handles it in stages:

- from the first line of `sftdiff/__init__.py`, when this process is the command, until `main` is
  inside its error handling (`install_early`): print the line and exit 130 at once (nothing has
  been written yet; a SIGINT during the interpreter's own startup, before that line, is Python's);
- while a command runs (`install`): the first SIGINT raises KeyboardInterrupt, so outputs in
  progress are removed by their `atomic_path` on the way out; later ones are ignored, so nothing
  interrupts that cleanup; any error escaping after it counts as the interrupt (`guard`); and a
  watchdog thread ends the process `GRACE` seconds later if unwinding got stuck, removing this
  process's unfinished temporaries first (`atomic.remove_unfinished`);
- once the command's output is in place (`atomic.finishing`), or the command has returned or
  failed with its own error (`guard`), SIGINT is ignored: only the report remains.

The message is written with one `os.write` to fd 2 and only once, whichever stage writes it.
This module imports only what the interpreter has loaded anyway until `install` runs: it is
imported first by `import sftdiff`, where every millisecond widens the unhandled window.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_CODE = 130
MESSAGE = b"sftdiff: interrupted\n"
GRACE = 3.0  # seconds from the first SIGINT to a forced exit when unwinding is stuck

_state: dict = {"interrupted": False, "announced": False, "wake": None, "previous": None, "program": False,
                "reporting": False}


def _is_program() -> bool:
    """Whether this process is the `sftdiff` command (console script or `python -m sftdiff`), not a
    program that imports the package (tests, notebooks): only then is SIGINT ours before `main`."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0 == "sftdiff":
        return True
    orig = getattr(sys, "orig_argv", [])  # during `-m`'s package import sys.argv[0] is still "-m"
    return any(a == "-m" and b in ("sftdiff", "sftdiff.cli") for a, b in zip(orig, orig[1:]))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def announce() -> None:
    """Write the one interruption line (once per process)."""
    if not _state["announced"]:
        _state["announced"] = True
        try:
            os.write(2, MESSAGE)
        except OSError:
            pass


def exit() -> None:  # noqa: A001 - the counterpart of sys.exit for an interrupted command
    """End an interrupted command: the line, then exit 130. In the `sftdiff` process itself without
    the interpreter's shutdown: a KeyboardInterrupt that reached a C extension's internal code
    (e.g. torch's or numpy's imports run Python snippets) makes CPython exit by SIGINT at the very
    end whatever the exit code, and shutdown would join worker threads that may be stuck; outputs
    in progress have been removed by then (their `atomic_path` unwound)."""
    announce()
    if _state["program"]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(EXIT_CODE)
    sys.exit(EXIT_CODE)


def _exit_now(signum: int, frame: object) -> None:
    announce()
    os._exit(EXIT_CODE)


def install_early() -> None:
    """First thing in `import sftdiff`: in the command, a SIGINT before `install` exits 130 quietly."""
    if _state["program"] or not _is_program() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    try:
        signal.signal(signal.SIGINT, _exit_now)
    except ValueError:  # not the main thread
        return
    _state["program"] = True


def install() -> None:
    """At the start of `main`'s error handling: the running-command stage (see the module doc)."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return  # ignored by whoever started us (e.g. a background job): leave it so
    import threading
    import time

    from . import atomic  # imported now: the watchdog must not import while the main thread may hold the import lock

    _state["interrupted"] = _state["reporting"] = False
    _state["atomic"] = atomic
    _state["sleep"] = time.sleep
    if _state["wake"] is None and _state["program"]:  # never force-exit a program that merely calls main()
        read_end, write_end = os.pipe()
        _state["wake"] = write_end
        threading.Thread(target=_watchdog, args=(read_end,), name="sftdiff-interrupt", daemon=True).start()
    _state["previous"] = signal.signal(signal.SIGINT, _interrupt)
    _state["unraisable"] = sys.unraisablehook
    sys.unraisablehook = _unraisable


def finished() -> None:
    """At the end of `main`: SIGINT is ignored from here on when this process is the command, else
    the handler that was there before `install` is restored."""
    if not _main_thread() or _state["previous"] is None:
        return
    if _state["program"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, _state["previous"])
        sys.unraisablehook = _state["unraisable"]


def interrupted() -> bool:
    return bool(_state["interrupted"])


def guard(run, *args, **kwargs):  # noqa: ANN001, ANN201 - typing is not imported here (see above)
    """Call `run`; after a SIGINT, whatever it raises is reported as the interrupt (an import that a
    KeyboardInterrupt broke raises ImportError, a library may wrap it in its own error)."""
    try:
        result = run(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if _state["interrupted"]:
            raise KeyboardInterrupt from None
        _state["reporting"] = True
        raise
    _state["reporting"] = True
    return result


def _interrupt(signum: int, frame: object) -> None:
    if _state["interrupted"] or _state["reporting"]:
        return  # already unwinding (the watchdog bounds it), or only the report is left
    atomic = _state.get("atomic")
    if atomic is not None and atomic.finishing():
        return  # the output is in place: finish reporting it
    _state["interrupted"] = True
    try:
        os.write(_state["wake"], b"x")
    except (OSError, TypeError):
        pass
    raise KeyboardInterrupt


def _unraisable(args: object) -> None:
    """A KeyboardInterrupt raised inside a weakref callback or `__del__` is printed as "Exception
    ignored" and dropped, and the command would go on: deliver the interrupt again instead."""
    if issubclass(getattr(args, "exc_type", type(None)), KeyboardInterrupt) and _state["interrupted"]:
        _state["interrupted"] = False
        signal.raise_signal(signal.SIGINT)  # its handler runs once this callback has returned
        return
    _state["unraisable"](args)


def _watchdog(read_end: int) -> None:
    try:
        os.read(read_end, 1)
    except OSError:
        return
    _state["sleep"](GRACE)
    atomic = _state.get("atomic")
    if atomic is not None:
        try:
            atomic.remove_unfinished()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    announce()
    os._exit(EXIT_CODE)
