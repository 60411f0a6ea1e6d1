"""Every Python code block in README.md and docs/*.md runs as written."""

from __future__ import annotations

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            out.append((f"{path.name}#{i}", code))
    return out


def test_the_docs_have_code_blocks() -> None:
    assert len(blocks()) >= 5


@pytest.mark.parametrize(("where", "code"), blocks(), ids=[w for w, _ in blocks()])
def test_code_block_runs(where: str, code: str, tmp_path: pathlib.Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)  # blocks may create files (a version table)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
