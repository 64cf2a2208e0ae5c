"""Prometheus textfile-collector output (``metrics_file``): one gauge per fact, labelled with the
job, for node_exporter's ``--collector.textfile.directory``.

Several jobs may name the same file. It is therefore never patched, but rebuilt each time from
the newest report of every job that names it (read from each job's state directory), and
replaced atomically by prometheus-client's ``write_to_textfile`` (temporary file + rename), so
the collector never reads half a file and one job's run never drops another job's lines.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
from pathlib import Path

from mailsnap.config import Job
from mailsnap.report import RunReport, load_reports, newest_backup_time

log = logging.getLogger(__name__)

# name, help, value of a job's facts (None: the line is left out for that job)
GAUGES = (
    ("mailsnap_last_success_timestamp_seconds",
     "Unix time the newest published backup of the job finished."),
    ("mailsnap_last_run_timestamp_seconds", "Unix time the job's last run finished."),
    ("mailsnap_last_run_success", "1 if the job's last run published a backup, else 0."),
    ("mailsnap_last_run_exit_code", "Exit code of the job's last run (0 ok, 130 interrupted)."),
    ("mailsnap_last_run_duration_seconds", "Wall time of the job's last run."),
    ("mailsnap_last_run_bytes", "Total size of the files in the last run's backup."),
    ("mailsnap_last_run_new_files", "Files copied anew (not hard-linked) by the last run."),
    ("mailsnap_last_run_messages", "Messages in the last run's backup."),
    ("mailsnap_last_run_bytes_written",
     "Bytes the last run wrote to the target (copied, not linked or reflinked)."),
    ("mailsnap_last_run_renames",
     "Messages the last run found renamed or moved and hard-linked to the previous backup."),
    ("mailsnap_last_run_pruned", "Backups the last run's retention removed."),
    ("mailsnap_last_run_snapshot_hold_seconds",
     "How long the last run's snapshot existed (snapshot creation to teardown)."),
    ("mailsnap_last_run_warnings", "Warnings the last run logged."),
)


def facts(job: Job, report: RunReport | None,
          reports: Sequence[RunReport]) -> dict[str, float | None]:
    """The gauge values of one job. Read-only."""
    success: float | None = None
    newest = newest_backup_time(job)
    if newest is not None:
        success = newest[1].timestamp()
    else:
        ok = [r for r in reports if r.status == "ok"]
        success = ok[-1].finished.timestamp() if ok else None
    if report is None:
        return {"mailsnap_last_success_timestamp_seconds": success}
    return {
        "mailsnap_last_success_timestamp_seconds": success,
        "mailsnap_last_run_timestamp_seconds": report.finished.timestamp(),
        "mailsnap_last_run_success": 1.0 if report.status == "ok" else 0.0,
        "mailsnap_last_run_exit_code": float(report.exit_code),
        "mailsnap_last_run_duration_seconds": report.seconds,
        "mailsnap_last_run_bytes": report.bytes,
        "mailsnap_last_run_new_files": report.new_files,
        "mailsnap_last_run_messages": report.messages,
        "mailsnap_last_run_bytes_written": _copy_fact(report, "bytes_written"),
        "mailsnap_last_run_renames": _copy_fact(report, "renames"),
        "mailsnap_last_run_pruned": None if report.pruned is None else float(len(report.pruned)),
        "mailsnap_last_run_snapshot_hold_seconds": report.snapshot_seconds,
        "mailsnap_last_run_warnings": float(len(report.warnings)),
    }


# name, help: per job and destination (labels job, destination)
DESTINATION_GAUGES = (
    ("mailsnap_destination_last_success_timestamp_seconds",
     "Unix time of the end of the newest run that stored a copy at this destination."),
    ("mailsnap_destination_last_run_success",
     "1 if the job's last run stored a copy there or none was due (every), 0 if it failed."),
    ("mailsnap_destination_last_run_seconds",
     "Seconds the job's last run spent on this destination."),
    ("mailsnap_destination_last_run_bytes_sent",
     "Bytes the job's last run sent to this destination (new data)."),
)


def destination_facts(reports: Sequence[RunReport]) -> dict[str, dict[str, float | None]]:
    """Per destination named in the reports: its gauge values. Read-only."""
    out: dict[str, dict[str, float | None]] = {}
    for report in reports:  # oldest first: the last one seen wins
        for d in report.destinations:
            facts = out.setdefault(d["name"], {
                "mailsnap_destination_last_success_timestamp_seconds": None})
            if d["status"] == "ok":
                facts["mailsnap_destination_last_success_timestamp_seconds"] = \
                    report.finished.timestamp()
            facts["mailsnap_destination_last_run_success"] = 0.0 if d["status"] == "failed" \
                else 1.0
            facts["mailsnap_destination_last_run_seconds"] = d.get("seconds")
            sent = d.get("bytes_sent")
            facts["mailsnap_destination_last_run_bytes_sent"] = None if sent is None \
                else float(sent)
    return out


def _copy_fact(report: RunReport, key: str) -> float | None:
    """A number from the Maildir copier's summary (None for rsync, which keeps none)."""
    copied = report.copy_summary
    return None if copied is None or key not in copied else float(copied[key])


def write_metrics(path: Path, jobs: Sequence[Job]) -> None:
    """Rebuild ``path`` from the last report of each of ``jobs`` (those that name ``path``)
    and replace it atomically. Not called in dry run."""
    # Loaded here, not at the top: `mailsnap --version` and runs without metrics skip it.
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    gauges = {name: Gauge(name, text, ["job"], registry=registry) for name, text in GAUGES}
    per_destination = {name: Gauge(name, text, ["job", "destination"], registry=registry)
                       for name, text in DESTINATION_GAUGES}
    for job in jobs:
        if job.metrics_file != path:
            continue
        reports = load_reports(job)
        for name, value in facts(job, reports[-1] if reports else None, reports).items():
            if value is not None:
                gauges[name].labels(job=job.name).set(value)
        configured = {d.name for d in job.destination}
        for destination, values in destination_facts(reports).items():
            if destination not in configured:
                continue  # removed from the config since
            for name, value in values.items():
                if value is not None:
                    per_destination[name].labels(job=job.name, destination=destination).set(
                        value)
    write_to_textfile(str(path), registry)


def update_metrics(job: Job, everyone: Sequence[Job]) -> None:
    """After a run of ``job``: rewrite its ``metrics_file`` (if it has one) for every job in
    ``everyone`` that shares it. A failure is logged, never raised."""
    if job.metrics_file is None:
        return
    try:
        write_metrics(job.metrics_file, [*everyone, *([job] if job not in everyone else [])])
    except Exception as exc:
        log.warning("metrics file %s not written: %s; the backup's result is unchanged",
                    job.metrics_file, exc)

