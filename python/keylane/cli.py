"""The ``keylane`` command line.

Every option can also come from the environment: ``KEYLANE_<COMMAND>_<OPTION>``
(for example ``KEYLANE_PARTITION_PARTITIONS=12``), as click's
``auto_envvar_prefix`` spells it; ``keylane <command> --help`` shows the names.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import trio

import keylane
from keylane.bench.command import bench
from keylane.lab.command import lab

ENV_PREFIX = "KEYLANE"


class _Group(click.Group):
    """Turns a ``KeylaneError`` into a one-line error (exit status 1)
    unless ``--debug`` asks for the traceback; click's own usage errors keep
    status 2, and anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except keylane.KeylaneError as e:
            if ctx.meta.get("keylane.debug"):
                raise
            raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(keylane.__version__, prog_name="keylane")
@click.option("--debug", is_flag=True, help="Show the traceback of keylane errors too.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """keylane: parallel consumption with per-key order."""
    ctx.meta["keylane.debug"] = debug


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

    Output is one KEY<TAB>PARTITION line per key, in input order.
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
@click.option(
    "--check",
    is_flag=True,
    help="Also read every page in a child process and look every key up again; "
    "exits 1 if the table is damaged.",
)
def inspect(path: Path, limit: int, check: bool) -> None:
    """Print the counts and first entries of the version table at PATH.

    Opens the table read-mostly: nothing is created or changed.
    """
    if check:
        from keylane._table_check import check as walk

        ok, report = walk(path)
        click.echo(report)
        if not ok:
            raise click.ClickException(f"{path} is damaged")
        click.echo("check passed")
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
        out.write(f"  journal: {info['journal_records']} records not yet folded into the B-tree\n")
        if limit and info["versions"]:
            shown = min(limit, info["versions"])
            out.write(f"first {shown} of {info['versions']} versions (key order):\n")
            for i, (key, version) in enumerate(table.items()):
                if i >= limit:
                    break
                out.write(f"  {_show_key(key)}\t{version}\n")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Also when logging was set up already (basicConfig then does nothing).
    logging.getLogger("keylane").setLevel(getattr(logging, level))


def load_app(target: str, app_dir: str | os.PathLike[str] = ".") -> keylane.App:
    """The App at ``module:attribute``, imported with ``app_dir`` first on
    ``sys.path`` (uvicorn's ``--app-dir`` convention). A module in that
    directory that would hide an installed one (a stray
    ``prometheus_client.py``) is refused rather than imported in its place."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{target!r} is not module:attribute or path/to/file.py:attribute "
            "(for example service:app or ./service.py:app)"
        )
    directory = Path(app_dir).resolve()
    if not directory.is_dir():
        raise click.BadParameter(f"--app-dir {app_dir} is not a directory")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        # A file: its directory goes first on sys.path, its stem is the module.
        file = (directory / module_name).resolve()
        if not file.is_file() or file.suffix != ".py":
            raise click.BadParameter(
                f"{module_name} is not a .py file (looked for {file}; a relative path is "
                "taken from --app-dir, the current directory by default)"
            )
        directory, module_name = file.parent, file.stem
    _refuse_shadowing(directory, module_name.partition(".")[0])
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise click.BadParameter(f"cannot import {module_name!r}: {e}") from None
    obj: object = module
    missing = object()
    for part in attr.split("."):
        obj = getattr(obj, part, missing)
        if obj is missing:
            raise click.BadParameter(f"{module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, keylane.App):
        raise click.BadParameter(f"{target} is a {type(obj).__name__}, not a keylane.App")
    return obj


APP_DIR = click.option(
    "--app-dir",
    type=click.Path(file_okay=False, exists=True),
    default=".",
    show_envvar=True,
    help="Directory TARGET's module is imported from (put first on sys.path).",
)


def _refuse_shadowing(directory: Path, own: str) -> None:
    elsewhere = [p for p in sys.path if p and Path(p).resolve() != directory]
    for entry in directory.iterdir():
        if entry.suffix == ".py":
            name = entry.stem
        elif (entry / "__init__.py").is_file():
            name = entry.name
        else:
            continue
        if name == own or not name.isidentifier():
            continue
        installed = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if installed is not None:
            raise click.UsageError(
                f"{entry} would hide the installed module {name!r} once {directory} is on "
                "sys.path; rename or remove it, or keep the service in its own directory "
                "and pass --app-dir"
            )


@main.command(name="run")
@click.argument("target")
@APP_DIR
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_envvar=True,
    help="Level of keylane's (and the root) logger.",
)
@click.option(
    "--until-idle",
    is_flag=True,
    help="Return (status 0) once everything produced so far is handled and committed: "
    "for batch jobs and tests.",
)
def run_command(target: str, app_dir: str, log_level: str, until_idle: bool) -> None:
    """Runs the keylane.App at TARGET (module:attribute, or
    path/to/file.py:attribute) until SIGINT or SIGTERM: the first stops it
    gracefully (running handlers finish, offsets are committed), a second
    forces it."""
    _setup_logging(log_level.upper())
    app = load_app(target, app_dir)
    trio.run(functools.partial(app.run, until_idle=until_idle))


@main.group()
def dlq() -> None:
    """Dead-letter queue tools."""


@dlq.command(name="replay")
@click.argument("target")
@APP_DIR
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_envvar=True,
    help="Messages per second.",
)
@click.option(
    "--burst",
    type=click.IntRange(min=1),
    default=None,
    show_envvar=True,
    help="Messages that may go at once (default: one second's worth).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    show_envvar=True,
    help="Replay at most this many.",
)
@click.option(
    "--skip-malformed",
    is_flag=True,
    help="Park records that are not keylane dead letters (--park-topic or --park-file) "
    "and go on, instead of stopping at the first.",
)
@click.option("--park-topic", default=None, help="Topic that receives skipped records as-is.")
@click.option(
    "--park-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File that receives skipped records as JSON lines (bytes in base64).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_envvar=True,
    help="Level of keylane's (and the root) logger.",
)
def dlq_replay(
    target: str,
    app_dir: str,
    rate: float,
    burst: int | None,
    limit: int | None,
    skip_malformed: bool,
    park_topic: str | None,
    park_file: Path | None,
    log_level: str,
) -> None:
    """Re-produces the dead letters of the App at TARGET to their original
    topics, rate-limited, with their original headers (versions included).
    Progress is committed as it goes; a malformed record stops the replay
    naming its offset, unless --skip-malformed parks it."""
    from keylane.dlq import ReplayStopped

    _setup_logging(log_level.upper())
    app = load_app(target, app_dir)
    try:
        count = trio.run(
            lambda: app.replay_dlq(
                rate=rate,
                burst=burst,
                limit=limit,
                skip_malformed=skip_malformed,
                park_topic=park_topic,
                park_file=park_file,
            )
        )
    except ReplayStopped as e:
        raise click.ClickException(str(e)) from None
    except keylane.ConfigError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"replayed {count} dead letters from {app.dlq}")


main.add_command(bench)
main.add_command(lab)


def run() -> None:
    main(auto_envvar_prefix=ENV_PREFIX)


if __name__ == "__main__":  # pragma: no cover
    run()
