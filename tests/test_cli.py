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
