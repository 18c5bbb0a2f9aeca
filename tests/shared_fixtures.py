"""Where the reference files made by other tools' own code live (`../shared/fixtures/`)."""

from __future__ import annotations

import os
from pathlib import Path


def composable_fixtures() -> Path:
    """The composable-sft reference folder: `$SFTDIFF_FIXTURES/composable-sft`, else the
    `shared/fixtures/composable-sft` beside the repository (where CI puts it). Missing is a failure,
    not a skip: the importer tests are worthless without the reference files."""
    env = os.environ.get("SFTDIFF_FIXTURES")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    folder = root / "composable-sft"
    assert folder.is_dir(), f"composable-sft fixtures missing at {folder} (set SFTDIFF_FIXTURES)"
    return folder
