"""The LVM/ZFS tier: boots the throw-away qemu guest (scripts/vm/run-tests) and requires that
every guest test (tests/vm/guest) passed there.

This machine's kernel may have neither device-mapper nor ZFS, so real LVM and ZFS volumes only
exist inside the guest. The first run builds the guest image (minutes, cached afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

RUN_TESTS = Path(__file__).resolve().parents[2] / "scripts" / "vm" / "run-tests"


def _skip_reason() -> str | None:
    if os.environ.get("MAILSNAP_IN_GUEST") == "1":
        return "already inside the guest"
    if os.geteuid() != 0:
        return "needs root to build and boot the LVM/ZFS guest VM (CI runs as root)"
    if shutil.which("qemu-system-x86_64") is None and shutil.which("apt-get") is None:
        return "qemu-system-x86_64 is not installed and there is no apt-get to install it"
    return None


def _counts(junit: Path) -> dict[str, int]:
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, "0"))
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return totals


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.vm
def test_lvm_and_zfs_guest_tests_pass(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, MAILSNAP_VM_OUT=str(tmp_path))
    env.pop("MAILSNAP_IN_GUEST", None)
    # Software emulation is slow and its speed varies a lot between machines of one kind:
    # the suite took 6 minutes on one and 27 on another. Room for twice that.
    env.setdefault("MAILSNAP_VM_TIMEOUT", "3300")
    proc = subprocess.run([sys.executable, str(RUN_TESTS), "-q", "-rfEs"], env=env,
                          capture_output=True, text=True, timeout=3500)
    junit = tmp_path / "junit.xml"
    assert junit.exists(), (
        f"the guest never reported (run-tests exit {proc.returncode}); console log "
        f"{tmp_path / 'console.log'}:\n{proc.stderr[-4000:]}"
    )
    counts = _counts(junit)
    for key, value in counts.items():
        record_property(f"guest_{key}", value)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"\nguest tests: {summary}")
    assert proc.returncode == 0, f"guest tests failed ({summary}):\n{proc.stdout[-6000:]}"
    assert counts["tests"] > 0 and counts["skipped"] == 0, f"guest tests: {summary}"
