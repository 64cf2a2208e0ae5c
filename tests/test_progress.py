"""The progress display: drawn for a person at a terminal (a real pseudo-terminal here), never
without one (cron, systemd, a pipe, CliRunner); --quiet and --verbose; and the live copier's
counts that feed it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from rich.logging import RichHandler
from typer.testing import CliRunner

from mailsnap import progress
from mailsnap.cli import app
from mailsnap.copiers import live as maildir_module
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier, _Progress2
from mailsnap.runner import Runner
from tests.helpers.maildir_writer import seed

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What only the progress line draws: the file counter, a bar or spinner, carriage returns.
PROGRESS_MARKS = re.compile(r"[\d,]+ files +[\d.]+/|━|\r|\x1b\[")


@pytest.fixture(scope="module")
def mail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read, never changed, by every test here."""
    root = tmp_path_factory.mktemp("progress") / "Maildir"
    seed(root, per_folder=600)  # 3,000 messages: a copy long enough to be drawn a few times
    return root


def mailsnap_argv(tmp_path: Path, mail: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mailsnap", "backup", "--source", str(mail),
            "--target", str(tmp_path / "backups"), "--backend", "live", *extra]


def env_for(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, MAILSNAP_RUN_DIR=str(tmp_path / "run"),
                MAILSNAP_STATE_DIR=str(tmp_path / "state"), COLUMNS="160", TERM="xterm")


def run_on_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a fresh pseudo-terminal, as a person at a
    terminal would; return its exit code and everything it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_is_drawn_on_a_terminal(tmp_path: Path, mail: Path) -> None:
    code, out = run_on_pty(mailsnap_argv(tmp_path, mail), env_for(tmp_path))
    assert code == 0, out
    text = ANSI.sub("", out)
    assert "mail: copy (maildir)" in text, text[-3000:]
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) files +[\d.]+/", text)]
    assert counts and max(counts) == 3001  # 3,000 messages and dovecot-uidlist
    assert "\r" in out and "\x1b[" in out  # redrawn in place, in colour
    # The log lines are still there, printed above the progress line.
    assert "copy (maildir): done" in text


@pytest.mark.slow
def test_quiet_draws_no_progress_on_a_terminal(tmp_path: Path, mail: Path) -> None:
    code, out = run_on_pty(mailsnap_argv(tmp_path, mail, "--quiet"), env_for(tmp_path))
    assert code == 0, out
    assert ANSI.sub("", out).strip() == ""  # a good night prints nothing


@pytest.mark.slow
def test_no_progress_without_a_terminal(tmp_path: Path, mail: Path) -> None:
    # As under cron or systemd: stdout and stderr are pipes.
    result = subprocess.run(mailsnap_argv(tmp_path, mail), env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "copy (maildir): done" in result.stderr  # plain log lines
    assert PROGRESS_MARKS.search(result.stderr) is None, result.stderr[:2000]
    assert "\r" not in result.stdout and "\x1b[" not in result.stdout


def test_no_progress_under_clirunner(tmp_path: Path, mail: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env_for(tmp_path).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, mailsnap_argv(tmp_path, mail)[3:])
    assert result.exit_code == 0, result.output
    assert PROGRESS_MARKS.search(result.output) is None
    assert "━" not in result.output and "\r" not in result.output


@pytest.mark.slow
def test_quiet_prints_only_errors_and_verbose_prints_debug(tmp_path: Path, mail: Path) -> None:
    quiet = subprocess.run(mailsnap_argv(tmp_path, mail, "--quiet"), env=env_for(tmp_path),
                           capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    failing = subprocess.run(
        mailsnap_argv(tmp_path, tmp_path / "nowhere", "--quiet"), env=env_for(tmp_path),
        capture_output=True, text=True, timeout=120, check=False)
    assert failing.returncode == 1
    assert "ERROR" in failing.stderr and "does not exist" in failing.stderr
    assert "INFO" not in failing.stderr
    verbose = subprocess.run(mailsnap_argv(tmp_path, mail, "--verbose"), env=env_for(tmp_path),
                             capture_output=True, text=True, timeout=120, check=False)
    assert verbose.returncode == 0
    assert "DEBUG copy (maildir): starting" in verbose.stderr


# -- the live copier's counts -----------------------------------------------------------


def test_live_copier_reports_its_counts(tmp_path: Path, mail: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir_module, "PROGRESS_INTERVAL", 0.0)  # every file
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "copy"
    dest.mkdir()
    stats = MaildirCopier(Runner(), progress=lambda f, b: seen.append((f, b))).copy(
        mail, dest, previous=None, excludes=())
    assert stats.files == 3001
    assert seen[-1] == (stats.files, stats.bytes)
    files = [f for f, _ in seen]
    assert files == sorted(files)  # never goes backwards (no move happened)
    # One report per file during the first pass, then one after every pass.
    assert files[:stats.files] == list(range(1, stats.files + 1))
    assert len(seen) == stats.files + stats.passes


def test_live_copier_reports_sparingly_by_default(tmp_path: Path, mail: Path) -> None:
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "copy"
    dest.mkdir()
    stats = MaildirCopier(Runner(), progress=lambda f, b: seen.append((f, b))).copy(
        mail, dest, previous=None, excludes=())
    assert seen[-1] == (stats.files, stats.bytes)
    assert len(seen) < stats.files / 10  # a few times a second, not per file


def test_without_a_terminal_nothing_is_even_set_up(
    tmp_path: Path, mail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rich would draw little on a pipe anyway; mailsnap must not rely on that (a terminal
    emulator in a CI log, TERM tricks): no display, no rich log handler."""
    with progress.showing(True) as display:
        assert type(display) is progress.Display
        assert progress.current() is display
    for key, value in env_for(tmp_path).items():
        monkeypatch.setenv(key, value)
    CliRunner().invoke(app, mailsnap_argv(tmp_path, mail)[3:])
    assert not any(isinstance(h, RichHandler) for h in logging.getLogger().handlers)


# -- rsync's counts (snapshot backends) ---------------------------------------------------


def test_progress2_reader_takes_chunks_cut_anywhere() -> None:
    seen: list[tuple[int, int]] = []
    reader = _Progress2(lambda f, b: seen.append((f, b)))
    out = ("\r         32,768   0%    0.00kB/s    0:00:00  "
           "\r        100,000   0%    7.12MB/s    0:00:00 (xfr#1, to-chk=299/301)"
           "\r     30,000,000 100%   60.00MB/s    0:00:00 (xfr#300, to-chk=0/301)\n\n"
           "Number of files: 301 (reg: 300, dir: 1)\n")
    for i in range(0, len(out), 7):
        reader(out[i:i + 7])
    assert seen == [(2, 100_000), (301, 30_000_000)]


@pytest.mark.usefixtures("need_rsync")
def test_rsync_reports_its_counts_only_when_asked(tmp_path: Path, mail: Path) -> None:
    seen: list[tuple[int, int]] = []
    runner = Runner()
    (tmp_path / "a").mkdir()
    stats = RsyncCopier(runner, progress=lambda f, b: seen.append((f, b))).copy(
        mail, tmp_path / "a", previous=None, excludes=())
    assert "--info=progress2" in runner.history[-1].argv
    assert stats.files == 3001  # --stats is still read from the same output
    assert seen and seen[-1][1] == stats.bytes
    assert [b for _, b in seen] == sorted(b for _, b in seen)
    # Nobody watching: rsync is not asked for progress output at all.
    (tmp_path / "b").mkdir()
    RsyncCopier(runner).copy(mail, tmp_path / "b", previous=None, excludes=())
    assert "--info=progress2" not in runner.history[-1].argv


def test_runner_streams_stdout_and_survives_a_broken_callback() -> None:
    got: list[str] = []
    result = Runner().run(["sh", "-c", "printf 'a\\rb\\n'; seq 1 20000"], mutates=False,
                          on_output=got.append)
    assert "".join(got) == result.stdout
    assert result.stdout.startswith("a\rb\n1\n") and result.stdout.endswith("\n20000\n")

    def broken(chunk: str) -> None:
        raise ValueError(chunk)

    # Far more than a pipe holds: a dead reader thread would leave seq blocked forever.
    result = Runner().run(["seq", "1", "200000"], mutates=False, timeout=60, on_output=broken)
    assert result.stdout.endswith("\n200000\n")
