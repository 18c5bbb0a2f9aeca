"""Progress bars on stderr for the library's long loops; off unless the caller asks for one."""

from __future__ import annotations

from typing import Any, Iterable


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
                 enabled: bool, unit: str = "tensor") -> Any:
    """A tqdm bar over `iterable` (or, without one, a bar to `update` by hand up to `total`); when
    not `enabled`, the iterable itself. tqdm also hides it when stderr is not a terminal."""
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None,
                dynamic_ncols=True)
