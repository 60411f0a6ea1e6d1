"""The ``keylane`` command line."""

from __future__ import annotations

from click.testing import CliRunner

import keylane
from keylane.cli import ENV_PREFIX, main


def invoke(args: list[str], **kw: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, args, auto_envvar_prefix=ENV_PREFIX, **kw)  # type: ignore[arg-type]


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert keylane.__version__ in result.output


def test_partition_keys_from_arguments() -> None:
    result = invoke(["partition", "--partitions", "1000", "a", "ab", "abc"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["a\t524", "ab\t434", "abc\t107"]


def test_partition_keys_from_stdin() -> None:
    result = invoke(["partition", "-p", "1000", "--stdin"], input="a\r\nab\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["a\t524", "ab\t434", "\t681"]


def test_partition_count_from_environment() -> None:
    result = invoke(["partition", "abc"], env={"KEYLANE_PARTITION_PARTITIONS": "1000"})
    assert result.exit_code == 0, result.output
    assert result.output == "abc\t107\n"


def test_partition_needs_keys() -> None:
    result = invoke(["partition", "-p", "3"])
    assert result.exit_code == 2
    assert "at least one KEY" in result.output


def test_partition_count_is_validated() -> None:
    result = invoke(["partition", "-p", "0", "k"])
    assert result.exit_code == 2
    assert "--partitions" in result.output


def test_inspect_prints_counts_and_first_entries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t"
    with keylane.VersionTable(path, durable=False) as t:
        t.check_and_set_many((f"acct-{i:03d}", i) for i in range(25))
        t.check_and_set(b"\xff\x00", 3)
        t.put_if_newer(b"balance", 1, b"10")
        t.mark_seen(b"m1")
    result = invoke(["inspect", str(path), "--limit", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"keylane version table {path}"
    assert "format 1 (keylane " in lines[1]
    assert "versions: 26 keys   values: 1 keys   seen ids: 1" in lines[2]
    assert lines[3:] == [
        "first 3 of 26 versions (key order):",
        "  acct-000\t0",
        "  acct-001\t1",
        "  acct-002\t2",
    ]
    result = invoke(["inspect", str(path), "-n", "100"])
    assert "  0xff00\t3" in result.output.splitlines()


def test_inspect_refuses_missing_tables_without_creating_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope"
    result = invoke(["inspect", str(missing)])
    assert result.exit_code == 1
    assert "no keylane version table" in result.output
    assert not missing.exists()
