"""Progress on stderr for the library's long loops; off unless the caller asks for it.

On a terminal a tqdm bar; anywhere else (a log file, a pipe, a CI job) tqdm's carriage-return
frames would pile up as garbage, so a training loop prints plain lines there instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

# A plain progress line at most this often (seconds), besides the first and the last step.
LINE_INTERVAL = 30.0
# ... and at least at every 1/LINES of the run, so a short run still shows its course.
LINES = 10


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
                 enabled: bool, unit: str = "tensor") -> Any:
    """A tqdm bar over `iterable` (or, without one, a bar to `update` by hand up to `total`); when
    not `enabled`, or stderr is not a terminal (where tqdm would hide the bar), the iterable itself
    (None without one). Checked here rather than left to tqdm: importing it costs ~0.05 s of CPU
    (its version lookup loads importlib.metadata and email, its lock multiprocessing)."""
    if not enabled or not _is_terminal(sys.stderr):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None,
                dynamic_ncols=True)


class StepProgress:
    """A training loop's progress (phase, step, loss, learning rate) on stderr: a bar on a terminal,
    plain lines `sftdiff: <phase> step 50/1000 loss 3.2145 lr 4.8e-05` elsewhere; nothing when
    not `enabled`."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.step = total, desc, 0
        self.bar = None
        self.plain = enabled and not _is_terminal(sys.stderr)
        self.every = max(1, total // LINES)
        self.last_line = time.monotonic()
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        """One step done, with its (smoothed) loss and the learning rate it used."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)
        elif self.plain:
            now = time.monotonic()
            if self.step in (1, self.total) or self.step % self.every == 0 or now - self.last_line >= LINE_INTERVAL:
                self.last_line = now
                print(f"sftdiff: {self.desc} step {self.step}/{self.total} loss {loss:.4f} lr {lr:.3g}",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
