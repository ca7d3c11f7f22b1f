"""Writing a model directory (bmoe-export -o, bmoe plan --write): staged beside the target, renamed into
place when complete, never over a user's files.

OUTDIR may be absent or empty; a previous bmoe export there is replaced only with force; anything
else (a user's files) is refused, never deleted. The directory is built under a temporary name beside
OUTDIR (staging.py), so a failed write never leaves a directory that looks valid, and a killed one's
leftovers are removed by the next write to OUTDIR.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format import staging
from bmoe_runtime.format.manifest import MANIFEST, read_manifest


def check_out_dir(out_dir: Path, force: bool) -> bool:
    """Whether out_dir holds a previous export to replace (only with force); raises for anything
    that is not absent, an empty directory or a bmoe export of nothing but its listed files."""
    if out_dir.is_symlink():
        raise BmoeError(f"output {out_dir} is a symbolic link: give the directory itself")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise BmoeError(f"output {out_dir} exists and is not a directory")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return False
    try:
        listed = set(read_manifest(out_dir, verify="none")["files"]) | {MANIFEST}
    except BmoeError:
        listed = set()
    if not entries <= listed:
        raise BmoeError(f"output {out_dir} is not empty and not a bmoe export (it holds "
                        f"{', '.join(sorted(entries - listed)[:3])}): refusing to replace it; choose another -o")
    if not force:
        raise BmoeError(f"output {out_dir} holds a bmoe export: pass --force (force=True) to replace it")
    return True


@contextlib.contextmanager
def staged_export(out_dir: Path, force: bool) -> Iterator[Path]:
    """A stage directory for the block to fill; when the block completes, it replaces out_dir (checked
    again: it may have changed meanwhile). If the block raises, the stage is removed and out_dir untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    legacy = (f".{glob.escape(out_dir.name)}.old-*",)  # set aside by bmoe versions before staging.py
    with staging.staged_dir(out_dir, legacy) as tmp:
        yield tmp
        if not check_out_dir(out_dir, force):
            os.replace(tmp, out_dir)  # rename(2) replaces an empty directory atomically
            return
        with staging.set_aside(out_dir) as old:  # the old export, replaced only once the new one is complete
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
