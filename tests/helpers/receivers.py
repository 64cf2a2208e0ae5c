"""Local receivers for alert tests, on real sockets on 127.0.0.1: a tiny SMTP sink and an HTTP
server that records every request. Both run in a thread and stop when their block ends.

The SMTP sink speaks just enough SMTP for a client: HELO/EHLO (no STARTTLS, no AUTH offered),
MAIL, RCPT, DATA (with dot-unstuffing), RSET, NOOP, QUIT.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import socket
import socketserver
import threading


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    data: str


@dataclass
class SmtpSink:
    port: int
    mails: list[Mail] = field(default_factory=list)


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: _SmtpServer

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.reply("220 localhost mailsnap-test-sink ESMTP")
        sender, recipients = "", []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb == "EHLO":
                self.reply("250-localhost")
                self.reply("250 8BITMIME")
            elif verb == "HELO":
                self.reply("250 localhost")
            elif verb == "MAIL":
                sender, recipients = line.split(":", 1)[1].strip(), []
                self.reply("250 OK")
            elif verb == "RCPT":
                recipients.append(line.split(":", 1)[1].strip())
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                lines = []
                while True:
                    body = self.rfile.readline()
                    if not body or body in (b".\r\n", b".\n"):
                        break
                    text = body.decode("utf-8", "replace")
                    lines.append(text[1:] if text.startswith("..") else text)
                self.server.sink.mails.append(Mail(sender, recipients, "".join(lines)))
                self.reply("250 OK queued")
            elif verb in ("RSET", "NOOP"):
                self.reply("250 OK")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")


class _SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: SmtpSink


@contextlib.contextmanager
def smtp_sink() -> Iterator[SmtpSink]:
    """An SMTP server on 127.0.0.1 (ephemeral port) keeping every mail it receives."""
    server = _SmtpServer(("127.0.0.1", 0), _SmtpHandler)
    server.sink = SmtpSink(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.sink
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Request:
    method: str
    path: str
    body: str


@dataclass
class HttpRecorder:
    port: int
    requests: list[Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self.server.recorder.requests.append(Request(self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_GET = do_POST = do_HEAD = _record

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    recorder: HttpRecorder


@contextlib.contextmanager
def http_recorder() -> Iterator[HttpRecorder]:
    """An HTTP server on 127.0.0.1 (ephemeral port) answering 200 and recording each request."""
    server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
    server.recorder = HttpRecorder(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.recorder
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
