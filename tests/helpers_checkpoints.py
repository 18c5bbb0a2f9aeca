"""Raw safetensors checkpoints written from numpy arrays (no torch), for tests of readers and kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sftdiff.safetensors_io import StreamingWriter


def write_checkpoint(folder: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """A one-file checkpoint folder: `tensors` maps names to (raw array, safetensors dtype)."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    with open(folder / "model.safetensors", "wb") as fh:
        writer = StreamingWriter(fh, [(n, tensors[n][1], tensors[n][0].shape) for n in names], {"format": "pt"})
        for n in names:
            writer.write(n, tensors[n][0])
        writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
