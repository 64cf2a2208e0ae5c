"""Telling someone how a run went: alerts (``notify``) and healthchecks.io-style pings
(``healthcheck_url``).

An alert that cannot be sent is logged as a warning and nothing more: it never fails the backup
or changes its exit code (the backup's own result is what the exit code reports).

``notify`` holds apprise URLs: ``mailto://``/``mailtos://`` send through an SMTP server, and any
other service apprise knows (``ntfy://``, ``matrix://`` …) works the same way. Apprise has no
local-sendmail service, so ``sendmail://admin@example.org[?to=other@example.org&from=…]`` is
mailsnap's own: it hands the message to ``sendmail -t -oi`` through the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.message import EmailMessage
import logging
import time
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from mailsnap import __version__
from mailsnap.config import Job
from mailsnap.errors import MailsnapError
from mailsnap.report import RunReport
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

PING_TIMEOUT = 10.0
PING_ATTEMPTS = 3
# Seconds before the 2nd, 3rd … attempt: enough for a blip, short enough for a nightly run.
PING_BACKOFF = 1.0
SENDMAIL_TIMEOUT = 60.0


def redact(url: str) -> str:
    """``url`` without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# -- healthchecks.io-style pings -------------------------------------------------------------


def ping(url: str, body: str | None = None) -> bool:
    """GET ``url`` (POST ``body`` when given), retried; True when it answered 2xx. A failure is
    logged, never raised. Not called in dry run."""
    # Here, not at the top: only a job with a healthcheck_url loads the HTTP client.
    from urllib.error import URLError
    import urllib.request

    data = body.encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method="POST" if data is not None else "GET",
        headers={"User-Agent": f"mailsnap/{__version__}"},
    )
    problem = ""
    for attempt in range(PING_ATTEMPTS):
        if attempt:
            time.sleep(PING_BACKOFF * attempt)
        try:
            with urllib.request.urlopen(request, timeout=PING_TIMEOUT) as answer:
                answer.read()
            return True
        except (URLError, OSError, ValueError) as exc:
            problem = str(getattr(exc, "reason", exc))
    log.warning("healthcheck ping %s failed after %d attempts (%s); the backup's result is "
                "unchanged", redact(url), PING_ATTEMPTS, problem)
    return False


def ping_start(job: Job) -> None:
    if job.healthcheck_url:
        ping(f"{job.healthcheck_url}/start")


def ping_end(job: Job, report: RunReport, tail: Sequence[str]) -> None:
    if not job.healthcheck_url:
        return
    if report.status == "ok":
        ping(job.healthcheck_url)
    else:
        ping(f"{job.healthcheck_url}/fail", body="\n".join([f"{report.error}", "", *tail]))


# -- alerts ----------------------------------------------------------------------------------


def should_notify(job: Job, report: RunReport) -> bool:
    return bool(job.notify) and (report.status != "ok" or job.notify_on == "always")


def message(report: RunReport, tail: Sequence[str]) -> tuple[str, str]:
    """The alert's title and body: the result first, then the numbers, then the log tail."""
    word = {"ok": "OK", "failed": "FAILED", "interrupted": "INTERRUPTED"}.get(
        report.status, report.status)
    title = f"mailsnap: backup of {report.job} {word} on {report.host}"
    lines = [f"job:        {report.job}", f"status:     {report.status} (exit {report.exit_code})"]
    if report.error:
        lines.append(f"error:      {report.error}")
    lines += [f"started:    {report.started.isoformat()}",
              f"finished:   {report.finished.isoformat()} ({report.seconds:.1f}s)"]
    if report.backup:
        lines.append(f"backup:     {report.backup}")
    if report.files is not None:
        lines.append(f"files:      {report.files} ({report.bytes} bytes, {report.linked} "
                     f"unchanged), {report.messages} messages")
    if report.snapshot_seconds is not None:
        lines.append(f"snapshot held {report.snapshot_seconds:.1f}s")
    if report.warnings:
        lines.append(f"warnings:   {len(report.warnings)}")
        lines += [f"  {w}" for w in report.warnings[:20]]
    if tail:
        lines += ["", "Last log lines:", *tail]
    return title, "\n".join(lines) + "\n"


def send_alerts(job: Job, report: RunReport, tail: Sequence[str], runner: Runner) -> None:
    """Send the run's alert to every ``notify`` URL when ``notify_on`` asks for it. Each URL
    that fails is logged; none raises. Not called in dry run."""
    if not should_notify(job, report):
        return
    title, body = message(report, tail)
    for url in job.notify:
        try:
            if urlsplit(url).scheme == "sendmail":
                sendmail(url, title, body, runner)
            else:
                _apprise(url, title, body)
        except Exception as exc:
            log.warning("alert to %s not sent: %s; the backup's result is unchanged",
                        redact(url), exc)


def _apprise(url: str, title: str, body: str) -> None:
    import apprise  # here, not at the top: only a run that alerts pays for loading it

    sender = apprise.Apprise()
    if not sender.add(url):
        raise MailsnapError("apprise does not understand this URL (see its wiki for the syntax)")
    # Plain text in, so that a mail keeps the log tail's line breaks.
    if not sender.notify(title=title, body=body, body_format=apprise.NotifyFormat.TEXT):
        raise MailsnapError("apprise could not deliver it (its log lines above say why)")
    log.info("alert sent to %s", redact(url))


def sendmail(url: str, title: str, body: str, runner: Runner) -> None:
    """``sendmail://admin@example.org?to=b@example.org&from=backup@example.org``: the mail
    goes to ``sendmail -t -oi`` (recipients from the headers; a lone '.' line is not the end).
    Dry run: the runner only prints the command."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    recipients = [unquote(parts.netloc)] if parts.netloc else []
    recipients += [r for value in query.get("to", []) for r in value.split(",") if r]
    if not recipients:
        raise MailsnapError("no recipient; write sendmail://admin@example.org")
    mail = EmailMessage()
    mail["To"] = ", ".join(recipients)
    if query.get("from"):
        mail["From"] = query["from"][0]
    mail["Subject"] = title
    mail.set_content(body)
    runner.run(["sendmail", "-t", "-oi"], mutates=True, timeout=SENDMAIL_TIMEOUT,
               stdin=mail.as_string(), hint="is a mail transfer agent installed?")
    log.info("alert sent to %s", redact(url))
