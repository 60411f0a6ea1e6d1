"""``keylane inspect --check``: read every page of a version table in a
child process.

Opening a table checks what is cheap (file size against the meta pages,
both meta pages valid); damage inside the B-tree is only seen by reading
it, and LMDB trusts its pages, so reading a damaged one may crash the
reader. The walk therefore runs in a child process (``python -m
keylane._table_check PATH``) and its death by a signal is a verdict too.

The walk: every ``(key, version)`` from ``items()`` is looked up again with
``get_many`` (a lookup that misses a listed key means a damaged branch
page), the count is compared with the table's, and, when the ``lmdb``
package is installed (``pip install 'keylane[check]'``), every entry of
every database in the file is read with a cursor.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_BATCH = 1024
_MAX_PROBLEMS = 20


def walk(path: Path) -> dict[str, Any]:
    """Runs in the child: what was read and what is wrong."""
    from keylane import VersionTable

    problems: list[str] = []
    entries = 0
    with VersionTable(path, create=False) as table:
        info = table.info()
        batch: list[tuple[bytes, int]] = []

        def verify() -> None:
            found = table.get_many([k for k, _ in batch])
            for (key, version), got in zip(batch, found, strict=True):
                if got != version and len(problems) < _MAX_PROBLEMS:
                    problems.append(f"key {key!r:.60} is listed at {version} but reads {got}")
            batch.clear()

        for key, version in table.items():
            entries += 1
            batch.append((key, version))
            if len(batch) == _BATCH:
                verify()
        verify()
        if entries != info["versions"]:
            problems.append(f"items() lists {entries} keys, the table counts {info['versions']}")
    pages = _walk_all_databases(path)
    return {"ok": not problems, "versions": entries, "databases": pages, "problems": problems}


def _walk_all_databases(path: Path) -> dict[str, int] | None:
    try:
        import lmdb
    except ImportError:
        return None
    counts: dict[str, int] = {}
    env = lmdb.open(str(path), readonly=True, max_dbs=16, subdir=True)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin(db=db) as txn:
                counts[name.decode("utf-8", "replace")] = sum(1 for _ in txn.cursor())
    finally:
        env.close()
    return counts


def check(path: Path, timeout: float = 600.0) -> tuple[bool, str]:
    """Walks the table at ``path`` in a child process; ``(ok, report)``."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "keylane._table_check", str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"the walk did not finish within {timeout:.0f}s"
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return False, (
            f"reading the table crashed the reader ({name}): its pages are damaged. "
            "Restore it from a backup or move it away."
        )
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
        return False, f"the table could not be read: {last}"
    result = json.loads(child.stdout)
    lines = [f"{result['versions']} versions read and looked up again"]
    if result["databases"] is not None:
        dbs = ", ".join(f"{k} {v}" for k, v in sorted(result["databases"].items()))
        lines.append(f"every entry of every database read: {dbs}")
    else:
        lines.append("install lmdb (keylane[check]) to read the other databases' pages too")
    lines += [f"problem: {p}" for p in result["problems"]]
    return bool(result["ok"]), "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(walk(Path(sys.argv[1]))))
