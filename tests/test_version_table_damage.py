"""Damaged version-table files and hostile use never kill the process: the
cheap checks at open refuse what they can see, ``keylane inspect --check``
walks the rest in a child, and no native lock is held across the GIL.

Everything that could crash runs in a child process (``run_isolated``): a
death by SIGBUS/SIGSEGV/SIGABRT fails the test instead of the suite."""

from __future__ import annotations

import pathlib
import random
import textwrap

import pytest

import keylane
from keylane._table_check import check

from .conftest import run_isolated

OPEN_IN_CHILD = textwrap.dedent(
    """
    import keylane
    try:
        with keylane.VersionTable({path!r}, create=False) as t:
            print("opened", t.get(b"key-00001"), sum(1 for _ in t.items()))
    except keylane.StoreFormatError as e:
        print("refused:", e)
    """
)


def make_table(path: pathlib.Path, keys: int = 20_000) -> None:
    with keylane.VersionTable(path) as t:
        t.check_and_set_many((b"key-%05d" % i, i) for i in range(keys))
        t.checkpoint()


def open_in_child(path: pathlib.Path) -> str:
    result = run_isolated(OPEN_IN_CHILD.format(path=str(path)))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_healthy_table_opens_and_passes_the_check(tmp_path: pathlib.Path) -> None:
    make_table(tmp_path / "t")
    assert open_in_child(tmp_path / "t") == "opened 1 20000"
    ok, report = check(tmp_path / "t")
    assert ok, report
    assert "20000 versions read" in report


def test_an_empty_data_file_is_refused(tmp_path: pathlib.Path) -> None:
    make_table(tmp_path / "t", keys=10)
    (tmp_path / "t" / "data.mdb").write_bytes(b"")
    out = open_in_child(tmp_path / "t")
    assert out.startswith("refused:"), out
    assert "empty (0 bytes)" in out


@pytest.mark.parametrize("keep", [100, 4096 + 50, 8192, 0.5])
def test_a_truncated_data_file_is_refused_not_a_sigbus(tmp_path: pathlib.Path, keep: float) -> None:
    make_table(tmp_path / "t")
    data = tmp_path / "t" / "data.mdb"
    whole = data.read_bytes()
    data.write_bytes(whole[: int(len(whole) * keep) if isinstance(keep, float) else keep])
    out = open_in_child(tmp_path / "t")
    assert out.startswith("refused:"), out
    assert "damaged" in out


@pytest.mark.parametrize("page", [0, 1])
def test_a_damaged_meta_page_is_refused(tmp_path: pathlib.Path, page: int) -> None:
    make_table(tmp_path / "t")
    data = tmp_path / "t" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[page * 4096 + 16] ^= 0x5A  # the magic number
    data.write_bytes(bytes(raw))
    out = open_in_child(tmp_path / "t")
    assert out.startswith("refused:"), out
    assert f"meta page {page}" in out


def test_damage_inside_the_tree_is_found_by_the_check_without_a_crash(
    tmp_path: pathlib.Path,
) -> None:
    """Bit flips in B-tree pages pass the cheap checks (LMDB 0.9 has no page
    checksums); the walk finds them, and whatever LMDB does with them, the
    caller survives and is told."""
    make_table(tmp_path / "t")
    data = tmp_path / "t" / "data.mdb"
    raw = bytearray(data.read_bytes())
    rng = random.Random(11)
    for page in range(2, len(raw) // 4096):
        for _ in range(8):
            raw[page * 4096 + rng.randrange(4096)] ^= 1 << rng.randrange(8)
    data.write_bytes(bytes(raw))
    ok, report = check(tmp_path / "t")
    assert not ok, report


def test_inspect_check_exits_non_zero_on_damage(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from keylane.cli import main

    make_table(tmp_path / "t", keys=100)
    good = CliRunner().invoke(main, ["inspect", str(tmp_path / "t"), "--check"])
    assert good.exit_code == 0, good.output
    assert "check passed" in good.output
    data = tmp_path / "t" / "data.mdb"
    data.write_bytes(data.read_bytes()[:9000])
    bad = CliRunner().invoke(main, ["inspect", str(tmp_path / "t"), "--check"])
    assert bad.exit_code == 1, bad.output
    assert "damaged" in bad.output


def test_two_threads_sharing_one_items_iterator_never_deadlock(tmp_path: pathlib.Path) -> None:
    make_table(tmp_path / "t")
    code = textwrap.dedent(
        f"""
        import threading, keylane
        t = keylane.VersionTable({str(tmp_path / "t")!r})
        it = t.items()
        got, busy = [], [0]
        def run():
            while True:
                try:
                    got.append(next(it))
                except StopIteration:
                    return
                except keylane.InvalidArgument as e:
                    assert "another thread" in str(e)
                    busy[0] += 1
        threads = [threading.Thread(target=run) for _ in range(4)]
        for th in threads: th.start()
        for th in threads: th.join(60)
        assert not any(th.is_alive() for th in threads), "deadlocked"
        assert len(set(got)) == len(got) == 20000, (len(got), len(set(got)))
        print("ok")
        """
    )
    result = run_isolated(code, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
