"""The systemd units and the cron file in examples/: systemd itself checks the units (where
``systemd-analyze`` is installed), and the directives that make mailsnap's teardown work under
systemd are pinned, so an edit cannot quietly drop them."""

from __future__ import annotations

import configparser
from pathlib import Path
import re
import shutil
import subprocess

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVICE = EXAMPLES / "systemd" / "mailsnap@.service"
TIMER = EXAMPLES / "systemd" / "mailsnap@.timer"
CRON = EXAMPLES / "cron.d" / "mailsnap"
MAILSNAP = "/usr/local/bin/mailsnap"


def _unit(path: Path) -> configparser.RawConfigParser:
    # strict=False: systemd allows a key more than once (ReadWritePaths=); the last wins here.
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _values(path: Path, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", path.read_text(), re.MULTILINE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (not a systemd system)")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit in (SERVICE, TIMER):
        text = unit.read_text()
        # verify insists that ExecStart's binary exists; mailsnap is not installed there here.
        text = text.replace(MAILSNAP, shutil.which("true") or "/bin/true")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "mailsnap@mail.service", "mailsnap@mail.timer"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "mailsnap@" in line]
    assert result.returncode == 0, result.stderr
    # An unknown or misspelt directive is only a warning ("Unknown key …, ignoring"), exit 0.
    assert ours == [], "\n".join(ours)


def test_service_runs_the_job_named_by_the_instance() -> None:
    service = _unit(SERVICE)["Service"]
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == f"{MAILSNAP} backup --config /etc/mailsnap.toml --job %i"


def test_service_lets_mailsnap_tear_down_before_its_children_die() -> None:
    service = _unit(SERVICE)["Service"]
    assert service["KillMode"] == "mixed"
    stop = service["TimeoutStopSec"]
    seconds = int(stop.removesuffix("min")) * 60 if stop.endswith("min") else int(stop)
    assert seconds >= 120  # umount alone may take 60 s on a busy mount


def test_service_hardening_keeps_the_paths_mailsnap_writes() -> None:
    service = _unit(SERVICE)["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] == "read-only"
    assert service["NoNewPrivileges"] == "yes"
    writable = " ".join(_values(SERVICE, "ReadWritePaths")).split()
    for path in ("/run/mailsnap", "-/var/lib/mailsnap", "/var/backups/mailsnap"):
        assert path in writable
    # Any of these would stop mailsnap from snapshotting or mounting.
    for key in ("User", "DynamicUser", "PrivateDevices", "ProtectKernelModules",
                "CapabilityBoundingSet", "SystemCallFilter", "PrivateMounts"):
        assert _values(SERVICE, key) == [], key


def test_timer_runs_nightly_and_catches_up() -> None:
    timer = _unit(TIMER)
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:15"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"] == "30m"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_cron_file_mails_only_errors() -> None:
    text = CRON.read_text()
    assert re.search(r"^MAILTO=", text, re.MULTILINE)
    (line,) = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and "=" not in ln]
    fields = line.split(None, 6)
    assert fields[5] == "root"  # /etc/cron.d lines name the user
    assert fields[6].startswith(f"{MAILSNAP} backup --config /etc/mailsnap.toml")
    assert "--quiet" in fields[6]
