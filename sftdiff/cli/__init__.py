"""The `sftdiff` command line: a click group whose commands are imported only when invoked.

Each command lives in its own module and only parses options, calls the library and prints; so
`sftdiff --help` and file-level commands start without importing torch or transformers.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import sys

import click

from .. import interrupt as _interrupt

from ..errors import SftError

# command name -> "module:function" (relative to this package)
COMMANDS = {
    "inspect": "inspect:inspect_cmd",
    "create": "create:create_cmd",
    "apply": "apply:apply_cmd",
    "prune": "algebra:prune_cmd",
    "add": "algebra:add_cmd",
    "subtract": "algebra:subtract_cmd",
    "scale": "algebra:scale_cmd",
    "overlap": "algebra:overlap_cmd",
    "filter": "algebra:filter_cmd",
    "merge": "merge:merge_cmd",
    "convert": "convert:convert_cmd",
    "retrain": "train:retrain_cmd",
    "train": "train:train_cmd",
    "evaluate": "evaluate:evaluate_cmd",
}

SHORT_HELP = {
    "inspect": "Summarize a diff: metadata, totals and a per-tensor table.",
    "create": "Make a top-k diff from a base and a fully fine-tuned checkpoint.",
    "apply": "Bake a base plus diffs into a standalone checkpoint.",
    "prune": "Keep only the largest values of a diff.",
    "add": "Add diffs (union of indices, values summed).",
    "subtract": "Subtract one diff from another (A - B).",
    "scale": "Multiply a diff's values by a factor.",
    "overlap": "Measure how much two diffs overlap (interference analysis).",
    "filter": "Keep or drop a diff's entries by name (e.g. drop a head).",
    "merge": "Merge many diffs into one (TIES, DARE, DARE-TIES, weighted sum).",
    "convert": "Convert diffs to and from other frameworks' formats.",
    "retrain": "Retrain exactly a diff's entries from the base on a text corpus.",
    "train": "Run the whole LT-SFT pipeline on a text corpus.",
    "evaluate": "Accuracy or LM loss of a base plus diffs, applied in memory.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(f"{__name__}.{module}") is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        _import_numpy_without_blas_threads()  # here, not in `main`: `sftdiff --help` needs no numpy
        module, func = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), func)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing commands must not import them (that is what makes --help fast).
        rows = [(name, SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sftdiff")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Sparse fine-tuning diffs: create, inspect, compose, apply and convert .sft files."""
    ctx.obj = {"debug": debug}


# click >= 8.2 raises this for a bare `sftdiff` (older versions print the help themselves)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(message: str) -> str:
    return " ".join(str(message).strip().split())


def _command_path(args: list[str]) -> str:
    """`sftdiff CMD` for the command named in `args` (the first known command word), else `sftdiff`."""
    command = next((a for a in args if a in COMMANDS), None)
    return f"sftdiff {command}" if command else "sftdiff"


def _bad_input_path(e: click.ClickException) -> bool:
    """click refused a path argument for not existing or being the wrong kind (click.Path checks)."""
    param = getattr(e, "param", None)
    return (isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter) and param is not None
            and isinstance(param.type, click.Path) and bool(param.type.exists))


def _help_hint(command_path: str) -> str:
    return f"; see '{command_path} --help'"


def _import_numpy_without_blas_threads() -> None:
    """Import numpy, which every command uses, with its OpenBLAS limited to one thread unless the
    user set OPENBLAS_NUM_THREADS. Called when a command is looked up, before its module is imported
    (which may import numpy itself); `sftdiff --help` and `--version` look none up and skip numpy.
    At load OpenBLAS starts a thread per core that spins for a while (~0.07 s of CPU on 2 cores, a
    tenth of a 110M-parameter apply), and no command does linear algebra in numpy (torch has its own
    threads). OpenBLAS reads the variable only when it loads, so it is removed again afterwards and
    nothing else in the process (or a child) sees it. The garbage collector is paused meanwhile: the
    import makes many objects and no cycles worth collecting (~5 ms of CPU)."""
    if "numpy" in sys.modules:
        return
    ours = "OPENBLAS_NUM_THREADS" not in os.environ  # a user's own setting is kept as it is
    collecting = gc.isenabled()
    if ours:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    gc.disable()
    try:
        import numpy  # noqa: F401
    finally:
        if ours:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        if collecting:
            gc.enable()


def _print_traceback() -> None:
    import traceback  # only for --debug: ~1.5 ms of CPU that no other path of the CLI needs

    traceback.print_exc()


def main(argv: list[str] | None = None) -> None:
    """Entry point: library errors become one line on stderr and a documented exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        _interrupt.install()
        _interrupt.guard(cli.main, args=args, prog_name="sftdiff", standalone_mode=False)
    except click.exceptions.Abort:
        _interrupt.exit()
    except _NO_ARGS_IS_HELP as e:  # bare `sftdiff`: the help itself, as click shows it
        click.echo(e.ctx.get_help(), err=True)
        sys.exit(2)
    except click.ClickException as e:
        # One line, as every other error: click's own format is a usage block of three lines.
        usage = isinstance(e, click.UsageError)
        message = _one_line(e.format_message()).rstrip(".")
        command = (e.ctx.command_path if usage and e.ctx is not None else "") or _command_path(args)
        if _bad_input_path(e):  # a missing file, or a folder for a file: bad input (3), as the library says
            click.echo(f"sftdiff: error: {message}", err=True)
            sys.exit(3)
        click.echo(f"sftdiff: error: {message}{_help_hint(command) if usage else ''}", err=True)
        sys.exit(2 if usage else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except SftError as e:
        if debug:
            _print_traceback()
        message = _one_line(str(e))  # one line, whatever a message quoted from a file holds
        hint = _help_hint(_command_path(args)) if e.exit_code == 2 else ""
        click.echo(f"sftdiff: error: {message}{hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupt.exit()
    except OSError as e:
        if debug:
            _print_traceback()
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"sftdiff: error: {e.strerror or e}{where}", err=True)
        sys.exit(5)
    except MemoryError:
        click.echo("sftdiff: error: out of memory", err=True)
        sys.exit(5)
    finally:
        _interrupt.finished()


def run() -> None:
    """The `sftdiff` console script and `python -m sftdiff`: `main`, then leave without the
    interpreter's teardown when nothing needs it.

    Tearing down (a last garbage collection, freeing every module, numpy's included) costs
    50–70 ms of CPU after the work is done, a twentieth of a BERT-base create or apply. Once `main`
    has returned, every output is in place and fsynced and every pool joined, so a file-level
    command can leave at once, with stdout and stderr flushed. Not when torch is loaded (its exit
    hooks stop worker processes) or a non-daemon thread still runs (Python would wait for it), and
    not for `main` called in-process (tests, scripts): they keep Python's own exit."""
    code: object = 0
    try:
        main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    if not isinstance(code, int) or "torch" in sys.modules or not _only_daemon_threads():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def _only_daemon_threads() -> bool:
    import threading  # loaded already: the interrupt watchdog is a thread

    return all(t.daemon or t is threading.main_thread() for t in threading.enumerate())
