"""Installing sftdiff leaves a user's own torch alone; the project's own commands pin the CPU wheel.

pyproject.toml declares ranges (torch>=2.2, the floor of transformers 5); the exact
versions the suite runs on live in constraints.txt, which the README's set-up commands (and so
`.ci/run`) pass with `-c`. These tests ask pip's resolver, offline, what it would do:

- in a venv whose torch is some other build (a fake installed `torch 2.4.1+rocm6.1` distribution,
  shadowing this venv's real one), `pip install --dry-run --report` of sftdiff installs sftdiff
  only: the user's torch stays (an exact pin would replace it, or fail to resolve);
- with `-c constraints.txt` the same resolver picks the pinned torch (from a find-links folder
  holding a metadata-only wheel of that version, standing in for the CPU wheel on disk);
- a torch older than the floor is replaced.

What was tested by hand (2026-12): the whole suite on the constraints.txt set (torch 2.13.0 CPU,
transformers 5.24, peft 0.21.2, huggingface_hub 2.4, numpy 2.4, safetensors 0.8); test_apply,
test_recipe, test_inspect, test_hub, test_formats_peft and test_formats_composable on the floors
(transformers 5.0.0, peft 0.10.0, safetensors 0.4.3, numpy 1.26.4, huggingface_hub 1.33, torch
2.13.0): all passed but for causes unrelated to versions. transformers 4.40.2 and 4.57.6 refuse to
load a baked bare-base-plus-head checkpoint ("state dictionary ... corrupted"), hence
transformers>=5.0, and with it torch>=2.2 (transformers 5 disables older torch).

The start-up tests at the end check what an installed `sftdiff` imports: `create` nothing heavy,
`--help` no library code (issue 14).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_TORCH = "2.4.1+rocm6.1"


def _pinned(name: str) -> str:
    """The version constraints.txt pins `name` to."""
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(rf"\s*{re.escape(name)}\s*==\s*([^\s#]+)\s*(#.*)?", line, re.IGNORECASE)
        if m:
            return m.group(1)
    raise AssertionError(f"constraints.txt pins no {name}")


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A metadata-only wheel: all the resolver reads in a dry run."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: sftdiff-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def _fake_installed(site: Path, name: str, version: str) -> None:
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    (dist / "INSTALLER").write_text("pip\n", encoding="utf-8")
    (dist / "RECORD").write_text("", encoding="utf-8")


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf adds indexes and a torch cap
    return env


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A find-links folder: sftdiff's wheel, built once by pip from a copy of the project (an
    in-tree build must not write into the work tree), and a torch of the pinned version."""
    src = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sftdiff", src / "sftdiff", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    folder = tmp_path_factory.mktemp("links")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "-w", str(folder), str(src)],
                          capture_output=True, text=True, env=_pip_env(), cwd=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _fake_wheel(folder, "torch", _pinned("torch"))
    return folder


def _user_venv(tmp: Path, torch_version: str) -> Path:
    """A venv (no pip of its own) that sees this venv's packages through a .pth file, except for
    torch, where its own site-packages holds a different installed version that comes first."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _fake_installed(site, "torch", torch_version)
    return python


def _resolve(python: Path, links: Path, *extra: str) -> dict[str, str]:
    """{name: version} that `pip install --dry-run sftdiff` would install in `python`'s venv, offline."""
    report = links.parent / "report.json"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), "--no-index",
         "--find-links", str(links), *extra, str(next(links.glob("sftdiff-*.whl")))],
        capture_output=True, text=True, env=_pip_env(), cwd=links.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text(encoding="utf-8"))
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in data["install"]}


def test_the_wheel_carries_the_compiled_scan(wheels):
    """setup.py builds create's C scan into the wheel (a platform wheel, not a pure-Python one)."""
    wheel = next(wheels.glob("sftdiff-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    if not any(n.startswith("sftdiff/_kernels.") and n.endswith((".so", ".pyd")) for n in names):
        if os.environ.get("SFTDIFF_REQUIRE_COMPILED") == "1":
            pytest.fail(f"{wheel.name} has no compiled sftdiff._kernels")
        pytest.skip("no C compiler here: the wheel is built without sftdiff._kernels (numpy fallback)")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name


def test_users_torch_is_kept(tmp_path, wheels):
    python = _user_venv(tmp_path, USER_TORCH)
    plan = _resolve(python, wheels)
    assert "torch" not in plan, plan  # the installed 2.4.1+rocm6.1 satisfies the range: kept
    assert set(plan) == {"sftdiff"}, plan


def test_constraints_pin_the_cpu_wheel(tmp_path, wheels):
    python = _user_venv(tmp_path, USER_TORCH)
    plan = _resolve(python, wheels, "-c", str(ROOT / "constraints.txt"))
    assert plan.get("torch") == _pinned("torch"), plan


def test_torch_below_the_floor_is_replaced(tmp_path, wheels):
    python = _user_venv(tmp_path, "2.1.2")  # transformers 5 disables torch below 2.2
    plan = _resolve(python, wheels)
    assert plan.get("torch") == _pinned("torch"), plan


def test_no_exact_pins_in_the_package_and_readme_uses_the_constraints():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = meta["dependencies"] + [r for extra in meta["optional-dependencies"].values() for r in extra]
    assert not [r for r in requirements if "==" in r], requirements
    torch_req = next(r for r in meta["dependencies"] if re.match(r"torch\b", r))
    assert re.fullmatch(r"torch>=2\.2", torch_req.replace(" ", "")), torch_req
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = re.findall(r"^python3 -m venv .*$", readme, re.MULTILINE)
    assert len(setup) == 2, setup  # one runs the shipped example, one runs the tests (and CI)
    for line in setup:
        assert "pip install -c constraints.txt -e " in line, line


# ---------------------------------------------------------------- start-up: what a command imports
#
# `sftdiff create` on a 110M-parameter model takes well under a second, so the interpreter's
# start-up and imports are a good part of it (issue 14). These tests run the command in a fresh
# interpreter and list what it imported, so a module-level import that drags in a heavy package
# (or another command's library code) fails here rather than showing up as a slower benchmark.

# Never imported by `sftdiff create` (without --device), whatever it prints.
HEAVY = ("torch", "transformers", "safetensors", "huggingface_hub", "peft", "yaml", "tqdm", "matplotlib",
         "multiprocessing", "importlib.metadata", "email", "sftdiff.bake", "sftdiff.algebra", "sftdiff.sources",
         "sftdiff.formats", "sftdiff.hub", "sftdiff.train", "sftdiff.evaluate", "sftdiff.text", "sftdiff.inplace",
         "sftdiff.merge", "sftdiff.verify", "sftdiff.cli.apply", "sftdiff.cli.algebra", "sftdiff.cli.train")
# Nor by `sftdiff create --help`, which needs neither the library nor --debug's tracebacks.
NOT_FOR_HELP = ("sftdiff.create", "sftdiff.diff", "sftdiff.summary", "sftdiff.checkpoint", "sftdiff.safetensors_io",
                "sftdiff.progress", "traceback", "tempfile", "hashlib", "json", "concurrent.futures")

# The `sftdiff` command as `python -m sftdiff` runs it, then its sys.modules into the file $MODULES_OUT
# (at exit, whether Python's own or cli.run's os._exit, which skips atexit).
_PROBE = ("import atexit, os, runpy, sys\n"
          "def dump(): open(os.environ['MODULES_OUT'], 'w').write('\\n'.join(sorted(sys.modules)))\n"
          "atexit.register(dump)\n"
          "leave = os._exit\n"
          "os._exit = lambda code: (dump(), leave(code))\n"
          "sys.argv[0] = 'sftdiff'\n"
          "runpy.run_module('sftdiff', run_name='__main__')\n")


def _imported(tmp_path: Path, *args: str, expect: int = 0) -> set[str]:
    """The modules `sftdiff ARGS` imported, run in a fresh interpreter with stderr not a terminal."""
    out = tmp_path / "modules.txt"
    env = {**os.environ, "MODULES_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return set(out.read_text(encoding="utf-8").split())


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of `names` (or their submodules) are among `modules`."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base and fine-tune checkpoint folder, written without sftdiff."""
    import numpy as np
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    base = {"encoder.weight": rng.standard_normal((64, 32)).astype(np.float32),
            "encoder.bias": rng.standard_normal(32).astype(np.float32)}
    ft = {n: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01)) for n, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    return root / "base", root / "ft"


def test_create_imports_nothing_heavy(tmp_path, pair):
    """A real `sftdiff create`, progress on but stderr not a terminal (a log, a pipe): no torch,
    no tqdm (it would show nothing there; importing it is ~0.05 s of CPU), no other command's code."""
    base, ft = pair
    modules = _imported(tmp_path, "create", str(base), str(ft), "-o", str(tmp_path / "d.sft"), "--density", "0.1")
    assert (tmp_path / "d.sft").is_file()
    assert {"numpy", "sftdiff.create", "sftdiff.diff"} <= modules  # the probe saw the command's own imports
    assert _loaded(modules, HEAVY) == []


def test_create_help_imports_no_library_code(tmp_path):
    """`sftdiff create --help` imports the command's module and numpy, none of the library behind it."""
    modules = _imported(tmp_path, "create", "--help")
    assert "sftdiff.cli.create" in modules
    assert _loaded(modules, HEAVY + NOT_FOR_HELP) == []


def test_top_level_help_and_version_import_no_numpy(tmp_path):
    """`sftdiff --help` lists the commands without importing them, and so without numpy (~0.09 s of
    CPU): it is loaded when a command is looked up."""
    for args in (["--help"], ["--version"], ["no-such-command"]):
        modules = _imported(tmp_path, *args, expect=2 if args == ["no-such-command"] else 0)
        unwanted = ("numpy", "sftdiff.cli.create", "sftdiff.cli.common", "torch", "tqdm", "sftdiff.diff", "traceback")
        assert _loaded(modules, unwanted) == [], args  # --version reads the installed metadata (click's way)


def test_no_command_help_imports_torch(tmp_path):
    """Every command's --help, in one interpreter: the command modules import their library lazily."""
    from sftdiff.cli import COMMANDS

    code = ("import sys\nfrom sftdiff.cli import main\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n        main([name, '--help'])\n"
            "    except SystemExit as e:\n        assert not e.code, (name, e.code)\n"
            "print(' '.join(sorted(sys.modules)))\n")  # the last line, after the help texts
    proc = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = set(proc.stdout.splitlines()[-1].split())
    assert {f"sftdiff.cli.{spec.split(':')[0]}" for spec in COMMANDS.values()} <= modules
    assert _loaded(modules, ("torch", "transformers", "safetensors", "huggingface_hub", "peft", "tqdm",
                             "matplotlib")) == []


def test_progress_bar_only_on_a_terminal(monkeypatch):
    """No terminal, no bar (and so no tqdm import): the iterable itself (None for a manual bar)."""
    import io

    from sftdiff import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    items = [1, 2, 3]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.progress_bar(items, total=3, desc="x", enabled=True) is items
    assert progress.progress_bar(total=3, desc="x", enabled=True) is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.progress_bar(items, total=3, desc="x", enabled=False) is items
    bar = progress.progress_bar(items, total=3, desc="x", enabled=True)
    assert type(bar).__name__ == "tqdm" and list(bar) == items
    bar.close()
