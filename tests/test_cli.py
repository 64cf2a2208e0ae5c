"""Every command end to end through the CLI, with the documented exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mailsnap.cli import app
from mailsnap.store import BackupStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    source = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, source)
    config = tmp_path / "mailsnap.toml"
    config.write_text(
        f'[[job]]\nname = "mail"\nsource = "{source}"\ntarget = "{tmp_path / "backups"}"\n'
        'backend = "live"\n'
    )
    return {"source": source, "target": tmp_path / "backups", "config": config,
            "tmp": tmp_path}


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_backup_from_flags_json(env: dict[str, Path]) -> None:
    code, out, _ = invoke("backup", "--source", env["source"], "--target", env["target"],
                          "--backend", "live", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["status"] == "ok" and report["exit_code"] == 0
    (job,) = report["jobs"]
    assert job["job"] == "mail" and job["point_in_time"] is False
    assert Path(job["backup"], "mailsnap.json").is_file()


def test_backup_from_config_human_output(env: dict[str, Path]) -> None:
    code, out, err = invoke("backup", "--config", env["config"])
    assert code == 0
    assert "✓ mail:" in out and "live copy (not point-in-time)" in out
    assert "live copy of" in err  # the log says it is not a snapshot


def test_backup_dry_run_prints_and_changes_nothing(env: dict[str, Path]) -> None:
    code, out, _ = invoke("backup", "--config", env["config"], "--dry-run")
    assert code == 0 and "nothing was changed" in out
    assert not env["target"].exists()


def test_list(env: dict[str, Path]) -> None:
    invoke("backup", "--config", env["config"])
    code, out, _ = invoke("list", "--config", env["config"], "--json")
    assert code == 0
    (row,) = json.loads(out)["backups"]
    assert row["job"] == "mail" and row["backend"] == "live" and row["files"] > 0
    code, out, _ = invoke("list", "--target", env["target"])
    assert code == 0 and row["run_id"] in out


def test_check_passes_for_a_good_job(env: dict[str, Path]) -> None:
    code, out, _ = invoke("check", "--config", env["config"], "--json")
    assert code == 0, out
    checks = {c["check"]: c["ok"] for c in json.loads(out)["checks"]}
    assert checks == {"config": True, "retention": True, "source": True, "maildir": True,
                      "target": True, "backend": True, "backups": True, "tools": True,
                      "privileges": True}


def test_check_fails_for_a_missing_source(env: dict[str, Path]) -> None:
    code, out, _ = invoke("check", "--source", env["tmp"] / "nope", "--target", env["target"],
                          "--json")
    assert code == 1
    assert {"job": "mail", "check": "source", "ok": False,
            "detail": f"{env['tmp'] / 'nope'}: not a directory"} in json.loads(out)["checks"]


def test_snapshot_exec_sees_the_source(env: dict[str, Path]) -> None:
    seen = env["tmp"] / "seen"
    code, _, _ = invoke("snapshot", "--config", env["config"], "--exec",
                        f"sh -c 'ls \"$MAILSNAP_SNAPSHOT\" > \"{seen}\"'")
    assert code == 0
    assert "cur" in seen.read_text().split()


def test_snapshot_after_double_dash_and_failure_exit(env: dict[str, Path]) -> None:
    code, _, err = invoke("snapshot", "--config", env["config"], "--", "sh", "-c", "exit 3")
    assert code == 1 and "exited 3" in err


def test_config_error_exits_2_with_one_line_per_field(env: dict[str, Path]) -> None:
    bad = env["tmp"] / "bad.toml"
    bad.write_text('[[job]]\nname = "a b"\nsource = "rel"\ntarget = "/x"\nbackend = "live"\n')
    code, _, err = invoke("backup", "--config", bad)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("mailsnap: error:")]
    assert len(lines) == 2
    assert any("job[0].name" in line for line in lines)
    assert any("job[0].source: must be an absolute path" in line for line in lines)


def test_missing_config_exits_2(env: dict[str, Path]) -> None:
    code, _, err = invoke("backup", "--config", env["tmp"] / "none.toml")
    assert code == 2 and "--source DIR --target DIR" in err


def test_source_without_target_exits_2(env: dict[str, Path]) -> None:
    code, _, err = invoke("backup", "--source", env["source"])
    assert code == 2 and "--source and --target go together" in err


def test_locked_job_exits_3(env: dict[str, Path]) -> None:
    with BackupStore(env["target"] / "mail").locked():
        code, out, err = invoke("backup", "--config", env["config"], "--json")
    assert code == 3 and "already running" in err
    assert json.loads(out)["jobs"][0]["exit_code"] == 3


def test_python_dash_m_entry_point(env: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailsnap", "backup", "--source", str(env["source"]),
         "--target", str(env["target"]), "--json"],
        capture_output=True, text=True, env=dict(os.environ), check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"
    assert "auto:" in result.stderr  # auto picked the backend and said why


def test_unknown_option_exits_2() -> None:
    code, _, err = invoke("backup", "--no-such-option")
    assert code == 2 and "No such option" in err
