"""The ``keylane`` command line.

Every option can also come from the environment: ``KEYLANE_<COMMAND>_<OPTION>``
(for example ``KEYLANE_PARTITION_PARTITIONS=12``), as click's
``auto_envvar_prefix`` spells it; ``keylane <command> --help`` shows the names.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

import keylane

ENV_PREFIX = "KEYLANE"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(keylane.__version__, prog_name="keylane")
def main() -> None:
    """keylane: parallel consumption with per-key order."""


def _stdin_keys() -> Iterator[bytes]:
    for line in sys.stdin.buffer:
        yield line.rstrip(b"\r\n")


@main.command()
@click.option(
    "--partitions",
    "-p",
    type=click.IntRange(min=1, max=2**31 - 1),
    required=True,
    show_envvar=True,
    help="Partition count of the topic.",
)
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Also read keys from stdin, one per line."
)
@click.argument("keys", nargs=-1)
def partition(partitions: int, from_stdin: bool, keys: tuple[str, ...]) -> None:
    """Print the partition Kafka's Java producer picks for each KEY.

    Output is one ``KEY<TAB>PARTITION`` line per key, in input order.
    """
    if not keys and not from_stdin:
        raise click.UsageError("give at least one KEY, or --stdin")
    out = sys.stdout
    for key in keys:
        out.write(f"{key}\t{keylane.partition_for_key(key, partitions)}\n")
    if from_stdin:
        batch: list[bytes] = []
        for raw in _stdin_keys():
            batch.append(raw)
            if len(batch) >= 65536:
                _write_batch(batch, partitions)
                batch.clear()
        _write_batch(batch, partitions)


def _write_batch(batch: list[bytes], partitions: int) -> None:
    parts = keylane.partitions_for_keys(batch, partitions)
    sys.stdout.write(
        "".join(
            f"{k.decode('utf-8', 'backslashreplace')}\t{p}\n"
            for k, p in zip(batch, parts, strict=True)
        )
    )


def _show_key(key: bytes) -> str:
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + key.hex()
    return text if text.isprintable() else repr(key)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError("unreachable")


@main.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=0),
    default=10,
    show_envvar=True,
    help="How many entries of the version map to print, in key order.",
)
def inspect(path: Path, limit: int) -> None:
    """Print the counts and first entries of the version table at PATH.

    Opens the table read-mostly: nothing is created or changed.
    """
    try:
        table = keylane.VersionTable(path, create=False)
    except keylane.StoreError as e:
        raise click.ClickException(str(e)) from None
    with table:
        info = table.info()
        out = sys.stdout
        out.write(f"keylane version table {info['path']}\n")
        out.write(
            f"  format {info['format']} ({info['created_by']}), "
            f"{_size(info['used_bytes'])} used of a {_size(info['map_size'])} map\n"
        )
        out.write(
            f"  versions: {info['versions']} keys   values: {info['values']} keys   "
            f"seen ids: {info['seen']}\n"
        )
        if limit and info["versions"]:
            shown = min(limit, info["versions"])
            out.write(f"first {shown} of {info['versions']} versions (key order):\n")
            for i, (key, version) in enumerate(table.items()):
                if i >= limit:
                    break
                out.write(f"  {_show_key(key)}\t{version}\n")


def run() -> None:
    main(auto_envvar_prefix=ENV_PREFIX)


if __name__ == "__main__":  # pragma: no cover
    run()
