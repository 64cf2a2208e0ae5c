"""mailsnap: consistent backups of a live Dovecot Maildir store."""

__version__ = "0.1.0"
