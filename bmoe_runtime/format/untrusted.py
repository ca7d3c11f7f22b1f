"""Reading a model directory's files as untrusted input: confined, bounded, depth-safe.

A member is a plain name inside the directory, opened relative to the directory with
O_NOFOLLOW (a symlink is refused, never followed) and O_NONBLOCK (a FIFO cannot block
the open), then required by fstat to be a regular file. Reads are bounded by the size
the caller expects, and JSON is parsed with a nesting bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

from bmoe_runtime.errors import BmoeError

MAX_JSON_DEPTH = 64
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")  # schema.FILE_NAME
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_member(model_dir: Path, name: str) -> int:
    """A file descriptor for the regular file `name` directly inside model_dir (caller closes it)."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise BmoeError(f"{model_dir}: {str(name)[:80]!r} is not a plain file name inside the model directory")
    try:
        dir_fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BmoeError(f"model directory {model_dir} cannot be opened: {exc.strerror}") from None
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise BmoeError(f"{model_dir}: file {name} is missing") from None
    except OSError as exc:  # ELOOP: a symlink, refused rather than followed
        what = "is a symbolic link (refused)" if os.path.islink(model_dir / name) else f"cannot be opened: {exc.strerror}"
        raise BmoeError(f"{model_dir}: {name} {what}") from None
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BmoeError(f"{model_dir}: {name} is not a regular file (a FIFO, device or directory is refused)")
    return fd


def member_size(model_dir: Path, name: str) -> int:
    fd = open_member(model_dir, name)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def check_member(model_dir: Path, name: str, size: int, sha256: str | None = None) -> None:
    """The member is a regular file of exactly `size` bytes (and, given sha256, those bytes' digest)."""
    fd = open_member(model_dir, name)
    try:
        _check_size(model_dir, name, os.fstat(fd).st_size, size)
        if sha256 is not None:
            h = hashlib.sha256()
            with os.fdopen(os.dup(fd), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _check_digest(model_dir, name, h.hexdigest(), sha256)
    finally:
        os.close(fd)


def read_member(model_dir: Path, name: str, size: int, sha256: str) -> bytes:
    """The member's bytes, read once: at most `size` bytes, then checked against size and sha256."""
    fd = open_member(model_dir, name)
    try:
        _check_size(model_dir, name, os.fstat(fd).st_size, size)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(size + 1)  # one more: a file that grew since fstat is caught below
    finally:
        os.close(fd)
    _check_size(model_dir, name, len(data), size)
    _check_digest(model_dir, name, hashlib.sha256(data).hexdigest(), sha256)
    return data


def _check_size(model_dir: Path, name: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise BmoeError(f"{model_dir}: {name} has {actual} bytes, the manifest says {expected} "
                        f"(truncated or replaced?)")


def _check_digest(model_dir: Path, name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise BmoeError(f"{model_dir}: {name} fails its sha256 check (corrupted or modified since export)")


def parse_json(data: bytes, what: str, max_depth: int = MAX_JSON_DEPTH):
    """JSON from untrusted bytes: UTF-8, no NaN/Infinity, at most max_depth levels of nesting."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise BmoeError(f"{what} is nested too deeply to be a bmoe file") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, an integer of 5000 digits
        raise BmoeError(f"{what} is not valid JSON: {str(exc)[:160]}") from None
    stack = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        v, depth = stack.pop()
        if depth > max_depth:
            raise BmoeError(f"{what} is nested deeper than {max_depth} levels")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, refused beyond `limit` bytes (opened as a member of its directory)."""
    fd = open_member(path.parent, path.name)
    try:
        if os.fstat(fd).st_size > limit:
            raise BmoeError(f"{what} {path} is {os.fstat(fd).st_size} bytes, more than the {limit} allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BmoeError(f"{what} {path} is more than the {limit} bytes allowed")
    return data
