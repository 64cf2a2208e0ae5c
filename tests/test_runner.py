"""The runner: real (harmless) commands, exact argv, dry run, typed failures, child cleanup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import logging
import os
from pathlib import Path
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

from mailsnap import procs
from mailsnap.errors import CommandFailed, Interrupted, ToolMissing
from mailsnap.runner import OWNER_ENV, Runner

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


def test_an_interruption_after_the_child_was_reaped_still_propagates(tmp_path: Path) -> None:
    """A signal handled just after sh's waitpid reaped the child, before sh stored its exit
    code: stopping the child then met ECHILD, and that error replaced the interruption (a
    SIGTERM during an upload ended the run with exit 1 and "No child processes", not 130)."""
    pidfile = tmp_path / "pid"

    def reaped_then_interrupted() -> None:
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        # What sh's own waitpid had done when the handler ran. (sh's threads reap too, when
        # its output ends or once a second: the background sleep keeps the output open,
        # and the once-a-second poll, were it ever first, would leave nothing to test.)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise Interrupted("SIGTERM")

    with pytest.raises(Interrupted):
        Runner().run(
            ["sh", "-c", f'sleep 30 & echo $$ > "{pidfile}.tmp"; mv "{pidfile}.tmp" "{pidfile}"; '
                         "exec sleep 30"],
            mutates=True,
            timeout=None,
            on_wait=reaped_then_interrupted,
            poll_interval=0.05,
        )


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


# --- children never outlive mailsnap (issue #7) ---------------------------------------------------

MARKER = "mailsnap-mail-20261128T020000Z"


@pytest.fixture
def owner() -> str:
    """A marker no other test (or run) uses, to find exactly this test's processes."""
    return f"mailsnap-t{uuid.uuid4().hex[:12]}-20261128T020000Z"


def marked(owner: str) -> list[int]:
    """Running processes (zombies excluded) whose environment carries ``owner``."""
    return [pid for pid in procs._pids() if procs.owner_of(pid) == owner and procs.alive(pid)]


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def no_marker_inherited(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(OWNER_ENV, raising=False)
    yield


def test_child_is_killed_when_mailsnap_is_killed(tmp_path: Path) -> None:
    # A separate mailsnap-like process runs `sleep` through the runner from its main thread and
    # is then killed with SIGKILL: no handler runs, only the kernel can stop the sleep.
    pidfile = tmp_path / "pid"
    script = (
        "import sys\n"
        "from mailsnap.runner import Runner\n"
        "Runner().run(['sh', '-c', 'echo $$ > \"$0\"; exec sleep 60', sys.argv[1]],\n"
        "             mutates=False, timeout=None)\n"
    )
    src = Path(procs.__file__).parents[1]
    helper = subprocess.Popen(
        [sys.executable, "-c", script, str(pidfile)], start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(src)),
    )
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10)
        child = int(pidfile.read_text())
        assert procs.alive(child)
        os.kill(helper.pid, signal.SIGKILL)
        helper.wait(timeout=10)
        assert wait_until(lambda: not procs.alive(child), 2), "sleep outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(helper.pid, signal.SIGKILL)
        helper.wait(timeout=10)
        if pidfile.exists() and pidfile.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_child_whose_parent_died_before_the_guard_does_not_start() -> None:
    # The race the guard closes: mailsnap dies between fork and prctl, so the signal never
    # comes. Staged by telling the child's guard that its parent is someone else.
    from mailsnap.runner import _die_with_parent

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _die_with_parent(os.getppid() + 1)()
        finally:
            os._exit(0)  # only reached if the guard let the child go on
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_child_runs_in_its_own_process_group() -> None:
    result = Runner().run(
        [sys.executable, "-c", "import os; print(os.getpid(), os.getpgid(0))"], mutates=False)
    pid, pgid = map(int, result.stdout.split())
    assert pgid == pid
    assert pgid != os.getpgrp()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real stdin for passthrough commands (pytest's own refuses to be read)."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


@pytest.mark.usefixtures("terminal")
def test_passthrough_child_stays_in_our_process_group(tmp_path: Path) -> None:
    # The admin's own --exec command reads the terminal and must get Ctrl-C: our group.
    out = tmp_path / "pgid"
    Runner().run(
        [sys.executable, "-c", "import os, sys; open(sys.argv[1], 'w').write(str(os.getpgid(0)))",
         str(out)],
        mutates=True, timeout=None, passthrough=True,
    )
    assert int(out.read_text()) == os.getpgrp()


@pytest.mark.usefixtures("no_marker_inherited")
def test_owner_marker_reaches_the_child() -> None:
    result = Runner(owner=MARKER).run(["env"], mutates=False)
    lines = result.stdout.splitlines()
    assert f"{OWNER_ENV}={MARKER}" in lines
    assert f"PATH={os.environ['PATH']}" in lines  # a copy of our environment, not a bare one


@pytest.mark.usefixtures("no_marker_inherited")
def test_owner_marker_is_added_to_a_given_environment() -> None:
    result = Runner(owner=MARKER).run(["env"], mutates=False,
                                      env={"PATH": os.environ["PATH"], "X": "a b"})
    assert sorted(result.stdout.splitlines()) == sorted(
        [f"PATH={os.environ['PATH']}", "X=a b", f"{OWNER_ENV}={MARKER}"])


@pytest.mark.usefixtures("no_marker_inherited")
def test_no_marker_without_an_owner() -> None:
    runner = Runner()
    assert OWNER_ENV not in runner.run(["env"], mutates=False).stdout
    env = {"PATH": os.environ["PATH"]}
    assert OWNER_ENV not in runner.run(["env"], mutates=False, env=env).stdout


@pytest.mark.usefixtures("no_marker_inherited")
def test_owned_by_sets_and_restores_the_marker() -> None:
    runner = Runner()
    with runner.owned_by(MARKER):
        assert runner.owner == MARKER
        assert f"{OWNER_ENV}={MARKER}" in runner.run(["env"], mutates=False).stdout
    assert runner.owner is None
    assert OWNER_ENV not in runner.run(["env"], mutates=False).stdout


@pytest.mark.usefixtures("terminal")
def test_passthrough_child_carries_the_marker(tmp_path: Path) -> None:
    out = tmp_path / "env"
    Runner(owner=MARKER).run(["sh", "-c", f'printenv {OWNER_ENV} > "$0"', str(out)],
                             mutates=True, timeout=None, passthrough=True)
    assert out.read_text().strip() == MARKER


def test_stopping_a_command_also_stops_what_it_forked(owner: str) -> None:
    # sh dies of SIGTERM but leaves both sleeps behind unless the whole group is signalled.
    class Invalid(Exception):
        pass

    polls = 0

    def watch() -> None:
        nonlocal polls
        polls += 1
        if polls >= 3:
            raise Invalid

    started = time.monotonic()
    with pytest.raises(Invalid):
        Runner(owner=owner).run(["sh", "-c", "sleep 60 & sleep 60; wait"], mutates=True,
                                timeout=None, on_wait=watch, poll_interval=0.1)
    assert marked(owner) == []
    assert time.monotonic() - started < 3  # SIGTERM sufficed; no waiting out the grace period


def test_timeout_also_kills_what_the_command_forked(owner: str) -> None:
    with pytest.raises(CommandFailed, match="timed out"):
        Runner(owner=owner).run(["sh", "-c", "sleep 60 & sleep 60; wait"], mutates=False,
                                timeout=0.5)
    assert wait_until(lambda: marked(owner) == [], 2), marked(owner)


def test_a_grandchild_ignoring_sigterm_is_killed_after_the_grace_period(
    owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailsnap.runner.KILL_GRACE", 0.5)

    def interrupt() -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        # An ignored signal stays ignored across exec: this sleep shrugs off SIGTERM.
        Runner(owner=owner).run(
            ["sh", "-c", "(trap '' TERM; sleep 60) & sleep 60"], mutates=True,
            timeout=None, on_wait=interrupt, poll_interval=0.1)
    assert marked(owner) == []
    assert time.monotonic() - started >= 0.5
