"""The ``keylane`` command line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
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
    assert "format 2 (keylane " in lines[1]
    assert "versions: 26 keys   values: 1 keys   seen ids: 1" in lines[2]
    assert lines[3] == "  journal: 0 records not yet folded into the B-tree", "close() folds"
    assert lines[4:] == [
        "first 3 of 26 versions (key order):",
        "  acct-000\t0",
        "  acct-001\t1",
        "  acct-002\t2",
    ]
    result = invoke(["inspect", str(path), "-n", "100"])
    assert "  0xff00\t3" in result.output.splitlines()


def test_inspect_reports_the_map_the_table_was_created_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t"
    with keylane.VersionTable(path, map_size=3 << 30, durable=False) as t:
        t.check_and_set(b"k", 1)
    result = invoke(["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "used of a 3.0 GiB map" in result.output.splitlines()[1]


def test_inspect_refuses_missing_tables_without_creating_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope"
    result = invoke(["inspect", str(missing)])
    assert result.exit_code == 1
    assert "no keylane version table" in result.output
    assert not missing.exists()


# ---- keylane run / dlq replay / bench -----------------------------------------------------

SERVICE = textwrap.dedent(
    """
    import sys, trio, keylane

    broker = keylane.MemoryBroker(partitions=4, persist_dir="{state}")
    if not broker.topics():
        for i in range(400):
            broker.produce("jobs", key=f"k{{i % 20}}", value=str(i), headers={{"version": str(i)}})
    app = keylane.App(broker, topics=["jobs"], group="svc", concurrency=8, dlq="jobs.dlq",
                      retry=keylane.RetryPolicy(max_attempts=1), commit_interval=0.1)

    @app.handler
    async def handle(msg):
        if msg.value.endswith(b"7"):
            raise ValueError("sevens fail")
        await trio.sleep({sleep})
    """
)


def _service(tmp_path, sleep: float) -> tuple[dict[str, str], str]:  # type: ignore[no-untyped-def]
    state = tmp_path / "broker"
    (tmp_path / "svc.py").write_text(SERVICE.format(state=state, sleep=sleep))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return env, str(state)


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 60) -> list[str]:
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)}")


def test_run_stops_gracefully_on_sigint_and_commits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, state = _service(tmp_path, sleep=0.01)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keylane.cli", "run", "svc:app", "--log-level", "info"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(proc, "assigned")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "SIGINT received" in rest
    assert "stopped;" in rest
    broker = keylane.MemoryBroker(partitions=4, persist_dir=state)
    committed = broker.committed("svc")
    assert sum(committed.values()) > 0, "offsets were committed before exit"
    assert broker.assignment("svc") == {}


def test_run_second_signal_forces(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, _ = _service(tmp_path, sleep=30)  # handlers that would take far too long
    proc = subprocess.Popen(
        [sys.executable, "-m", "keylane.cli", "run", "svc:app"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(proc, "assigned")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _wait_for(proc, "stopping")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "forced stop" in rest
    assert time.monotonic() - started < 20, "did not wait for the 30 s handlers"


def test_run_refuses_bad_targets(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "notapp.py").write_text("app = 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for target, message in [
        ("nocolon", "module:attribute"),
        ("missing_module:app", "cannot import"),
        ("notapp:nothing", "no attribute"),
        ("notapp:app", "is a int, not a keylane.App"),
    ]:
        result = invoke(["run", target])
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_run_refuses_a_module_that_hides_an_installed_one(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    service = tmp_path / "service"
    service.mkdir()
    (service / "svc.py").write_text("import keylane\napp = 42\n")
    (tmp_path / "prometheus_client.py").write_text("raise SystemExit('hijacked')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = invoke(["run", "svc:app", "--app-dir", str(service)])
    # Found in --app-dir (and refused only for not being an App).
    assert result.exit_code == 2, result.output
    assert "is a int, not a keylane.App" in result.output
    result = invoke(["run", "svc:app"])
    assert result.exit_code == 2, result.output
    assert "would hide the installed module 'prometheus_client'" in result.output
    assert "hijacked" not in result.output


def test_dlq_replay_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, _ = _service(tmp_path, sleep=0)
    code = (
        "import trio, functools, svc\n"
        "trio.run(functools.partial(svc.app.run, until_idle=True))\n"
        "trio.run(svc.broker.aclose)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)
    result = subprocess.run(
        [sys.executable, "-m", "keylane.cli", "dlq", "replay", "svc:app", "--rate", "500"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # 400 values, those ending in 7 failed: 40 dead letters.
    assert result.stdout.strip() == "replayed 40 dead letters from jobs.dlq"


NODLQ_SERVICE = textwrap.dedent(
    """
    import keylane

    broker = keylane.MemoryBroker(partitions=2)
    for i in range(30):
        broker.produce("jobs", key=f"k{i % 3}", value=str(i))
    app = keylane.App(broker, topics=["jobs"], group="g")
    seen = []

    @app.handler
    async def handle(msg):
        seen.append(msg.value)

    nohandler = keylane.App(broker, topics=["jobs"], group="g2")

    stuck = keylane.App(
        broker, topics=["jobs"], group="g3",
        retry=keylane.RetryPolicy(max_attempts=2, backoff_base=0.01, backoff_max=0.05),
    )

    @stuck.handler
    async def fail_seven(msg):
        if msg.value == b"7":
            raise RuntimeError("seven is broken")
    """
)


def test_run_takes_a_file_path_and_until_idle_returns(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svc_file.py").write_text(NODLQ_SERVICE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = invoke(["run", "./svc_file.py:app", "--until-idle", "--log-level", "warning"])
    assert result.exit_code == 0, result.output
    svc = sys.modules.pop("svc_file")
    assert len(svc.seen) == 30
    assert svc.app.stats()["handled"] == 30


def test_log_level_debug_shows_fetches_and_commits(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "svc_debug.py").write_text(NODLQ_SERVICE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        result = invoke(["run", "svc_debug.py:app", "--until-idle", "--log-level", "debug"])
    finally:
        logging.getLogger("keylane").setLevel(logging.NOTSET)
        sys.modules.pop("svc_debug", None)
    assert result.exit_code == 0, result.output
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("fetches brought" in m for m in debug), debug
    assert any(m.startswith("group g: committed jobs/") for m in debug), debug
    # Summed, not one line per fetch.
    assert len(debug) < 20


def test_run_until_idle_with_a_blocked_key_exits_1_naming_it(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svc_stuck.py").write_text(NODLQ_SERVICE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = invoke(["run", "svc_stuck.py:stuck", "--until-idle", "--log-level", "error"])
    sys.modules.pop("svc_stuck", None)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: BlockedKeys: group g3: everything else is handled")
    assert "seven is broken" in line


def test_keylane_errors_are_one_line_and_debug_shows_the_traceback(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svc_errors.py").write_text(NODLQ_SERVICE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = invoke(["run", "svc_errors.py:nohandler"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: ConfigError: no handler: decorate an async function with @app.handler first"
    ]
    debug = invoke(["--debug", "run", "svc_errors.py:nohandler"])
    assert isinstance(debug.exception, keylane.ConfigError)
    sys.modules.pop("svc_errors", None)
    missing = invoke(["run", "./nowhere.py:app"])
    assert missing.exit_code == 2
    assert "nowhere.py is not a .py file" in missing.output


def test_every_option_of_every_command_has_help() -> None:
    import click

    from keylane.cli import main

    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        missing.extend(
            f"{path} {p.opts[0]}"
            for p in cmd.params
            if isinstance(p, click.Option) and not p.help and not p.hidden
        )
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "keylane")
    assert missing == []
