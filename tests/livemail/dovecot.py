"""A throw-away Dovecot instance on loopback, for tests that need real IMAP and LMTP.

The instance has its own config file (every ``doveadm`` call passes ``-c`` with it), its own
``base_dir``/``state_dir``/``instance_name``/log, listens on 127.0.0.1 only on free non-standard
ports, and keeps virtual users in a passwd-file whose mail belongs to the ``vmail`` user. Use it as
a context manager: leaving the ``with`` block stops the master and every process of the instance,
whatever happened inside.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import imaplib
import os
from pathlib import Path
import pwd
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time

LOOPBACK = "127.0.0.1"
VMAIL = "vmail"
DOMAIN = "example.test"
PASSWORD = "livemail-secret"
REQUIRED_TOOLS = ("dovecot", "doveadm")


def dovecot_skip_reason() -> str | None:
    """Why a real Dovecot cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to run Dovecot with mail_uid=vmail (CI runs as root)"
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (scripts/test installs dovecot-imapd and "
                "dovecot-lmtpd as root)"
            )
    for binary in ("/usr/lib/dovecot/imap", "/usr/lib/dovecot/lmtp"):
        if not Path(binary).exists():
            return f"{binary} is missing (install dovecot-imapd and dovecot-lmtpd)"
    return None


def ensure_vmail_user() -> tuple[int, int]:
    """Return (uid, gid) of ``vmail``, creating it as a system user if it is missing."""
    try:
        entry = pwd.getpwnam(VMAIL)
    except KeyError:
        subprocess.run(
            [
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", VMAIL,
            ],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(VMAIL)
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def private_dir(prefix: str = "mailsnap-livemail-") -> Iterator[Path]:
    """A fresh directory directly in /tmp, mode 0711, removed afterwards.

    Dovecot's processes run as ``dovecot``/``vmail`` and must reach the passwd-file and the mail;
    pytest's tmp directories are 0700 and pytest resets that mode on every run, so the harness
    keeps everything Dovecot touches below a directory of its own.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        os.chmod(path, 0o711)
        yield path
    finally:
        if not any(_is_mount_below(path)):
            shutil.rmtree(path, ignore_errors=True)


def _is_mount_below(path: Path) -> Iterator[bool]:
    prefix = str(path).rstrip("/") + "/"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        yield line.split()[1].startswith(prefix)


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """``mount --bind source target`` for the duration of the block (target is created)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True,
                   capture_output=True)
    try:
        yield target
    finally:
        done = subprocess.run(["umount", str(target)], check=False, capture_output=True)
        if done.returncode != 0:
            # Something still holds it (a Dovecot process that refused to die?): detach lazily
            # so the loop device can go, and fail loudly.
            subprocess.run(["umount", "-l", str(target)], check=False)
            raise RuntimeError(f"umount {target} failed: {done.stderr.decode().strip()}")
        target.rmdir()


def unreachable_for_others(path: Path) -> Path | None:
    """The first ancestor of ``path`` (or itself) that other users cannot traverse, if any."""
    for directory in reversed([path, *path.parents]):
        if not directory.stat().st_mode & 0o001:
            return directory
    return None


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks it, so never a standard one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def user_name(index: int) -> str:
    return f"user{index}@{DOMAIN}"


class DovecotError(RuntimeError):
    pass


class DovecotInstance:
    """One private Dovecot: config, users, start/stop, ``doveadm``, IMAP and LMTP clients.

    ``mail_root`` holds one home per user (``mail_root/<local part>``) with the Maildir at
    ``<home>/Maildir`` (Maildir++ layout: ``.Sent``, ``.Archive``, …). ``workdir`` holds the
    config, passwd-file, runtime and state directories and the logs.
    """

    def __init__(
        self,
        workdir: Path,
        mail_root: Path,
        users: Sequence[str],
        *,
        fsync: bool = True,
    ) -> None:
        self.workdir = workdir
        self.mail_root = mail_root
        self.users = list(users)
        self.fsync = fsync
        self.instance_name = f"mailsnap-livemail-{secrets.token_hex(4)}"
        self.config_path = workdir / "dovecot.conf"
        self.passwd_path = workdir / "users"
        self.base_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "dovecot.log"
        self.stdout_path = workdir / "dovecot.stdout"
        self.imap_port = 0
        self.lmtp_port = 0
        self.master_pid: int | None = None
        self.uid = self.gid = -1  # vmail's, known once started

    # -- paths -------------------------------------------------------------------------------

    def home(self, user: str) -> Path:
        return self.mail_root / user.split("@", 1)[0]

    def maildir(self, user: str) -> Path:
        return self.home(user) / "Maildir"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DovecotInstance:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Write the config and passwd-file, start the master, wait until IMAP and LMTP answer."""
        self.uid, self.gid = ensure_vmail_user()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        for path in (self.workdir, self.mail_root):
            blocked = unreachable_for_others(path)
            if blocked is not None:
                raise DovecotError(
                    f"{blocked} is not traversable by other users, so Dovecot's processes "
                    f"cannot reach {path}; use a directory from private_dir()"
                )
        os.chown(self.mail_root, self.uid, self.gid)
        for user in self.users:
            home = self.home(user)
            home.mkdir(mode=0o700, exist_ok=True)
            os.chown(home, self.uid, self.gid)
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        while self.lmtp_port == self.imap_port:
            self.lmtp_port = free_port()
        self.passwd_path.write_text(
            "".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in self.users)
        )
        os.chmod(self.passwd_path, 0o644)
        self.state_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self._config())
        with open(self.stdout_path, "ab") as out:
            # The master daemonizes but keeps the caller's stdout open: never give it a pipe.
            started = subprocess.run(
                ["dovecot", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False, timeout=30,
            )
        if started.returncode != 0:
            raise DovecotError(
                f"dovecot -c {self.config_path} exited {started.returncode}:\n{self.log_tail()}"
            )
        pid_file = self.base_dir / "master.pid"
        deadline = time.monotonic() + timeout
        while True:
            if pid_file.exists() and pid_file.read_text().strip():
                self.master_pid = int(pid_file.read_text().strip())
                if self._answers(self.imap_port) and self._answers(self.lmtp_port):
                    return
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"Dovecot did not come up in {timeout:.0f}s; log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the master and make sure no process of this instance survives; idempotent."""
        if self.master_pid is not None and self.master_pid in self.pids():
            # What ``doveadm stop`` does, without its second of start-up and polling.
            os.kill(self.master_pid, signal.SIGTERM)
        elif self.config_path.exists() and (self.base_dir / "master.pid").exists():
            subprocess.run(
                ["doveadm", "-c", str(self.config_path), "stop"],
                capture_output=True, check=False, timeout=30,
            )
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master_pid = None
        left = self.pids()
        if left:
            raise DovecotError(f"Dovecot processes {left} survived SIGKILL")

    def pids(self) -> list[int]:
        """Pids of this instance: the master, every process titled with our instance name, and
        any ``doveadm -c CONFIG`` still running."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[-1].split()[0] == "Z":
                continue
            if (
                int(entry.name) == self.master_pid
                or self.instance_name.encode() in cmdline  # children: "<instance>/imap"
                or str(self.config_path).encode() in cmdline  # master, doveadm -c CONFIG
            ):
                pids.append(int(entry.name))
        return pids

    @staticmethod
    def _answers(port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
                return bool(sock.recv(64))
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def _config(self) -> str:
        return f"""\
# Throw-away instance written by tests/livemail; never edit by hand.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
info_log_path = {self.log_path}
protocols = imap lmtp
listen = {LOOPBACK}
ssl = no
# Plain-text passwords are acceptable only because everything is on loopback.
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
mail_uid = {self.uid}
mail_gid = {self.gid}
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
first_valid_gid = {self.gid}
last_valid_gid = {self.gid}
# Dovecot's default. With "never", a btrfs snapshot was seen holding a delivery in new/ with its
# data not yet written (0 bytes, name says S=8125): the rename reached the snapshot, the data not.
mail_fsync = {"optimized" if self.fsync else "never"}
mail_max_userip_connections = 100
postmaster_address = postmaster@{DOMAIN}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
  default_fields = uid={self.uid} gid={self.gid} home={self.mail_root}/%n
}}
namespace inbox {{
  inbox = yes
  separator = .
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {self.lmtp_port}
  }}
}}
service imap {{
  process_limit = 64
}}
protocol lmtp {{
  mail_plugins =
}}
"""

    # -- clients -----------------------------------------------------------------------------

    def doveadm(self, *args: str, timeout: float = 300) -> str:
        """Run ``doveadm -c CONFIG ARGS…`` and return its stdout."""
        argv = ["doveadm", "-c", str(self.config_path), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise DovecotError(f"{argv} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def force_resync(self, user: str) -> None:
        self.doveadm("force-resync", "-u", user, "*")

    def imap(self, user: str) -> imaplib.IMAP4:
        """A logged-in IMAP connection (plain text, loopback only)."""
        conn = imaplib.IMAP4(LOOPBACK, self.imap_port, timeout=60)
        conn.login(user, PASSWORD)
        return conn

    def lmtp(self) -> smtplib.LMTP:
        conn = smtplib.LMTP(LOOPBACK, self.lmtp_port, timeout=60)
        conn.ehlo_or_helo_if_needed()
        return conn

    def chown_tree(self, path: Path) -> None:
        """Give ``path`` and everything below it to vmail (dirs 0700, files 0600)."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)
        subprocess.run(["chmod", "-R", "u=rwX,go=", str(path)], check=True)
