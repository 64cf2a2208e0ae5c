"""Run reports, `mailsnap status`, Prometheus metrics and alerts, end to end through the CLI.

Alerts go to real receivers on 127.0.0.1 (an SMTP sink and an HTTP server, tests/helpers/
receivers.py) and, for `sendmail://`, to a real `sendmail` executable put first on PATH.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
import email
import json
import os
from pathlib import Path
import re
import shutil
import stat
import subprocess
import sys
import tomllib

from prometheus_client.parser import text_string_to_metric_families
import pytest
from typer.testing import CliRunner

from mailsnap import alerts
from mailsnap.cli import app
from mailsnap.cli.status import ago, assess
from mailsnap.config import load_config, parse_config
from mailsnap.errors import ConfigError
from mailsnap.pipeline import utc_now
from mailsnap.report import RunReport, load_reports
from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.receivers import HttpRecorder, SmtpSink, closed_port, http_recorder, smtp_sink

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"


class Env:
    """A live-backend job "mail" over a copy of examples/Maildir; ``write(**keys)`` rewrites
    the config with extra job keys (TOML values as Python literals)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.source = tmp / "Maildir"
        shutil.copytree(EXAMPLE, self.source)
        self.target = tmp / "backups"
        self.state = tmp / "state"
        self.config = tmp / "mailsnap.toml"
        self.write()

    def write(self, jobs: dict[str, dict[str, object]] | None = None, **keys: object) -> None:
        jobs = jobs or {"mail": keys}
        text = ""
        for name, extra in jobs.items():
            text += (f'[[job]]\nname = "{name}"\nsource = "{self.source}"\n'
                     f'target = "{self.target}"\nbackend = "live"\n'
                     f'state_dir = "{self.state}"\n')
            for key, value in extra.items():
                text += f"{key} = {json.dumps(value)}\n"
        self.config.write_text(text)

    def break_source(self) -> None:
        """Make the source something mailsnap refuses: a directory with no Maildir in it."""
        shutil.rmtree(self.source)
        self.source.mkdir()
        (self.source / "notes.txt").write_text("not mail\n")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    # A dead receiver costs (attempts - 1) backoffs per ping; the retries still happen.
    monkeypatch.setattr(alerts, "PING_BACKOFF", 0.05)
    return Env(tmp_path)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with smtp_sink() as receiver:
        yield receiver


@pytest.fixture
def http() -> Iterator[HttpRecorder]:
    with http_recorder() as receiver:
        yield receiver


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def mailto(sink: SmtpSink) -> str:
    return f"mailto://127.0.0.1:{sink.port}?from=mailsnap@localhost&to=admin@example.org"


def text_of(raw: str) -> str:
    message = email.message_from_string(raw)
    parts = [p for p in message.walk() if p.get_content_type() == "text/plain"]
    payload = parts[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return str(message["Subject"]) + "\n" + payload.decode()


# -- run reports ---------------------------------------------------------------------------


def test_every_run_keeps_a_private_report_and_only_the_last_n(env: Env) -> None:
    env.write(keep_reports=2)
    for _ in range(3):
        code, _, err = invoke("backup", "--config", env.config)
        assert code == 0, err
    directory = env.state / "mail"
    files = sorted(directory.glob("run-*.json"))
    assert len(files) == 2
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not list(directory.glob(".run-*"))  # no temporary file left
    report = RunReport.model_validate(json.loads(files[-1].read_text()))
    assert report.schema_version == 1 and report.status == "ok" and report.exit_code == 0
    assert report.files and report.messages and report.linked is not None
    assert report.new_files == report.files - report.linked
    names = [s.name for s in report.stages]
    assert names[0] == "check source" and "publish" in names
    assert any(n.startswith("copy (") for n in names) and all(s.ok for s in report.stages)
    assert report.backup and Path(report.backup).is_dir()
    assert report.snapshot_seconds is None  # a live copy has no snapshot
    assert any("live copy of" in w for w in report.warnings)  # its WARNING line
    assert report.started <= report.finished


def test_backup_json_entries_are_the_run_reports(env: Env) -> None:
    code, out, _ = invoke("backup", "--config", env.config, "--json")
    assert code == 0
    (entry,) = json.loads(out)["jobs"]
    (kept,) = load_reports(load_config(env.config).job[0])
    assert RunReport.model_validate(entry) == kept


def test_failed_run_report_names_the_error_and_the_failed_stage(env: Env) -> None:
    env.break_source()
    code, out, _ = invoke("backup", "--config", env.config, "--json")
    assert code == 1
    (entry,) = json.loads(out)["jobs"]
    (kept,) = load_reports(load_config(env.config).job[0])
    assert entry == kept.as_dict()
    assert kept.status == "failed" and kept.exit_code == 1 and kept.error
    assert kept.stages[-1].name == "check source" and not kept.stages[-1].ok
    assert kept.files is None and kept.backup is None


def test_dry_run_leaves_no_report(env: Env) -> None:
    code, _, _ = invoke("backup", "--config", env.config, "--dry-run")
    assert code == 0
    assert not (env.state / "mail").exists()


@pytest.mark.privileged
def test_snapshot_hold_time_covers_the_copy(btrfs: BtrfsVolume, tmp_path: Path,
                                            need_rsync: None) -> None:
    source = btrfs.mail / "Maildir"
    shutil.copytree(EXAMPLE, source)
    code, out, err = invoke("backup", "--source", source, "--target", tmp_path / "backups",
                            "--backend", "btrfs", "--json")
    assert code == 0, err
    report = RunReport.model_validate(json.loads(out)["jobs"][0])
    copy = sum(s.seconds for s in report.stages if s.name.startswith(("copy", "mount")))
    assert report.snapshot_seconds is not None
    assert copy <= report.snapshot_seconds <= report.seconds


# -- status --------------------------------------------------------------------------------


def test_status_warns_without_a_backup_then_is_ok(env: Env) -> None:
    code, out, _ = invoke("status", "--config", env.config)
    assert code == 1
    assert out.startswith("MAILSNAP WARNING - mail: no backup yet")
    assert invoke("backup", "--config", env.config)[0] == 0
    code, out, _ = invoke("status", "--config", env.config)
    assert code == 0, out
    assert out.startswith("MAILSNAP OK - mail: newest backup ") and "| age=" in out
    assert len(out.splitlines()) == 1


def test_status_of_a_one_off_job_from_source_and_target(env: Env) -> None:
    # A cron line `backup --source S --target T` is checked with the same two flags.
    flags = ("--source", env.source, "--target", env.tmp / "oneoff")
    code, out, _ = invoke("status", *flags)
    assert code == 1 and out.startswith("MAILSNAP WARNING - mail: no backup yet")
    empty = env.tmp / "empty"
    empty.mkdir()
    assert invoke("backup", "--source", empty, "--target", env.tmp / "oneoff")[0] == 1
    code, out, _ = invoke("status", *flags)
    assert code == 1 and out.count("not a Maildir") == 1, out  # the error, said once
    assert invoke("backup", *flags, "--backend", "live")[0] == 0
    code, out, _ = invoke("status", *flags)
    assert code == 0 and "last run ok" in out, out


def test_status_warns_when_the_newest_backup_is_older_than_max_age(env: Env) -> None:
    env.write(max_age="90m")
    assert invoke("backup", "--config", env.config)[0] == 0
    job = load_config(env.config).job[0]
    assert assess(job, utc_now() + timedelta(minutes=89)).ok
    late = assess(job, utc_now() + timedelta(minutes=91))
    assert not late.ok and "older than max_age 1h30m" in late.problems[0]


def test_status_warns_after_a_failed_run_until_a_backup_succeeds(env: Env) -> None:
    assert invoke("backup", "--config", env.config)[0] == 0
    good = env.tmp / "good"
    shutil.copytree(env.source, good)
    env.break_source()
    assert invoke("backup", "--config", env.config)[0] == 1
    code, out, _ = invoke("status", "--config", env.config, "--json")
    assert code == 1
    (state,) = json.loads(out)["jobs"]
    assert state["state"] == "warning" and state["last_run"]["status"] == "failed"
    assert state["problems"] == [f"last run failed: {state['last_run']['error']}"]
    shutil.rmtree(env.source)
    shutil.copytree(good, env.source)
    assert invoke("backup", "--config", env.config)[0] == 0
    assert invoke("status", "--config", env.config)[0] == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("26h", timedelta(hours=26)), ("90m", timedelta(minutes=90)), ("2d", timedelta(days=2)),
    ("45s", timedelta(seconds=45)), ("1.5h", timedelta(minutes=90)),
])
def test_max_age_accepts_hours_minutes_days(text: str, expected: timedelta) -> None:
    data = {"job": [{"name": "m", "source": "/srv/mail", "target": "/b", "backend": "live",
                     "max_age": text}]}
    assert parse_config(data).job[0].max_age == expected


@pytest.mark.parametrize(("key", "value"), [
    ("max_age", "26 hours"), ("max_age", "0h"), ("notify", ["admin@example.org"]),
    ("notify_on", "sometimes"), ("healthcheck_url", "ftp://x"), ("keep_reports", 0),
    ("metrics_file", "relative.prom"),
])
def test_bad_monitoring_keys_are_refused(key: str, value: object) -> None:
    data = {"job": [{"name": "m", "source": "/srv/mail", "target": "/b", "backend": "live",
                     key: value}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert f"job[0].{key}" in str(caught.value.lines)


# -- metrics -------------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["job"]): s.value
            for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def test_jobs_sharing_a_metrics_file_keep_each_others_lines(env: Env) -> None:
    prom = env.tmp / "textfile" / "mailsnap.prom"
    prom.parent.mkdir()
    env.write(jobs={"a": {"metrics_file": str(prom)}, "b": {"metrics_file": str(prom)}})
    assert invoke("backup", "--config", env.config, "--job", "a")[0] == 0
    assert invoke("backup", "--config", env.config, "--job", "b")[0] == 0
    metrics = read_metrics(prom)
    for job in ("a", "b"):
        assert metrics[("mailsnap_last_run_success", job)] == 1
        assert metrics[("mailsnap_last_run_messages", job)] > 0
        assert metrics[("mailsnap_last_run_bytes", job)] > 0
        # The first backup of each job copies everything: what it wrote is what it holds.
        assert metrics[("mailsnap_last_run_bytes_written", job)] == metrics[
            ("mailsnap_last_run_bytes", job)]
        assert metrics[("mailsnap_last_run_renames", job)] == 0
        assert metrics[("mailsnap_last_run_duration_seconds", job)] > 0
        assert metrics[("mailsnap_last_success_timestamp_seconds", job)] <= utc_now().timestamp()
    env.break_source()
    assert invoke("backup", "--config", env.config, "--job", "a")[0] == 1
    metrics = read_metrics(prom)
    assert metrics[("mailsnap_last_run_success", "a")] == 0
    assert metrics[("mailsnap_last_run_exit_code", "a")] == 1
    assert ("mailsnap_last_run_messages", "a") not in metrics  # unknown for a failed run
    assert metrics[("mailsnap_last_success_timestamp_seconds", "a")] > 0  # its last good one
    assert metrics[("mailsnap_last_run_success", "b")] == 1  # b's lines survived a's run
    assert [p.name for p in prom.parent.iterdir()] == ["mailsnap.prom"]


def test_unwritable_metrics_file_does_not_fail_the_backup(env: Env) -> None:
    env.write(metrics_file=str(env.tmp / "no such dir" / "m.prom"))
    code, _, err = invoke("backup", "--config", env.config)
    assert code == 0
    assert "metrics file" in err and "not written" in err


def test_version_does_not_load_the_alert_and_metrics_libraries() -> None:
    probe = ("import sys; from mailsnap.cli import app; "
             "print(sorted(m for m in ('apprise', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- alerts --------------------------------------------------------------------------------


def test_failed_backup_mails_once_and_pings_fail_with_the_log_tail(
    env: Env, sink: SmtpSink, http: HttpRecorder
) -> None:
    env.write(notify=[mailto(sink)], healthcheck_url=f"{http.url}/ping/abc")
    env.break_source()
    code, _, _ = invoke("backup", "--config", env.config)
    assert code == 1
    (mail,) = sink.mails
    text = text_of(mail.data)
    (report,) = load_reports(load_config(env.config).job[0])
    assert report.error and report.error in text
    assert "backup of mail FAILED" in text and "job:        mail" in text
    assert "Last log lines:" in text
    assert [(r.method, r.path) for r in http.requests] == [("GET", "/ping/abc/start"),
                                                           ("POST", "/ping/abc/fail")]
    body = http.requests[1].body
    assert body.startswith(str(report.error))
    assert "ERROR job mail failed:" in body  # a line of the log tail


def test_successful_backup_pings_start_then_success_and_sends_no_mail(
    env: Env, sink: SmtpSink, http: HttpRecorder
) -> None:
    env.write(notify=[mailto(sink)], healthcheck_url=f"{http.url}/ping/abc/")
    assert invoke("backup", "--config", env.config)[0] == 0
    assert [(r.method, r.path) for r in http.requests] == [("GET", "/ping/abc/start"),
                                                           ("GET", "/ping/abc")]
    assert sink.mails == []


def test_notify_on_always_mails_a_success(env: Env, sink: SmtpSink) -> None:
    env.write(notify=[mailto(sink)], notify_on="always")
    assert invoke("backup", "--config", env.config)[0] == 0
    (mail,) = sink.mails
    assert "backup of mail OK" in text_of(mail.data)


@pytest.mark.parametrize("fail", [False, True])
def test_unreachable_alert_targets_are_logged_and_change_no_exit_code(
    env: Env, fail: bool
) -> None:
    dead = closed_port()
    env.write(notify=[f"mailto://127.0.0.1:{dead}?from=m@localhost&to=a@example.org"],
              notify_on="always", healthcheck_url=f"http://127.0.0.1:{dead}/ping")
    if fail:
        env.break_source()
    code, _, err = invoke("backup", "--config", env.config)
    assert code == (1 if fail else 0)
    assert f"alert to mailto://127.0.0.1:{dead}" in err and "not sent" in err
    assert err.count(f"healthcheck ping http://127.0.0.1:{dead}/ping") == 2  # start and end
    assert "failed after 3 attempts" in err


@pytest.fixture
def fake_sendmail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real `sendmail` executable first on PATH that keeps its argv and the mail it got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "sendmail.out"
    script = bin_dir / "sendmail"
    script.write_text(f'#!/bin/sh\necho "argv: $*" > "{out}"\ncat >> "{out}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return out


def test_sendmail_url_hands_the_mail_to_local_sendmail(env: Env, fake_sendmail: Path) -> None:
    env.write(notify=["sendmail://admin@example.org?to=ops@example.org&from=backup@example.org"])
    env.break_source()
    assert invoke("backup", "--config", env.config)[0] == 1
    argv, _, raw = fake_sendmail.read_text().partition("\n")
    assert argv == "argv: -t -oi"
    message = email.message_from_string(raw)
    assert message["To"] == "admin@example.org, ops@example.org"
    assert message["From"] == "backup@example.org"
    assert "backup of mail FAILED" in str(message["Subject"])
    assert "Last log lines:" in message.get_payload()


def test_the_commented_monitoring_keys_in_the_example_are_valid() -> None:
    text = (Path(__file__).parent.parent / "examples" / "mailsnap.toml").read_text()
    keys = r"(max_age|metrics_file|notify|notify_on|healthcheck_url) ="
    enabled = re.sub(rf"^# {keys}", r"\1 =", text, flags=re.MULTILINE)
    assert enabled != text
    job = parse_config(tomllib.loads(enabled)).job[0]
    assert job.max_age == timedelta(hours=26) and len(job.notify) == 2
    assert job.metrics_file and job.healthcheck_url


@pytest.mark.parametrize(("delta", "text"), [
    (timedelta(seconds=42), "42s"), (timedelta(minutes=90), "1h30m"),
    (timedelta(hours=26), "26h"), (timedelta(hours=71, minutes=59), "71h59m"),
    (timedelta(days=4, hours=1), "4d1h"), (timedelta(days=7), "7d"),
])
def test_ages_read_like_max_age(delta: timedelta, text: str) -> None:
    assert ago(delta) == text
