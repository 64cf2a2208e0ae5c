"""What the CLI loads at start-up (issue #9): structural checks of ``sys.modules`` in a fresh
interpreter, not timings. ``--version`` and ``--help`` must not pay for the config models, the
pipeline, the backends or the alert and metrics libraries; a run loads what it uses."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import get_args

import pytest
from typer.testing import CliRunner

from mailsnap import __version__
from mailsnap.cli import app
from mailsnap.config import BACKEND_NAMES, Job

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
ENTRY = "from mailsnap.__main__ import main\nmain()"  # the console script's

# Heavy for a start-up; each is imported by the command that uses it.
NOT_AT_STARTUP = ("pydantic", "rich", "sh", "apprise", "prometheus_client", "mailsnap.config",
                  "mailsnap.pipeline", "mailsnap.backends", "mailsnap.copiers",
                  "mailsnap.runner", "mailsnap.report", "mailsnap.alerts", "mailsnap.metrics")


def loaded_after(code: str, *argv: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` with ``sys.argv[1:]`` =
    ``argv``; a ``SystemExit`` from the CLI ends ``code`` as it would end the command."""
    # Printed by an atexit handler: the console script ends in os._exit after running them.
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print('\\n' + json.dumps(sorted(sys.modules))))\n"
             f"sys.argv[1:] = {list(argv)!r}\ntry:\n"
             + "".join(f"    {line}\n" for line in code.splitlines())
             + "except SystemExit:\n    pass\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env=env).stdout
    return set(json.loads(out.splitlines()[-1]))


def among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (or a submodule of one) is in ``modules``."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


def test_version_is_answered_before_typer_loads() -> None:
    modules = loaded_after(ENTRY, "--version")
    assert among(modules, ("typer", "click", "mailsnap.cli.app", *NOT_AT_STARTUP)) == []


def test_version_prints_what_the_option_prints() -> None:
    fast = subprocess.run([sys.executable, "-m", "mailsnap", "--version"], capture_output=True,
                          text=True, check=True)
    # The typer option answers when --version comes with other arguments.
    option = subprocess.run([sys.executable, "-m", "mailsnap", "--version", "--help"],
                            capture_output=True, text=True, check=True)
    assert fast.stdout == option.stdout == CliRunner().invoke(app, ["--version"]).stdout
    assert fast.stdout == f"mailsnap {__version__}\n"


def test_importing_the_cli_loads_no_command_s_dependencies() -> None:
    modules = loaded_after("from mailsnap.cli import app")
    assert "mailsnap.cli.backup" in modules  # the commands are registered
    assert among(modules, NOT_AT_STARTUP) == []


@pytest.mark.parametrize("argv", [["--help"], ["backup", "--help"], ["status", "--help"]])
def test_help_loads_no_command_s_dependencies(argv: list[str]) -> None:
    modules = loaded_after(ENTRY, *argv)
    # typer formats help with rich (and coerces parameters with pydantic) on its own account.
    assert among(modules, tuple(m for m in NOT_AT_STARTUP if m not in ("rich", "pydantic"))) == []


def test_a_backup_without_a_terminal_loads_neither_rich_nor_alerting_libraries(
    tmp_path: Path,
) -> None:
    source = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, source)
    env = {**os.environ, "MAILSNAP_RUN_DIR": str(tmp_path / "run"),
           "MAILSNAP_STATE_DIR": str(tmp_path / "state")}
    modules = loaded_after(ENTRY, "backup", "--source", str(source), "--target",
                           str(tmp_path / "backups"), "--backend", "live", "--json", env=env)
    assert (tmp_path / "backups" / "mail").is_dir()  # it ran
    assert "mailsnap.pipeline" in modules
    assert among(modules, ("rich", "apprise", "prometheus_client", "urllib.request")) == []
    # A live backup loads its own backend and walk, not the snapshot backends, the snapshot
    # walk or the rsync copier.
    assert "mailsnap.backends.live" in modules and "mailsnap.copiers.live" in modules
    assert among(modules, ("mailsnap.backends.btrfs", "mailsnap.backends.lvm",
                           "mailsnap.backends.zfs", "mailsnap.copiers.frozen",
                           "mailsnap.copiers.rsync")) == []


def test_a_backend_or_copier_module_is_imported_when_first_used() -> None:
    lazy = ("mailsnap.backends.btrfs", "mailsnap.backends.live", "mailsnap.backends.lvm",
            "mailsnap.backends.zfs", "mailsnap.copiers.frozen", "mailsnap.copiers.live",
            "mailsnap.copiers.maildir", "mailsnap.copiers.rsync")
    imported = "from mailsnap import backends, copiers"
    assert among(loaded_after(imported), lazy) == []
    used = loaded_after(imported + "\n"
                        "assert backends.BACKENDS['lvm'].__name__ == 'LvmBackend'\n"
                        "assert copiers.RsyncCopier.__name__ == 'RsyncCopier'\n"
                        "from mailsnap.copiers import maildir\n"
                        "assert maildir.vanished_is_abnormal(0, 1) is False")
    assert among(used, lazy) == ["mailsnap.backends.lvm", "mailsnap.copiers.live",
                                 "mailsnap.copiers.maildir", "mailsnap.copiers.rsync"]


def test_backend_names_are_the_job_models_tags() -> None:
    """``mailsnap.constants`` names the backends for the CLI's help without loading the models;
    it must name exactly the models' ``backend`` tags."""
    (union, _) = get_args(Job)
    tags = {get_args(model.model_fields["backend"].annotation)[0] for model in get_args(union)}
    assert sorted(BACKEND_NAMES) == sorted(tags)


def _exit_probe(body: str) -> subprocess.CompletedProcess[str]:
    code = ("import atexit, sys, threading, time\n"
            "from mailsnap.__main__ import exit_without_teardown\n" + body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)


def test_the_fast_exit_runs_atexit_handlers_flushes_and_keeps_the_code() -> None:
    done = _exit_probe("atexit.register(lambda: print('atexit ran'))\n"
                       "sys.stdout.write('buffered ')\nsys.stderr.write('err')\n"
                       "exit_without_teardown(4)\n")
    assert (done.returncode, done.stdout, done.stderr) == (4, "buffered atexit ran\n", "err")
    assert _exit_probe("exit_without_teardown(None)").returncode == 0
    assert _exit_probe("exit_without_teardown(130)").returncode == 130


def test_the_fast_exit_waits_for_a_running_thread_as_the_normal_exit_does() -> None:
    done = _exit_probe("threading.Thread(target=lambda: (time.sleep(0.5), print('joined')))"
                       ".start()\nexit_without_teardown(3)\n")
    assert (done.returncode, done.stdout) == (3, "joined\n")


def test_the_fast_exit_leaves_a_profiled_run_to_python(tmp_path: Path) -> None:
    stats, script = tmp_path / "run.prof", tmp_path / "run.py"
    script.write_text("from mailsnap.__main__ import exit_without_teardown\n"
                      "exit_without_teardown(0)\n")
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), str(script)],
                          check=False)
    assert done.returncode == 0 and stats.stat().st_size > 0


def test_the_fast_exit_leaves_a_text_code_to_python() -> None:
    done = _exit_probe("exit_without_teardown('mailsnap: bye')\n")
    assert (done.returncode, done.stderr) == (1, "mailsnap: bye\n")


def test_the_console_script_exits_with_the_command_s_code(tmp_path: Path) -> None:
    """Usage error 2 and config error 2 (click's and ours) survive the fast exit."""
    for argv in (["backup", "--bogus"], ["backup", "--config", str(tmp_path / "none.toml")]):
        done = subprocess.run([sys.executable, "-c", ENTRY, *argv], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 2, done.stderr
