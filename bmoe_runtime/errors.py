"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
from typing import Callable

import click


class BmoeError(ValueError):
    """Bad input found by bmoe itself (a model directory, a device profile, a run setting)."""


class OpError(ValueError):
    """An ai.bmoe op (the Numba reference kernels) rejected its inputs."""


class CheckpointError(ValueError):
    """A file that is not a usable bmoe checkpoint."""


class CorpusError(ValueError):
    """A corpus path that cannot be read as a corpus."""


# ValueError: bad values reach bmoe through numpy, tokenizers, torch; OSError: a path that cannot be
# read or written (missing, a directory, no permission, disk full, a closed pipe).
def require_numba() -> None:
    """The Numba reference runtime is an extra (`bmoe[numba]`): say so in one line where it is missing."""
    try:
        import numba  # noqa: F401
    except ImportError:
        raise BmoeError("the numba backend needs numba, which this install lacks: pip install 'bmoe[numba]' "
                        "(or use --backend ort)") from None


USER_ERRORS = (BmoeError, CheckpointError, CorpusError, ValueError, OSError)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into click errors (exit 1, one line)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(one_line(exc)) from None
    return wrapper
