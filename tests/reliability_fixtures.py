"""Fixtures shared by the reliability and fuzz tests: tiny models, diffs, and a table of the
command lines of every command that writes an output.

Everything here is built deterministically (fixed seeds) from configs, so two runs produce the
same bytes. torch and transformers are imported inside the builders only: the fuzz tests of the
numpy-only readers do not pay for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sftdiff.atomic import TMP_MARK

REPO = Path(__file__).resolve().parents[1]

# Small enough to build in about a second, large enough that a bake writes more than one page.
BERT_FIELDS = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a of and to in is was for on that with as by at from it an be this are or his her "
         "they which one had not but all were when we there can more been has if no time will so "
         "who would out up what about some into than them other").split()
CORPUS_LINES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(40)]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: offline, single-threaded, no stray caches in $HOME."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


# ------------------------------------------------------------------ models and diffs


@dataclass(frozen=True)
class Fixtures:
    """Paths of the inputs every writing command is run on."""

    root: Path
    base: Path  # tiny BertForMaskedLM folder with tokenizer (safetensors)
    finetuned: Path  # the same model with a few hundred weights changed
    diff_a: Path  # .sft made from base → finetuned (sparse entries, base digests recorded)
    diff_b: Path  # another .sft on the same base
    composable: Path  # composable-sft pytorch_diff.bin of diff_a
    corpus: Path  # plain text for train/retrain

    def inputs(self) -> list[Path]:
        return [self.base, self.finetuned, self.diff_a, self.diff_b, self.composable, self.corpus]


def build_fixtures(root: Path) -> Fixtures:
    """Write every fixture under `root` (which must exist) and return their paths."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    base, finetuned = root / "base", root / "finetuned"
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**BERT_FIELDS)).eval()
    model.save_pretrained(base)
    _save_tokenizer(base)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            # Change ~5% of each tensor so top-k has a clear winner set.
            mask = torch.rand(p.shape, generator=gen) < 0.05
            p.add_(mask * torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(finetuned)
    _save_tokenizer(finetuned)
    diff_a = root / "a.sft"
    diff_b = root / "b.sft"
    random_sft(base, diff_a, seed=2)
    random_sft(base, diff_b, seed=3)
    composable = root / "composable" / "pytorch_diff.bin"
    composable.parent.mkdir()
    write_composable(diff_a, composable)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS_LINES) + "\n", encoding="utf-8")
    return Fixtures(root, base, finetuned, diff_a, diff_b, composable, corpus)


def _save_tokenizer(folder: Path) -> None:
    import transformers

    vocab = list(dict.fromkeys(SPECIAL_TOKENS + WORDS + [chr(c) for c in range(ord("a"), ord("z") + 1)]))
    assert len(vocab) <= BERT_FIELDS["vocab_size"]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("the of")["input_ids"], "tokenizer lost its vocabulary"
    tokenizer.save_pretrained(folder)


def random_sft(base: Path, out: Path, seed: int, density: float = 0.02) -> None:
    """A valid .sft of random sparse deltas over every float tensor of `base`, with base digests."""
    from sftdiff.checkpoint import Checkpoint

    from helpers_models import random_diff

    diff = random_diff(Checkpoint.open(base), seed, density)
    diff.meta.origin = {"tool": "reliability-fixtures", "method": "random", "seed": seed}
    diff.save(out)


def write_composable(sft: Path, out: Path) -> None:
    """composable-sft's pytorch_diff.bin layout (column-major index steps), written with torch.save."""
    import torch

    from sftdiff.diff import SparseDiff

    diff = SparseDiff.load(sft)
    diffs = {}
    for name in diff.entries:
        e = diff.entries[name]
        coords = np.unravel_index(e.indices.astype(np.int64), e.shape, order="C")
        col = np.sort(np.ravel_multi_index(coords, e.shape, order="F")) if len(e.shape) > 1 else e.indices
        order = np.argsort(np.ravel_multi_index(coords, e.shape, order="F")) if len(e.shape) > 1 else slice(None)
        steps = np.diff(np.concatenate(([0], np.asarray(col, dtype=np.int64)))).tolist()
        diffs[name] = {"size": torch.Size(e.shape), "index_steps": steps,
                       "values": torch.from_numpy(np.array(e.values_f32()[order], dtype=np.float32))}
    torch.save({"diffs": diffs, "abs": {}}, out)


# ------------------------------------------------------------------ the writing commands


@dataclass(frozen=True)
class WritingCommand:
    """One CLI invocation that writes `out`; `kind` says how to check the result."""

    name: str
    argv: Callable[[Fixtures, Path], list[str]]
    kind: str  # "sft" | "checkpoint" | "composable"
    heavy: bool = False  # imports torch/transformers and trains: fewer timed kills
    out_name: str = "out.sft"


def _train_opts(fx: Fixtures) -> list[str]:
    return ["--text", str(fx.corpus), "--objective", "mlm", "--batch-size", "2", "--seq-len", "16",
            "--device", "cpu", "--quiet"]


WRITING_COMMANDS: list[WritingCommand] = [
    WritingCommand("create", lambda fx, out: ["create", str(fx.base), str(fx.finetuned), "-o", str(out),
                                              "-k", "300", "--quiet"], "sft"),
    WritingCommand("prune", lambda fx, out: ["prune", str(fx.diff_a), "-o", str(out), "-k", "100", "--quiet"], "sft"),
    WritingCommand("add", lambda fx, out: ["add", str(fx.diff_a), str(fx.diff_b), "-o", str(out), "--quiet"], "sft"),
    WritingCommand("subtract", lambda fx, out: ["subtract", str(fx.diff_a), str(fx.diff_b), "-o", str(out),
                                                "--quiet"], "sft"),
    WritingCommand("scale", lambda fx, out: ["scale", str(fx.diff_a), "0.5", "-o", str(out), "--quiet"], "sft"),
    WritingCommand("convert", lambda fx, out: ["convert", str(fx.composable), "-o", str(out), "--quiet"], "sft"),
    WritingCommand("filter", lambda fx, out: ["filter", str(fx.diff_a), "-o", str(out), "--exclude", "cls.*",
                                              "--quiet"], "sft"),
    WritingCommand("merge", lambda fx, out: ["merge", str(fx.diff_a), str(fx.diff_b), "-m", "ties", "-o", str(out),
                                             "--quiet"], "sft"),
    WritingCommand("apply", lambda fx, out: ["apply", str(fx.base), str(fx.diff_a), str(fx.diff_b), "-o", str(out),
                                             "--quiet"], "checkpoint", out_name="baked"),
    WritingCommand("retrain", lambda fx, out: ["retrain", str(fx.base), str(fx.diff_a), "-o", str(out), "--steps", "3",
                                               *_train_opts(fx)], "sft", heavy=True),
    WritingCommand("train", lambda fx, out: ["train", str(fx.base), "-o", str(out), "-k", "200", "--full-steps", "2",
                                             "--sparse-steps", "2", *_train_opts(fx)], "sft", heavy=True),
]
COMMANDS_BY_NAME = {c.name: c for c in WRITING_COMMANDS}


def command_landed(name: str) -> bool:
    """Whether the CLI module implementing `name` exists yet (commands land progressively)."""
    import importlib.util

    from sftdiff.cli import COMMANDS

    module = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(f"sftdiff.cli.{module}") is not None


# ------------------------------------------------------------------ running the CLI

# Runs the CLI with a hook in sftdiff.atomic that fires when the temporary output is complete:
#   kill-before-commit: SIGKILL itself just before the rename into place (temp output fully written)
#   kill-when-temp-appears: SIGKILL itself as soon as the temporary output exists (a watcher thread;
#                           the rename into place is held back until then)
#   kill-at-fsync:      SIGKILL itself when the temporary output is about to be flushed
#   sleep-before-commit:<s>  wait s seconds before the rename (to make two writers overlap)
# The hook patches module globals that atomic_path looks up at call time, so it reaches every
# writer that goes through atomic_path, whichever module imported it.
HOOKED_MAIN = r"""
import os, signal, sys, time
import sftdiff.atomic as atomic
hook = os.environ.get("SFTDIFF_TEST_HOOK", "")
marker = os.environ.get("SFTDIFF_TEST_HOOK_MARKER")
def _mark(tmp):
    if marker:
        with open(marker, "a") as f:
            f.write(str(tmp) + "\n")
if hook in ("kill-before-commit", "sleep-before-commit") or hook.startswith("sleep-before-commit:"):
    _commit = atomic._commit
    def commit(tmp, final, overwrite, directory):
        _mark(tmp)
        if hook == "kill-before-commit":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(hook.split(":", 1)[1]) if ":" in hook else 1.0)
        return _commit(tmp, final, overwrite, directory)
    atomic._commit = commit
elif hook == "kill-when-temp-appears":
    import threading
    _tmp_name = atomic._tmp_name
    def tmp_name(final):
        tmp = _tmp_name(final)
        _mark(tmp)
        def watch():
            while not os.path.lexists(tmp):
                time.sleep(0.0002)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=watch, daemon=True).start()
        return tmp
    def commit(tmp, final, overwrite, directory):
        time.sleep(60)  # a small output can be complete before the watcher runs: never let it commit
    atomic._tmp_name = tmp_name
    atomic._commit = commit
elif hook == "kill-at-fsync":
    def fsync(p, directory):
        _mark(p)
        os.kill(os.getpid(), signal.SIGKILL)
    atomic._fsync = fsync
from sftdiff.cli import main
sys.argv[0] = "sftdiff"
main(sys.argv[1:])
"""


def cli_argv(args: list[str], hook: str | None = None) -> list[str]:
    if hook is None:
        return [sys.executable, "-m", "sftdiff", *args]
    return [sys.executable, "-c", HOOKED_MAIN, *args]


def run_cli(args: list[str], *, hook: str | None = None, marker: Path | None = None, timeout: float = 300,
            preexec_fn: Callable[[], None] | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = child_env(**(env or {}))
    if hook is not None:
        env["SFTDIFF_TEST_HOOK"] = hook
        if marker is not None:
            env["SFTDIFF_TEST_HOOK_MARKER"] = str(marker)
    return subprocess.run(cli_argv(args, hook), capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=preexec_fn, cwd=cwd)


def run_and_kill(args: list[str], delay: float, cwd: Path | None = None) -> int | None:
    """Start the CLI, SIGKILL it after `delay` seconds (if still running); its exit status."""
    proc = subprocess.Popen(cli_argv(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env(), cwd=cwd)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


# ------------------------------------------------------------------ checking outputs


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given files/folders (inputs must never change)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary outputs (sftdiff's marked names) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)


def check_output(path: Path, kind: str) -> None:
    """Raise AssertionError unless `path` is a complete, valid output of `kind`."""
    if kind == "sft":
        from sftdiff.diff import SparseDiff

        diff = SparseDiff.load(path)
        diff.validate()
        assert len(diff.entries) > 0, f"{path}: no entries"
    elif kind == "checkpoint":
        check_checkpoint_folder(path)
    elif kind == "composable":
        from sftdiff.formats.composable import read_composable

        assert read_composable(path)
    else:
        raise ValueError(kind)


def check_checkpoint_folder(folder: Path) -> None:
    """Every shard opens, every tensor reads, and an index (if any) matches the shards exactly."""
    from sftdiff.checkpoint import SAFETENSORS_INDEX, Checkpoint
    from sftdiff.safetensors_io import SafetensorsFile

    assert folder.is_dir(), f"{folder} is not a folder"
    json.loads((folder / "config.json").read_text(encoding="utf-8"))
    ckpt = Checkpoint.open(folder)
    for name in ckpt.tensors:
        np.asarray(ckpt.array(name)).sum()
    index_path = folder / SAFETENSORS_INDEX
    if index_path.exists():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        in_shards: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            for name in SafetensorsFile(folder / shard).tensors:
                in_shards[name] = shard
        assert in_shards == weight_map, "index weight_map does not match the shards' contents"
        stray = {p.name for p in folder.glob("*.safetensors")} - set(weight_map.values())
        assert not stray, f"shards not in the index: {stray}"


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def pickle_payload_file(path: Path, marker: Path, *, zip_format: bool) -> None:
    """A torch-style checkpoint whose unpickling would create `marker` (it must never run)."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    obj = {"weight": Payload()}
    if zip_format:
        import torch

        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))


def copy_tree(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst
