"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
from typing import Callable

import click


class BmoeError(ValueError):
    """Bad input found by bmoe itself (a model directory, a device profile, a run setting)."""


class CheckpointError(ValueError):
    """A file that is not a usable bmoe checkpoint."""


class CorpusError(ValueError):
    """A corpus path that cannot be read as a corpus."""


USER_ERRORS = (BmoeError, CheckpointError, CorpusError, ValueError, FileNotFoundError, PermissionError)


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into click errors (exit 1, one line)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper
