"""A real OpenSSH server on 127.0.0.1 for the SSH and SFTP destination tests.

Everything it uses lives in one temp directory: its host key, a client key pair, the
``authorized_keys`` of the user that logs in (root: the tests run as root in CI), a
``known_hosts`` the client checks the host key against, and an ssh config file that points
``ssh``, ``rsync -e ssh`` and ``restic``'s sftp at it. It listens on a free port and is stopped
(and waited for) when the fixture ends.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import os
from pathlib import Path
import shutil
import socket
import subprocess
import time

SSHD = "/usr/sbin/sshd"


def sshd_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (sshd runs as root and the test logs in as root)"
    for tool in (SSHD, "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test installs openssh-server as root)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, what: str, *,
                  seconds: float = 30) -> None:
    """Until a server started as ``process`` accepts connections on 127.0.0.1:``port``;
    ``RuntimeError`` with its log if it exits or takes longer than ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log.read_text()}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    key: Path            # the client's private key
    known_hosts: Path
    directory: Path

    @property
    def ssh_options(self) -> list[str]:
        """What a client needs besides -i/-p: no agent, no user config."""
        return ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-F", "/dev/null"]

    def url(self, path: Path | str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def sftp_command(self) -> str:
        """restic's ``-o sftp.command=…`` for this server."""
        return (f"ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -i {self.key} "
                f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                f"-p {self.port} {self.user}@127.0.0.1 -s sftp")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)


@contextlib.contextmanager
def running_sshd(directory: Path) -> Iterator[Sshd]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    host_key, client_key = directory / "host_key", directory / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = directory / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    os.chmod(authorized, 0o600)
    port = free_port()
    known_hosts = directory / "known_hosts"
    host_pub = (directory / "host_key.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\nPidFile {directory / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\nMaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = (directory / "sshd.log").open("w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        wait_for_port(port, process, directory / "sshd.log", "sshd", seconds=10)
        yield Sshd(port, "root", client_key, known_hosts, directory)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
