"""sftdiff: sparse fine-tuning diffs for transformers.

The public API is imported lazily so that `import sftdiff` (and the CLI) starts fast: torch and
transformers load only when a function that needs them runs.
"""

from __future__ import annotations

from . import interrupt as _interrupt

_interrupt.install_early()  # first: a Ctrl-C while the `sftdiff` command starts exits 130 quietly

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from typing import Any  # noqa: E402

__version__ = "0.1.0"

_API = {
    "SparseDiff": "diff", "SparseEntry": "diff", "DenseEntry": "diff", "DiffMeta": "diff",
    "Checkpoint": "checkpoint",
    "SftError": "errors", "FormatError": "errors", "VerificationError": "errors", "OutputError": "errors",
    "select_topk": "select",
    "create_diff": "create", "create": "create",
    "bake": "bake", "apply_to_model": "inplace", "revert_from_model": "inplace", "AppliedDiff": "inplace",
    "prune": "algebra", "add": "algebra", "subtract": "algebra", "scale": "algebra",
    "filter_entries": "algebra",
    "overlap": "overlap",
    "merge": "merge",
    "convert": "formats",
    "attach": "train", "detach": "train", "lottery_ticket_sft": "train",
    "sparse_retrain": "train", "trainable_parameters": "train",
    "evaluate": "evaluate",
}

__all__ = sorted(_API) + ["__version__"]


class _Package(types.ModuleType):
    """The package module, which keeps `sftdiff.bake` (and `create`, `overlap`, `merge`, `evaluate`)
    the function after the submodule of the same name is imported: the import system binds every
    imported submodule as an attribute of its package, which would shadow the public function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _API.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sftdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
