"""The `sftdiff` command line: a click group whose commands are imported only when invoked.

Each command lives in its own module and only parses options, calls the library and prints; so
`sftdiff --help` and file-level commands start without importing torch or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback

import click

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
    "convert": "convert:convert_cmd",
    "retrain": "train:retrain_cmd",
    "train": "train:train_cmd",
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
    "convert": "Convert diffs to and from other frameworks' formats.",
    "retrain": "Retrain exactly a diff's entries from the base on a text corpus.",
    "train": "Run the whole LT-SFT pipeline on a text corpus.",
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: library errors become one line on stderr and a documented exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="sftdiff", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sftdiff: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except SftError as e:
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).strip().splitlines())  # one line, whatever a message quoted from a file holds
        click.echo(f"sftdiff: error: {message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("sftdiff: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"sftdiff: error: {e.strerror or e}{where}", err=True)
        sys.exit(5)
    except MemoryError:
        click.echo("sftdiff: error: out of memory", err=True)
        sys.exit(5)
