"""The runner: real (harmless) commands, exact argv, dry run, typed failures, child cleanup."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import shlex
import time

import pytest

from mailsnap.errors import CommandFailed, ToolMissing
from mailsnap.runner import Runner

AWKWARD = ["Sent Items", "R&D", "it's \"quoted\"", "Café/Entwürfe", "-n", "$HOME", "*", ""]


def test_arguments_reach_the_command_verbatim() -> None:
    # printf prints each argument on its own line: no shell ever sees them.
    result = Runner().run(["printf", "%s\\n", *AWKWARD], mutates=False)
    assert result.stdout.split("\n")[:-1] == AWKWARD
    assert result.exit_code == 0


def test_log_line_can_be_pasted_into_a_shell(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    Runner().run(["printf", "%s", *AWKWARD], mutates=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("printf"))
    pasted = line.rsplit("  (", 1)[0]
    assert shlex.split(pasted) == ["printf", "%s", *AWKWARD]


def test_dry_run_skips_mutating_commands_but_runs_discovery(tmp_path: Path) -> None:
    runner = Runner(dry_run=True)
    made = tmp_path / "made by touch"
    skipped = runner.run(["touch", made], mutates=True)
    assert skipped.skipped and not made.exists()
    listed = runner.run(["ls", "-a", tmp_path], mutates=False)
    assert not listed.skipped and "." in listed.stdout.split()
    assert [r.skipped for r in runner.history] == [True, False]


def test_failure_is_one_typed_error_with_argv_code_and_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "no such file"
    with pytest.raises(CommandFailed) as info:
        Runner().run(["ls", missing], mutates=False)
    exc = info.value
    assert exc.argv == ["ls", str(missing)]
    assert exc.exit_code_of_command == 2
    assert "No such file" in exc.stderr
    assert "exited 2" in str(exc) and "no such file" in str(exc)


def test_ok_codes_accept_a_warning_exit() -> None:
    result = Runner().run(["sh", "-c", "exit 24"], mutates=False, ok_codes=(0, 24))
    assert result.exit_code == 24


def test_missing_tool_says_what_to_do() -> None:
    with pytest.raises(ToolMissing, match="not installed"):
        Runner().run(["mailsnap-no-such-tool"], mutates=False)


def test_timeout_stops_the_child() -> None:
    started = time.monotonic()
    with pytest.raises(CommandFailed, match="timed out"):
        Runner().run(["sleep", "30"], mutates=False, timeout=0.5)
    assert time.monotonic() - started < 10


def test_on_wait_error_stops_the_child_and_propagates(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    class Invalid(Exception):
        pass

    def watch() -> None:
        raise Invalid

    with pytest.raises(Invalid):
        Runner().run(
            ["sh", "-c", f'echo $$ > "{pidfile}"; exec sleep 30'],
            mutates=True,
            timeout=None,
            on_wait=watch,
            poll_interval=0.2,
        )
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_environment_is_passed_whole() -> None:
    result = Runner().run(["env"], mutates=False, env={"PATH": os.environ["PATH"], "X": "a b"})
    assert "X=a b" in result.stdout.splitlines()


def test_on_wait_poll_racing_the_exit_is_not_a_timeout() -> None:
    # Commands that end right around a poll boundary must not be mistaken for a timeout.
    runner = Runner()
    for delay in ("0.05", "0.1", "0.15", "0.2"):
        result = runner.run(["sleep", delay], mutates=True, timeout=None,
                            on_wait=lambda: None, poll_interval=0.05)
        assert result.exit_code == 0
