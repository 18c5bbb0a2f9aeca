"""sftdiff: sparse fine-tuning diffs for transformers.

The public API is imported lazily so that `import sftdiff` (and the CLI) starts fast: torch and
transformers load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "SparseDiff": "diff", "SparseEntry": "diff", "DenseEntry": "diff", "DiffMeta": "diff",
    "Checkpoint": "checkpoint",
    "SftError": "errors", "FormatError": "errors", "VerificationError": "errors", "OutputError": "errors",
    "select_topk": "select",
    "create_diff": "create", "create": "create",
    "bake": "bake", "apply_to_model": "inplace", "revert_from_model": "inplace", "AppliedDiff": "inplace",
    "prune": "algebra", "add": "algebra", "subtract": "algebra", "scale": "algebra",
    "overlap": "overlap",
    "convert": "formats",
    "attach": "train", "detach": "train", "lottery_ticket_sft": "train",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sftdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
