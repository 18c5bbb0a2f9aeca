"""Interrupted runs, full disks, denied permissions, concurrent writers and hostile pickles.

Every command that writes (create, prune, add, subtract, scale, convert, filter, merge, apply, retrain,
train) is one parametrized case of each test, run as a real `sftdiff` subprocess on tiny fixtures:
- killed (SIGKILL) deterministically as soon as its temporary output exists and just before the
  rename into place, then at seeded random delays over its run: the final path is absent or
  complete and valid, temporaries are clearly named and removed by the next run, inputs unchanged;
- under RLIMIT_FSIZE (disk full), on a full or read-only tmpfs, and into a folder it may not write:
  exit 5, one line on stderr, no partial file left;
- exit codes: 2 for usage, 3 for a corrupt input, 5 for an existing output;
- Ctrl-C (SIGINT) at random moments: exit 130, one line, nothing left (or exit 0 if it finished).
A command that has not landed yet fails its cases (it does not skip).
"""

from __future__ import annotations

import importlib
import contextlib
import ctypes
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sftdiff.atomic import TMP_MARK, atomic_path
from sftdiff.checkpoint import Checkpoint
from sftdiff.errors import FormatError, OutputError

from reliability_fixtures import (COMMANDS_BY_NAME, WRITING_COMMANDS, Fixtures, WritingCommand, build_fixtures,
                                  check_output, child_env, cli_argv, command_landed, leftovers,
                                  pickle_payload_file, run_and_kill, run_cli, tree_hashes)

ALL = [pytest.param(c, id=c.name) for c in WRITING_COMMANDS]
LIGHT = [pytest.param(c, id=c.name) for c in WRITING_COMMANDS if not c.heavy]
SIGKILLED = -signal.SIGKILL


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fx() -> Fixtures:
    """Tiny model, fine-tune, diffs, composable pickle and corpus, in a folder every user can read
    (the permission test runs the CLI without root's file-access override)."""
    root = Path(tempfile.mkdtemp(prefix="sftdiff-reliability-"))
    try:
        root.chmod(0o755)
        fixtures = build_fixtures(root)
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield fixtures
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def input_hashes(fx) -> dict[str, str]:
    return tree_hashes(*fx.inputs())


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def require(cmd: WritingCommand) -> None:
    if not command_landed(cmd.name):
        pytest.fail(f"`sftdiff {cmd.name}` has not landed yet (no sftdiff/cli module for it)")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's error output must be exactly one `sftdiff: error:` line (progress bars aside)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "%|" not in ln]
    errors = [ln for ln in lines if ln.startswith("sftdiff: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def assert_inputs_unchanged(fx: Fixtures, before: dict[str, str]) -> None:
    assert tree_hashes(*fx.inputs()) == before, "an input file was modified"


# ---------------------------------------------------------------- killed runs


@pytest.mark.parametrize("cmd", ALL)
def test_killed_run_leaves_nothing_or_a_valid_output(cmd, fx, input_hashes, out_dir, tmp_path):
    """Deterministic kills (temp just created, temp complete before the rename), a clean rerun,
    then kills at seeded random delays: each final path is absent or valid, never partial."""
    require(cmd)
    final = out_dir / cmd.out_name
    hooks = ["kill-before-commit"] if cmd.heavy else ["kill-when-temp-appears", "kill-before-commit"]
    for hook in hooks:
        marker = tmp_path / f"{hook}.fired"
        result = run_cli(cmd.argv(fx, final), hook=hook, marker=marker)
        assert marker.exists(), (f"{cmd.name} never created its output through sftdiff.atomic.atomic_path "
                                 f"(exit {result.returncode}): {result.stderr[-2000:]}")
        assert result.returncode == SIGKILLED, result.stderr[-2000:]
        assert not final.exists(), f"{hook}: a killed run left {final}"
        assert leftovers(out_dir), f"{hook}: expected the abandoned temporary, clearly named"

    started = time.monotonic()
    result = run_cli(cmd.argv(fx, final))
    duration = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    check_output(final, cmd.kind)
    assert leftovers(out_dir) == [], "the next run did not remove the killed runs' temporaries"

    rng = random.Random(f"kill-{cmd.name}")
    finals = {final.name}
    for i in range(1 if cmd.heavy else 4):
        target = out_dir / f"k{i}-{cmd.out_name}"
        finals.add(target.name)
        delay = duration * rng.uniform(0.3, 1.05)
        run_and_kill(cmd.argv(fx, target), delay)
        if target.exists():
            check_output(target, cmd.kind)
        stray = [p.name for p in out_dir.iterdir() if p.name not in finals and TMP_MARK not in p.name]
        assert not stray, f"killed after {delay:.2f}s: unmarked files {stray}"
    assert_inputs_unchanged(fx, input_hashes)


# ---------------------------------------------------------------- resource errors


def _fsize_limit(nbytes: int):
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


@pytest.mark.parametrize("cmd", ALL)
def test_disk_full_exits_5_and_leaves_nothing(cmd, fx, input_hashes, out_dir):
    """RLIMIT_FSIZE makes every write past 1 KiB fail with EFBIG, as a full disk would."""
    require(cmd)
    final = out_dir / cmd.out_name
    result = run_cli(cmd.argv(fx, final), preexec_fn=_fsize_limit(1024))
    assert result.returncode == 5, result.stderr[-3000:]
    line = one_error_line(result)
    assert "large" in line or "space" in line, line
    assert not final.exists() and leftovers(out_dir) == [] and list(out_dir.iterdir()) == []
    assert_inputs_unchanged(fx, input_hashes)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A small tmpfs at `folder` (root only); skips when mounting is not permitted here."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()[:100]}); RLIMIT_FSIZE covers disk full")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("cmd", LIGHT)
def test_full_tmpfs_exits_5_and_leaves_nothing(cmd, fx, tmp_path):
    require(cmd)
    # One page: every command's output is larger (create's ~12 KB fits in 12k since it no longer spools).
    with tmpfs(tmp_path / "small", "size=4k") as folder:
        final = folder / cmd.out_name
        result = run_cli(cmd.argv(fx, final))
        assert result.returncode == 5, result.stderr[-3000:]
        assert "no space left" in one_error_line(result)
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("cmd", LIGHT)
def test_read_only_filesystem_exits_5(cmd, fx, tmp_path):
    require(cmd)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        result = run_cli(cmd.argv(fx, folder / cmd.out_name))
        assert result.returncode == 5, result.stderr[-3000:]
        one_error_line(result)
        assert list(folder.iterdir()) == []


def _without_root_file_access() -> None:
    """preexec: drop the capabilities that let root ignore file permissions (DAC_OVERRIDE,
    DAC_READ_SEARCH, FOWNER) from the bounding set, so the exec'd CLI obeys mode bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _permission_preexec(probe_dir: Path):
    """What makes a 0555 folder unwritable for the CLI: nothing for a normal user; for root, the
    capability drop above (checked to work, else the test cannot run here)."""
    if os.geteuid() != 0:
        return None
    probe = subprocess.run([sys.executable, "-c", f"open({str(probe_dir / 'probe')!r}, 'w')"],
                           preexec_fn=_without_root_file_access, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("cannot make root obey file permissions here (no CAP_SETPCAP)")
    return _without_root_file_access


@pytest.mark.parametrize("cmd", LIGHT)  # retrain/train save through the same SparseDiff.save as prune
def test_permission_denied_exits_5(cmd, fx, input_hashes, out_dir):
    require(cmd)
    out_dir.chmod(0o555)
    try:
        preexec = _permission_preexec(out_dir)
        result = run_cli(cmd.argv(fx, out_dir / cmd.out_name), preexec_fn=preexec,
                         env={"HOME": str(out_dir.parent)})
        assert result.returncode == 5, result.stderr[-3000:]
        assert "permission denied" in one_error_line(result).lower()
        assert list(out_dir.iterdir()) == []
    finally:
        out_dir.chmod(0o755)
    assert_inputs_unchanged(fx, input_hashes)


# ---------------------------------------------------------------- concurrency


def _start(args: list[str], hook: str | None = None) -> subprocess.Popen:
    env = child_env(**({"SFTDIFF_TEST_HOOK": hook} if hook else {}))
    return subprocess.Popen(cli_argv(args, hook), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("name", ["prune", "apply"])
def test_concurrent_writers_of_different_outputs_both_succeed(name, fx, out_dir):
    cmd = COMMANDS_BY_NAME[name]
    require(cmd)
    finals = [out_dir / f"{i}-{cmd.out_name}" for i in range(2)]
    procs = [_start(cmd.argv(fx, f), hook="sleep-before-commit:0.5") for f in finals]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for f in finals:
        check_output(f, cmd.kind)
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("name", ["prune", "apply"])
def test_concurrent_writers_of_one_output_one_wins(name, fx, out_dir):
    """Both pass the up-front existence check, then meet at the commit (each waits 1.5 s before
    it): one wins, the other exits 5 saying so, and the output is the winner's, whole."""
    cmd = COMMANDS_BY_NAME[name]
    require(cmd)
    final = out_dir / cmd.out_name
    procs = [_start(cmd.argv(fx, final), hook="sleep-before-commit:1.5") for _ in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 5], results
    loser = next(err for code, err in results if code == 5)
    assert str(final) in loser and ("someone else" in loser or "exists" in loser), loser
    check_output(final, cmd.kind)
    assert leftovers(out_dir) == []


def test_atomic_commit_never_clobbers_a_file_that_appeared_meanwhile(tmp_path):
    final = tmp_path / "x.sft"
    with pytest.raises(OutputError, match="someone else"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"mine")
            final.write_bytes(b"theirs")
    assert final.read_bytes() == b"theirs" and leftovers(tmp_path) == []


def test_atomic_commit_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    final = tmp_path / "baked"
    with pytest.raises(OutputError):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"mine")
            final.mkdir()
            (final / "theirs").write_bytes(b"theirs")
    assert [p.name for p in final.iterdir()] == ["theirs"] and leftovers(tmp_path) == []


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    """clean_stale removes temporaries of dead writers only: a concurrent live writer keeps its own."""
    from sftdiff.atomic import clean_stale

    final = tmp_path / "x.sft"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        live_tmp = tmp_path / f".x.sft{TMP_MARK}{sleeper.pid}-aaaaaaaa"
        dead_tmp = tmp_path / f".x.sft{TMP_MARK}{dead.pid}-bbbbbbbb"
        live_tmp.write_bytes(b"in progress")
        dead_tmp.write_bytes(b"abandoned")
        clean_stale(final)
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- no code execution


def _payload_base(folder: Path, marker: Path, zip_format: bool) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    pickle_payload_file(folder / "pytorch_model.bin", marker, zip_format=zip_format)
    return folder


def test_payload_is_live_when_loaded_unsafely(tmp_path):
    """Control: the crafted file really runs code under a plain torch.load, so the tests below
    prove a refusal, not a broken payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    pickle_payload_file(path, marker, zip_format=True)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   capture_output=True, timeout=120, env=child_env())
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pytorch_model_bin_payload_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    base = _payload_base(tmp_path / "base", marker, zip_format)
    with pytest.raises(FormatError):
        Checkpoint.open(base)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pytorch_model_bin_payload_through_the_cli(tmp_path, fx, zip_format):
    marker = tmp_path / "pwned"
    base = _payload_base(tmp_path / "base", marker, zip_format)
    result = run_cli(["apply", str(base), str(fx.diff_a), "-o", str(tmp_path / "baked")])
    assert result.returncode == 3, result.stderr[-2000:]
    one_error_line(result)
    assert not marker.exists() and not (tmp_path / "baked").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pytorch_diff_bin_payload_never_runs(tmp_path, zip_format):
    from sftdiff.sources import open_diff

    marker = tmp_path / "pwned"
    path = tmp_path / "composable" / "pytorch_diff.bin"
    path.parent.mkdir()
    pickle_payload_file(path, marker, zip_format=zip_format)
    with pytest.raises(FormatError):
        open_diff(str(path))
    with pytest.raises(FormatError):
        open_diff(str(path.parent))
    result = run_cli(["inspect", str(path)])
    assert result.returncode == 3, result.stderr[-2000:]
    one_error_line(result)
    assert not marker.exists()


@pytest.mark.parametrize("peft_type", ["SFT", "LORA"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_adapter_model_bin_payload_never_runs(tmp_path, fx, peft_type, zip_format):
    from sftdiff.formats import load_foreign

    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(f'{{"peft_type": "{peft_type}", "r": 2, "lora_alpha": 4}}')
    pickle_payload_file(adapter / "adapter_model.bin", marker, zip_format=zip_format)
    with pytest.raises(FormatError):
        load_foreign(str(adapter), base=Checkpoint.open(fx.base))
    result = run_cli(["convert", str(adapter), "--base", str(fx.base), "-o", str(tmp_path / "x.sft")])
    assert result.returncode == 3, result.stderr[-2000:]
    one_error_line(result)
    assert not marker.exists() and not (tmp_path / "x.sft").exists()


# ---------------------------------------------------------------- exit codes


@pytest.mark.parametrize("cmd", ALL)
def test_existing_output_exits_5_and_is_left_alone(cmd, fx, out_dir):
    require(cmd)
    final = out_dir / cmd.out_name
    if cmd.kind == "checkpoint":
        final.mkdir()
        (final / "keep").write_text("precious")
    else:
        final.write_text("precious")
    result = run_cli(cmd.argv(fx, final))
    assert result.returncode == 5, result.stderr[-2000:]
    assert "exists" in one_error_line(result)
    kept = final / "keep" if cmd.kind == "checkpoint" else final
    assert kept.read_text() == "precious" and leftovers(out_dir) == []


@pytest.fixture(scope="module")
def bad_fx(fx) -> Fixtures:
    """The same fixtures with every model and diff input truncated (corpus kept)."""
    root = fx.root / "bad"
    root.mkdir(exist_ok=True)
    base = root / "base"
    if not base.exists():
        shutil.copytree(fx.base, base)
        weights = base / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        sft = root / "a.sft"
        sft.write_bytes(fx.diff_a.read_bytes()[:500])
        (root / "composable").mkdir()
        (root / "composable" / "pytorch_diff.bin").write_bytes(fx.composable.read_bytes()[:400])
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    return replace(fx, root=root, base=base, finetuned=base, diff_a=root / "a.sft", diff_b=root / "a.sft",
                   composable=root / "composable" / "pytorch_diff.bin")


@pytest.mark.parametrize("cmd", ALL)
def test_corrupt_input_exits_3(cmd, bad_fx, out_dir):
    require(cmd)
    result = run_cli(cmd.argv(bad_fx, out_dir / cmd.out_name))
    assert result.returncode == 3, result.stderr[-3000:]
    one_error_line(result)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("cmd", ALL)
def test_unknown_option_exits_2(cmd, fx, out_dir):
    require(cmd)
    result = run_cli([*cmd.argv(fx, out_dir / cmd.out_name), "--no-such-option"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert list(out_dir.iterdir()) == []


def test_wrong_base_exits_4(fx, out_dir):
    """A diff recording the base's digests, applied to the fine-tune: verification failure."""
    require(COMMANDS_BY_NAME["apply"])
    result = run_cli(["apply", str(fx.finetuned), str(fx.diff_a), "-o", str(out_dir / "baked")])
    assert result.returncode == 4, result.stderr[-2000:]
    one_error_line(result)
    assert list(out_dir.iterdir()) == []


def test_corpus_without_maskable_tokens_is_bad_input(fx, tmp_path):
    """A corpus the tokenizer maps entirely to [UNK] (a special token) leaves MLM nothing to mask:
    that is bad input (exit 3), not a crash."""
    require(COMMANDS_BY_NAME["retrain"])
    corpus = tmp_path / "unknown-words.txt"
    corpus.write_text("\n".join("zzqx qqzx xxqz zqzq" for _ in range(40)) + "\n", encoding="utf-8")
    out = tmp_path / "r.sft"
    result = run_cli(["retrain", str(fx.base), str(fx.diff_a), "-o", str(out), "--steps", "2", "--text", str(corpus),
                      "--objective", "mlm", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--quiet"])
    assert result.returncode == 3, result.stderr[-2000:]
    one_error_line(result)
    assert not out.exists()


# ---------------------------------------------------------------- Ctrl-C


def _startup_seconds() -> float:
    """How long this interpreter takes to start (site, the editable-install finder) before any code
    of the package can run: a SIGINT before then is Python's to handle, not sftdiff's."""
    runs = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], env=child_env(), check=True)
        runs.append(time.monotonic() - started)
    return sorted(runs)[1]


def _before_any_sftdiff_code(result: subprocess.CompletedProcess) -> bool:
    """A SIGINT that arrived while the interpreter itself was starting (site, runpy), before the first
    line of `sftdiff/__init__.py` installs the handler: killed by it, or one of Python's startup
    errors ("Fatal Python error: init_import_site", "Could not import runpy module"), with no frame
    of the package in the traceback but that first line. Under load this takes up to ~0.3 s here (the editable
    install's import hook runs in site), so some early samples land there."""
    import re

    # ... or while the first line of sftdiff/__init__.py was still loading the module that handles it
    # (that line, and interrupt.py's own module-level imports, before its handler exists)
    err = re.sub(r'File "[^"]*/sftdiff/__init__\.py", line \d+, in <module>\n\s+from \. import interrupt[^\n]*',
                 "", result.stderr)
    err = re.sub(r'File "[^"]*/sftdiff/interrupt\.py", line \d+, in <module>\n\s+(?:from \S+ )?import [^\n]*',
                 "", err)
    return (result.returncode in (-signal.SIGINT, 1) and "/sftdiff/" not in err and "sftdiff:" not in err
            and (not err or err.rstrip().endswith("KeyboardInterrupt")))


def _interrupt_at(args: list[str], delay: float) -> tuple[subprocess.CompletedProcess, float]:
    proc = subprocess.Popen(cli_argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{args[0]}: still running 20 s after a SIGINT at {delay:.3f}s (hung): {err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - started


def test_ctrl_c_at_random_moments_exits_130_one_line_nothing_left(fx, input_hashes, tmp_path):
    """SIGINT at seeded random moments of every light writing command (~1 s runs): each run ends
    within seconds with exit 130, exactly one `sftdiff: interrupted` line on stderr, no output and
    no temporary; or, when the signal came after the output was in place, exit 0 and a complete
    output. Never a traceback, another exit code or a hang. Three signals per command, one in the
    first 150 ms (imports), so the whole loop stays near a minute."""
    startup = _startup_seconds()
    rng = random.Random("ctrl-c")
    outcomes: dict[int, int] = {}
    for cmd in WRITING_COMMANDS:
        if cmd.heavy:
            continue  # retrain/train load torch for seconds: covered by the same main() and atomic_path
        require(cmd)
        folder = tmp_path / cmd.name
        folder.mkdir()
        started = time.monotonic()
        full = run_cli(cmd.argv(fx, folder / f"full-{cmd.out_name}"))
        duration = time.monotonic() - started
        assert full.returncode == 0, full.stderr[-2000:]
        delays = [startup + rng.uniform(0, 0.15)] + [startup + rng.uniform(0, duration - startup) for _ in range(2)]
        for i, delay in enumerate(delays):
            final = folder / f"{i}-{cmd.out_name}"
            result, ending = _interrupt_at(cmd.argv(fx, final), delay)
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            where = f"{cmd.name}, SIGINT at {delay:.3f}s: exit {result.returncode}, stderr {result.stderr[-1500:]!r}"
            outcomes[result.returncode] = outcomes.get(result.returncode, 0) + 1
            assert ending < 10, f"{where}; took {ending:.1f}s to end"
            assert leftovers(folder) == [] and not final.exists() or result.returncode == 0, where
            if _before_any_sftdiff_code(result) and delay < 3 * startup:
                continue  # the interpreter was still starting (site, runpy): Python's own handling
            assert "Traceback" not in result.stderr, where
            if result.returncode == 0:
                check_output(final, cmd.kind)
                assert leftovers(folder) == [], where
            else:
                assert result.returncode == 130 and lines == ["sftdiff: interrupted"], where
                assert not final.exists(), where
    assert outcomes.get(130, 0) > 8, outcomes  # most signals land while a command runs
    assert_inputs_unchanged(fx, input_hashes)


def test_ctrl_c_during_training_exits_130_one_line_nothing_left(fx, input_hashes, tmp_path):
    """The heavy writing commands (train, retrain) under SIGINT at seeded moments while they load
    torch, the model and the data, or train: exit 130, one `sftdiff: interrupted` line, nothing
    left; or exit 0 with a complete output when the signal came after it was in place."""
    startup = _startup_seconds()
    rng = random.Random("ctrl-c-training")
    codes = []
    for cmd in WRITING_COMMANDS:
        if not cmd.heavy:
            continue
        require(cmd)
        folder = tmp_path / cmd.name
        folder.mkdir()
        for i, delay in enumerate([startup + rng.uniform(0.3, 1.5), startup + rng.uniform(2.0, 6.0)]):
            final = folder / f"{i}-{cmd.out_name}"
            result, ending = _interrupt_at(cmd.argv(fx, final), delay)
            codes.append(result.returncode)
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            where = f"{cmd.name}, SIGINT at {delay:.3f}s: exit {result.returncode}, stderr {result.stderr[-1500:]!r}"
            assert ending < 10, f"{where}; took {ending:.1f}s to end"
            assert "Traceback" not in result.stderr, where
            if result.returncode == 0:
                check_output(final, cmd.kind)
            else:
                assert result.returncode == 130 and lines[-1:] == ["sftdiff: interrupted"], where
                assert not final.exists(), where
            assert leftovers(folder) == [], where
    assert codes.count(130) >= 2, codes  # the signals land while the commands run
    assert_inputs_unchanged(fx, input_hashes)


def test_sigint_inside_bake_never_hangs_and_leaves_nothing(fx, tmp_path, monkeypatch):
    """Real SIGINTs at random microseconds of an in-process bake cut into tiny slices, so they land
    inside the writer thread's hand-over too (a KeyboardInterrupt there used to lose a wake-up and
    hang `_Writer.__exit__` forever): every bake ends with KeyboardInterrupt or completes, leaves no
    temporary and no writer thread. faulthandler ends the test with a stack dump if one hangs."""
    import faulthandler
    import threading

    bake_module = importlib.import_module("sftdiff.bake")
    from sftdiff.bake import bake

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 31)
    base = Checkpoint.open(fx.base)
    started = time.monotonic()
    bake(base, [fx.diff_a, fx.diff_b], tmp_path / "timing")
    duration = time.monotonic() - started
    rng = random.Random("sigint-bake")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.dump_traceback_later(120, exit=True)
    interrupted = 0
    try:
        for i in range(15):
            out = tmp_path / f"b{i}"
            timer = threading.Timer(rng.uniform(0, duration), os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            finished = False
            try:
                bake(base, [fx.diff_a, fx.diff_b], out)
                finished = True
                timer.join()
                time.sleep(0.01)  # a signal sent after the bake is delivered here
            except KeyboardInterrupt:
                if not finished:
                    interrupted += 1
                    assert not out.exists(), f"bake {i}: interrupted, but {out} exists"
            finally:
                timer.cancel()
                timer.join()
            assert leftovers(tmp_path) == []
            deadline = time.monotonic() + 5
            while any(t.name == "sftdiff-write" for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not any(t.name == "sftdiff-write" for t in threading.enumerate())
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGINT, previous)
    assert interrupted > 3


def test_error_escaping_after_an_interrupt_is_the_interrupt(monkeypatch):
    """A KeyboardInterrupt that hit a C extension's own import comes back as another error (numpy's
    `ImportError: numpy._core.umath failed to import`, once exit 1): after a SIGINT, whatever
    escapes the command is reported as the interrupt (exit 130); before one, errors pass as they are."""
    from sftdiff import interrupt

    def broken_import() -> None:
        raise ImportError("numpy._core.umath failed to import")

    monkeypatch.setitem(interrupt._state, "interrupted", False)
    with pytest.raises(ImportError):
        interrupt.guard(broken_import)
    monkeypatch.setitem(interrupt._state, "interrupted", True)
    with pytest.raises(KeyboardInterrupt):
        interrupt.guard(broken_import)
