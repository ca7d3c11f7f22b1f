"""Writes that never leave a half-written target: staged beside it, renamed into place.

A stage is `.<target name>.partial-<random>` in the target's directory (the same file system,
so the final os.replace is atomic), created with the user's umask (not mkdtemp's 0700) and
holding an exclusive flock while its writer lives. A writer killed by SIGKILL leaves its
stage unlocked: the next writer of the same target removes every unlocked stage of it. The
lock, not a PID, tells a live writer from a dead one (PIDs are reused and namespaced).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def stage_prefix(target: Path) -> str:
    return f".{target.name}{PARTIAL}"


def clean_stale(target: Path, legacy: tuple[str, ...] = ()) -> list[Path]:
    """Remove the stages of `target` no live writer holds (and files matching the `legacy` glob
    patterns, in target's directory, left by bmoe versions that did not lock); returns them."""
    patterns = [glob.escape(stage_prefix(target)) + "*", *legacy]
    removed = []
    for path in sorted({p for pattern in patterns for p in target.parent.glob(pattern)}):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
        except OSError:
            continue  # gone already, or a symlink: not a stage of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer holds it
        try:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _locked(path: Path, make) -> int | None:
    """Create `path` with make(), lock it, and check that a cleaner did not remove it in between."""
    make(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            return fd
    except FileNotFoundError:
        pass
    os.close(fd)  # removed by another writer's clean_stale before we locked it: make another
    return None


def _new_stage(target: Path, make) -> tuple[Path, int]:
    while True:
        path = target.parent / f"{stage_prefix(target)}{secrets.token_hex(6)}"
        fd = _locked(path, make)
        if fd is not None:
            return path, fd


def _make_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666))


@contextlib.contextmanager
def staged_dir(target: Path, legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """A new locked directory beside `target`, removed if the block raises (or is interrupted).
    The block renames it into place; stale stages of `target` are cleaned first."""
    clean_stale(target, legacy)
    path, fd = _new_stage(target, os.mkdir)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(target: Path, legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """A new locked empty file beside `target`, removed if the block raises; the block writes it
    and renames it into place."""
    clean_stale(target, legacy)
    path, fd = _new_stage(target, _make_file)
    try:
        yield path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def set_aside(target: Path) -> Iterator[Path]:
    """Rename an existing `target` to a locked stage (so a kill leaves it to clean_stale), yield it;
    the caller removes it once its replacement is in place."""
    path = target.parent / f"{stage_prefix(target)}old-{secrets.token_hex(6)}"
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(target, path)
        yield path
    finally:
        os.close(fd)
