"""Live-mail harness: a real, throw-away Dovecot, a load generator and a backup checker.

The modules are test infrastructure, importable by tests and benchmarks alike::

    from tests.livemail.harness import DovecotInstance, LoadGenerator, check_backup

Everything here uses plain ``subprocess``/``imaplib``/``smtplib`` and never imports mailsnap: the
harness must not depend on the code it judges. It only ever talks to 127.0.0.1.
"""
