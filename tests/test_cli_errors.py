"""Every command, every kind of bad argument: one line on stderr, the documented exit code, no traceback.

The commands are listed from `sftdiff.cli.COMMANDS` when the test runs, so a new command is walked
without editing this file. For each one a valid invocation is built from its click parameters (a
tiny base and fine-tune, a diff, a text file), then one argument is spoiled at a time:

| kind | what | exit |
|---|---|---|
| unknown-option | `--no-such-option` added | 2 |
| missing-argument | no arguments at all | 2 |
| wrong-type | `abc` for the first int/float option (or argument) | 2 |
| out-of-range | a value outside the option's range (`--density 2`, `--rank 0`, `--batch-size 0`, ...) | 2 |
| missing-file | the first path argument names nothing | 3 |
| wrong-kind-of-file | the first path argument is a text file of garbage | 3 |
| directory-for-file | the first file argument is an empty folder (or a folder argument is a text file) | 3 |

Usage errors (2) end with `; see 'sftdiff CMD --help'`. An input path that does not exist or is
the wrong kind is bad input (3), whether click or the library notices it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sftdiff import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ["unknown-option", "missing-argument", "wrong-type", "out-of-range", "missing-file",
         "wrong-kind-of-file", "directory-for-file"]
EXIT = {"unknown-option": 2, "missing-argument": 2, "wrong-type": 2, "out-of-range": 2, "missing-file": 3,
        "wrong-kind-of-file": 3, "directory-for-file": 3}
# Values outside an option's range, for options whose range the command checks itself.
OUT_OF_RANGE = {"--density": "2", "--rank": "0", "-k": "-5", "--batch-size": "0", "--seq-len": "1",
                "--steps": "-1", "--drop": "1.5", "--threshold": "-1", "--shard-size": "1B", "--lr": "-1"}
# Options a valid invocation needs that click does not mark required (checked by the command).
EXTRA_VALID = {"create": ["--density", "0.5"], "prune": ["--density", "0.5"], "train": ["--density", "0.5"],
               "filter": ["--exclude", "nothing*"]}


def _commands() -> list[str]:
    return list(cli.COMMANDS)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT base and fine-tune (with a new head), a diff of them, a text corpus, a labelled
    file, a garbage file and an empty folder."""
    import numpy as np
    import torch
    import transformers

    import sftdiff

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("cli-errors")
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.BertForMaskedLM(config).eval()
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    base.save_pretrained(root / "ft")
    sftdiff.create_diff(root / "base", root / "ft", density=0.05).save(root / "diff.sft")
    (root / "corpus.txt").write_text("a b c d e f g\n" * 20, encoding="utf-8")
    (root / "labelled.jsonl").write_text('{"text": "a b", "label": 0}\n' * 4, encoding="utf-8")
    (root / "garbage.sft").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "empty").mkdir()
    (root / "out").mkdir()
    return {name: root / name for name in ("base", "ft", "diff.sft", "corpus.txt", "labelled.jsonl",
                                           "garbage.sft", "empty", "out")}


def _command(name: str) -> click.Command:
    command = cli.cli.get_command(click.Context(cli.cli), name)
    assert command is not None, f"{name} is in COMMANDS but does not load"
    return command


def _option_value(option: click.Option, files: dict[str, Path], out: Path) -> list[str]:
    """A valid value for a required option."""
    flag = option.opts[0]
    if "-o" in option.opts or "--output" in option.opts:
        return [flag, str(out)]
    if option.name in ("text", "eval_text"):
        return [flag, str(files["corpus.txt"])]
    if option.name == "data":
        return [flag, str(files["labelled.jsonl"])]
    if isinstance(option.type, click.Choice):
        return [flag, str(option.type.choices[0])]
    if option.type in (click.INT, click.FLOAT) or isinstance(option.type, (click.IntRange, click.FloatRange)):
        return [flag, "1"]
    return [flag, str(files["diff.sft"])]


def _valid_invocation(name: str, files: dict[str, Path], out: Path) -> tuple[list[str], list[int]]:
    """Arguments that make a plausible invocation, and the positions of its path arguments."""
    command = _command(name)
    args: list[str] = [name]
    paths: list[int] = []
    for param in command.params:
        if isinstance(param, click.Argument):
            if param.type in (click.FLOAT, click.INT):
                args.append("0.5" if param.type is click.FLOAT else "1")
                continue
            paths.append(len(args))
            args.append(str(files["base" if param.name == "base" else "ft" if param.name == "finetuned"
                                 else "diff.sft"]))
            if param.nargs == -1 and name not in ("evaluate",):
                args.append(str(files["diff.sft"]))
        elif isinstance(param, click.Option) and param.required:
            args += _option_value(param, files, out)
    return args + EXTRA_VALID.get(name, []), paths


def _spoil(kind: str, name: str, files: dict[str, Path], out: Path) -> list[str] | None:
    """The invocation with one bad argument of `kind`, or None when the command has nothing of that kind."""
    args, paths = _valid_invocation(name, files, out)
    command = _command(name)
    options = [p for p in command.params if isinstance(p, click.Option)]
    if kind == "unknown-option":
        return args + ["--no-such-option"]
    if kind == "missing-argument":
        return [name] if any(p.required for p in command.params) else None
    if kind == "wrong-type":
        numeric = [o for o in options if o.type in (click.INT, click.FLOAT)
                   or isinstance(o.type, (click.IntRange, click.FloatRange))]
        if numeric:
            return args + [numeric[0].opts[0], "abc"]
        # else a numeric argument (`scale DIFF FACTOR`)
        numbers = [i for i, a in enumerate(args) if a in ("0.5", "1") and i > 0]
        return args[:numbers[0]] + ["abc"] + args[numbers[0] + 1:] if numbers else None
    if kind == "out-of-range":
        for option in options:
            for flag in option.opts:
                if flag in OUT_OF_RANGE:
                    return _replace_option(args, option.opts) + [flag, OUT_OF_RANGE[flag]]
        return None
    if not paths:
        return None
    i = paths[0]
    is_folder = args[i] in (str(files["base"]), str(files["ft"]))
    if kind == "missing-file":
        args[i] = str(files["empty"] / "nope" / ("model" if is_folder else "x.sft"))
    elif kind == "wrong-kind-of-file":
        args[i] = str(files["garbage.sft"])
    else:  # a folder where a file is expected, or a file where a model folder is expected (not a diff:
        # a diff given as BASE is recognized as swapped arguments, a usage error)
        args[i] = str(files["corpus.txt"] if is_folder else files["empty"])
    return args


def _replace_option(args: list[str], opts: list[str]) -> list[str]:
    """`args` without an option already given (so the spoiled value is the only one)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in opts:
            skip = True
            continue
        out.append(a)
    return out


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "sftdiff", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def walk(files, tmp_path_factory) -> dict[tuple[str, str], tuple[list[str] | None, Path, Any]]:
    """Every (command, kind) run once, a few at a time (each is a separate `python -m sftdiff`)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {}
    for name in _commands():
        for kind in KINDS:
            folder = tmp_path_factory.mktemp(f"{name}-{kind}")
            jobs[(name, kind)] = (_spoil(kind, name, files, folder / "result.sft"), folder)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(_run, args, folder) for key, (args, folder) in jobs.items() if args is not None}
        return {key: (args, folder, futures[key].result() if key in futures else None)
                for key, (args, folder) in jobs.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", _commands())
def test_bad_argument_is_one_line_with_the_documented_exit_code(name, kind, walk):
    args, tmp_path, proc = walk[(name, kind)]
    if args is None:
        pytest.skip(f"{name} has no argument of this kind")
    lines = proc.stderr.strip().splitlines()
    where = f"sftdiff {' '.join(args)}\nexit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, where
    assert len(lines) == 1, where
    assert lines[0].startswith("sftdiff: error: "), where
    assert proc.returncode == EXIT[kind], where
    if EXIT[kind] == 2:
        assert lines[0].endswith(f"; see 'sftdiff {name} --help'"), where
    if kind in ("wrong-type", "out-of-range") and args[-1] in ("abc", *OUT_OF_RANGE.values()):
        flag, value = args[-2], args[-1]  # refused for the spoiled value, not for something else
        assert flag.lstrip("-") in lines[0] or f"'{value}'" in lines[0], where
    assert not (tmp_path / "result.sft").exists(), where  # nothing written on a refused command


def test_every_command_is_walked():
    """The walk covers every registered command with at least the kinds every command has."""
    for name in _commands():
        command = _command(name)
        assert any(isinstance(p, click.Argument) for p in command.params) or name == "evaluate", name


def test_click_usage_error_is_one_line_in_process(capsys):
    """The 3-line usage block click prints is replaced by one line (in-process check of main)."""
    with pytest.raises(SystemExit) as info:
        cli.main(["create", "a", "b", "-o", "x.sft", "--density", "2"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftdiff: error: --density must be in (0, 1]")
    assert lines[0].endswith("; see 'sftdiff create --help'")


def test_rank_zero_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", str(tmp_path / "x.sft"), "--rank", "0", "-o", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank" in err[0] and err[0].endswith("see 'sftdiff convert --help'")


def test_library_usage_errors_get_the_help_hint_too(capsys, tmp_path):
    """A usage error the library raises (not click) is worded the same way."""
    from sftdiff.diff import SparseDiff

    SparseDiff({}).save(tmp_path / "d.sft")
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", str(tmp_path / "d.sft"), "-o", str(tmp_path / "noext")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "pass --to" in err[0] and err[0].endswith("; see 'sftdiff convert --help'")


def test_bare_sftdiff_shows_the_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("Usage: sftdiff") and "Commands:" in err


# --- the console script's exit (cli.run) ----------------------------------------------------------

class _Exited(Exception):
    def __init__(self, code: int):
        self.code = code


def _run_script(monkeypatch, argv: list[str]) -> tuple[str, object]:
    """cli.run() in-process: ("fast", code) when it left through os._exit, ("python", code) when
    through SystemExit (Python's own exit)."""
    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["sftdiff", *argv])
    try:
        cli.run()
    except _Exited as e:
        return "fast", e.code
    except SystemExit as e:
        return "python", e.code
    raise AssertionError("cli.run() returned")


def test_run_leaves_with_mains_exit_code_skipping_teardown(monkeypatch, capsys, tmp_path):
    """Success and each error code come out of os._exit unchanged, with the report printed."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert _run_script(monkeypatch, ["--version"]) == ("fast", 0)
    assert "sftdiff" in capsys.readouterr().out
    assert _run_script(monkeypatch, ["create", "a", "b", "-o", str(tmp_path / "x.sft"), "--density", "2"]) == ("fast", 2)
    assert "--density must be in (0, 1]" in capsys.readouterr().err
    assert _run_script(monkeypatch, ["inspect", str(tmp_path / "missing.sft")]) == ("fast", 3)


def test_run_keeps_pythons_exit_when_torch_is_loaded_or_threads_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())
    assert _run_script(monkeypatch, ["--version"]) == ("python", 0)  # torch's exit hooks must run
    monkeypatch.delitem(sys.modules, "torch")
    import threading

    release = threading.Event()
    worker = threading.Thread(target=release.wait)  # a non-daemon thread Python would wait for
    worker.start()
    try:
        assert _run_script(monkeypatch, ["--version"]) == ("python", 0)
    finally:
        release.set()
        worker.join()


def test_console_script_output_is_complete_through_a_pipe(tmp_path):
    """`python -m sftdiff` (cli.run) flushes what it printed before leaving."""
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in cli.COMMANDS)
    assert "Show this message and exit" in proc.stdout  # click's last option line: the whole help came out
