"""Benchmarks update tracked docs only inside generated blocks, and those blocks match the data
files they are generated from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.results import markers, replace_block

REPO = Path(__file__).resolve().parents[1]


def block(doc: Path, tag: str) -> str:
    begin, end = markers(tag)
    return re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), doc.read_text(encoding="utf-8"), re.S).group(1)


def test_replace_block_keeps_the_hand_written_text(tmp_path):
    begin, end = markers("t")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nhand-written above\n\n{begin}\nold table\n{end}\n\nhand-written below\n")
    replace_block(doc, "t", "new table\n")
    assert doc.read_text() == f"# Title\n\nhand-written above\n\n{begin}\nnew table\n{end}\n\nhand-written below\n"


@pytest.mark.parametrize("text", ["no markers at all\n", "{b}\none\n{e}\n{b}\ntwo\n{e}\n"])
def test_replace_block_refuses_without_exactly_one_block(tmp_path, text):
    begin, end = markers("t")
    doc = tmp_path / "doc.md"
    doc.write_text(text.format(b=begin, e=end))
    before = doc.read_text()
    with pytest.raises(SystemExit, match="expected one generated block"):
        replace_block(doc, "t", "new")
    assert doc.read_text() == before


def test_memory_doc_table_is_generated_from_memory_json():
    from benchmarks.memory_files import table

    rows = json.loads((REPO / "docs" / "memory.json").read_text())
    assert block(REPO / "docs" / "memory.md", "memory-table") == table(rows)


def test_layer_doc_numbers_match_bench_layer_json():
    result = json.loads((REPO / "docs" / "bench_layer.json").read_text())
    text = block(REPO / "docs" / "benchmarks.md", "bench-layer")
    for row in result["rows"]:
        for variant in ("dense", "butterfly"):  # {variant}_ms before bench_layer recorded quartiles
            median = row[f"{variant}_ms"] if f"{variant}_ms" in row else row[variant]["median"]
            assert f"{median:.3f}" in text
        assert f"**{row['speedup']:.1f}×**" in text
    assert f"**{result['memory_ratio']:.0f}× less**" in text
