"""Where benchmarks write: results under runs/bench/<name>/ (git-ignored) by default; tracked docs
only with an explicit --update-docs, and then only between a doc's generated-block markers, so
the hand-written text around a table is never lost."""

from __future__ import annotations

import platform
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def cpu_model() -> str:
    """The CPU's model name, for the header of a results file."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_dir(name: str, out: str | Path | None = None) -> Path:
    """`out` if given, else runs/bench/<name>/; created."""
    path = Path(out) if out else REPO / "runs" / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish(name: str, res: dict, text: str, out: str | Path | None, update_docs: bool, doc: str, tag: str) -> None:
    """Print `text`, write `res` to <results dir>/<name>.json and, with --update-docs, also to docs/<name>.json
    and `text` into `doc`'s `tag` block (tests check that a doc's table and its JSON agree)."""
    import json

    print("\n" + text)
    path = results_dir(name, out) / f"{name}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {path}")
    if update_docs:
        (DOCS / f"{name}.json").write_text(json.dumps(res, indent=1))
        replace_block(DOCS / doc, tag, text)


def markers(tag: str) -> tuple[str, str]:
    return f"<!-- generated:{tag} begin -->", f"<!-- generated:{tag} end -->"


def replace_block(doc: Path, tag: str, text: str) -> None:
    """Replace what lies between the doc's `tag` markers with `text`; the rest of the doc is kept.
    Exits with a message (changing nothing) if the markers are missing."""
    begin, end = markers(tag)
    old = doc.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if len(pattern.findall(old)) != 1:
        raise SystemExit(f"{doc}: expected one generated block '{begin}' … '{end}'; nothing written")
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{text.strip()}\n{end}", old), encoding="utf-8")
